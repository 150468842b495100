//! The line memory: scores, bounds and settings.

use super::*;
use proptest::prelude::*;

fn cfg(min_parts: usize) -> LineMemoryConfig {
    LineMemoryConfig {
        min_parts,
        ..Default::default()
    }
}

fn vector() -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-1.0f32..1.0, 16)
        .prop_filter("not zero", |v| v.iter().map(|x| x * x).sum::<f32>() > 0.01)
}

proptest! {
    /// Whatever the embeddings (any weights): a part repeated many times scores as
    /// normal against itself, and a different part among them scores higher.
    #[test]
    fn a_repeated_part_is_normal_and_a_different_one_scores_higher(
        part in proptest::collection::vec(vector(), 1..4),
        other in proptest::collection::vec(vector(), 1..4),
    ) {
        let m = LineMemory::default();
        let c = cfg(4);
        let now = Instant::now();
        for _ in 0..10 {
            m.remember("p", "line-1", &part, &c, now);
        }
        let same = m.score("p", "line-1", &part, &c, now).unwrap();
        prop_assert!(same < 1e-5, "{}", same);
        let odd = m.score("p", "line-1", &other, &c, now).unwrap();
        let differs = other.iter().any(|o| {
            let o = crate::score::normalized(o);
            part.iter().all(|p| dot(&o, &crate::score::normalized(p)) < 0.999)
        });
        if differs {
            prop_assert!(odd > same, "{} vs {}", odd, same);
        }
        // One odd part in the memory does not make the repeated part look suspect.
        m.remember("p", "line-1", &other, &c, now);
        let still = m.score("p", "line-1", &part, &c, now).unwrap();
        prop_assert!(still < 1e-5, "{}", still);
    }
}

#[test]
fn no_score_until_enough_parts_and_lines_are_apart() {
    let m = LineMemory::default();
    let c = cfg(3);
    let now = Instant::now();
    let v = vec![vec![1.0, 0.0]];
    assert_eq!(m.score("p", "l1", &v, &c, now), None);
    for _ in 0..2 {
        m.remember("p", "l1", &v, &c, now);
    }
    assert_eq!(m.score("p", "l1", &v, &c, now), None, "two of three");
    m.remember("p", "l1", &v, &c, now);
    assert_eq!(m.score("p", "l1", &v, &c, now), Some(0.0));
    assert_eq!(m.score("p", "l2", &v, &c, now), None, "another line");
    assert_eq!(m.score("q", "l1", &v, &c, now), None, "another profile");
}

#[test]
fn the_memory_is_bounded_by_size_age_and_keys() {
    let m = LineMemory::default();
    let mut c = cfg(1);
    c.size = 4;
    c.max_age_s = 60;
    let t0 = Instant::now();
    for i in 0..10 {
        m.remember("p", "l", &[vec![1.0, i as f32]], &c, t0);
    }
    let len = |m: &LineMemory| {
        m.rings.lock().unwrap().by_key[&("p".to_string(), "l".to_string())]
            .parts
            .len()
    };
    assert_eq!(len(&m), 4);
    // A minute and a bit later the old parts are forgotten on the next look.
    let later = t0 + Duration::from_secs(61);
    m.remember("p", "l", &[vec![1.0, 0.0]], &c, later);
    assert_eq!(len(&m), 1);
    for k in 0..MAX_KEYS + 5 {
        m.remember("p", &format!("line-{k}"), &[vec![1.0]], &c, t0);
    }
    assert_eq!(m.keys(), MAX_KEYS);
}

#[test]
fn bad_settings_name_the_key() {
    let mut c = cfg(100);
    let err = c.validate().unwrap_err();
    assert!(
        matches!(err, LineMemoryError::MinParts { min_parts: 100, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("line_memory.min_parts"));
    c = cfg(8);
    c.top_fraction = 0.0;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("line_memory.top_fraction"));
}

/// However many lines write, and whatever their parts weigh, the views remembered stay
/// under the byte bound: the lines not heard from for longest go first, then the oldest
/// parts of the line remembering; the bytes counted are the bytes held.
#[test]
fn the_memory_stays_under_its_byte_bound() {
    let view = vec![1.0f32; 256];
    let part_bytes = Part::new(0, Instant::now(), vec![view.clone(); 4], 8).bytes();
    let m = LineMemory::with_max_bytes(10 * part_bytes);
    let mut c = cfg(1);
    c.size = 8;
    let now = Instant::now();
    for line in 0..50 {
        for _ in 0..3 {
            m.remember(
                "p",
                &format!("line-{line}"),
                &vec![view.clone(); 4],
                &c,
                now,
            );
            assert!(m.bytes() <= 10 * part_bytes, "{} bytes", m.bytes());
        }
    }
    let held: usize = {
        let rings = m.rings.lock().unwrap();
        rings.by_key.values().map(Ring::bytes).sum()
    };
    assert_eq!(held, m.bytes());
    // The last lines written are the ones kept, the newest whole.
    assert!(m.keys() <= 4, "{} lines", m.keys());
    assert!(m
        .score("p", "line-49", std::slice::from_ref(&view), &c, now)
        .is_some());
    assert!(m
        .score("p", "line-0", std::slice::from_ref(&view), &c, now)
        .is_none());
    // One line alone over the bound keeps its newest parts.
    let small = LineMemory::with_max_bytes(2 * part_bytes);
    for _ in 0..5 {
        small.remember("p", "l", &vec![view.clone(); 4], &c, now);
    }
    assert_eq!(small.bytes(), 2 * part_bytes);
}
