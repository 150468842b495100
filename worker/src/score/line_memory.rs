//! Line memory: a part is scored against the line's own recent parts, without prompts or
//! labels (mutual scoring, as MuSc does for unlabeled images). On a production line almost
//! every part is good, so a view of a new part that finds near-identical views among many
//! recent parts is normal, and one that finds them only in a few is suspect.
//!
//! Score: for each view `v` of the new part (its whole frame and windows) and each part `m` in
//! the memory, `s_m(v)` is the largest cosine between `v` and any view of `m`; the view's
//! similarity is the mean of the highest `top_fraction` of those (MuSc's robust mean: a few
//! defective parts in the memory do not make a defect look normal), and its score
//! `1 − similarity`, clamped to [0, 1]; the part's `line_memory_score` is its worst view's.
//! Parts judged DEFECT never enter the memory.
//!
//! Guarantees: per key (profile and line, or camera) at most `size` parts younger than
//! `max_age_s` are kept, oldest out, and at most [`MAX_KEYS`] keys (the least recently used
//! go), and at most [`MAX_BYTES`] of views in all (the least recently used lines go first,
//! then the oldest parts of the line remembering); a part of 64 parts of 25 views of 512
//! floats takes 3.2 MiB per line, so 80 such lines fit. Keys are the requests' ids, which
//! validation caps at 256 bytes. No score until `min_parts` other parts are in memory. The
//! lock is held to look up and copy pointers, never while scoring: parts are shared
//! (`Arc`), and a score is computed on the caller's thread (the pipeline's blocking pool)
//! from a snapshot. Pure data and a mutex: no Kafka, no tokio.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The most lines (or cameras) remembered at once, per worker.
pub const MAX_KEYS: usize = 1024;
/// The most bytes of remembered views, per worker.
pub const MAX_BYTES: usize = 256 << 20;

/// A profile's `line_memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LineMemoryConfig {
    /// Parts kept per line (or camera).
    pub size: usize,
    /// Parts older than this many seconds are forgotten.
    pub max_age_s: u64,
    /// Remember per `line` (line_id) or per `camera` (camera_id).
    pub key: MemoryKey,
    /// No score until this many other parts are remembered.
    pub min_parts: usize,
    /// The share of the most similar remembered parts a view's similarity is the mean of.
    #[schemars(extend("default" = 0.3))]
    pub top_fraction: f32,
    /// How much of the anomaly score comes from the line memory, in [0, 1] (0: reported in
    /// the verdict only; the outcome is the prompts' and exemplars').
    pub weight: f32,
}

impl Default for LineMemoryConfig {
    fn default() -> Self {
        Self {
            size: 64,
            max_age_s: 3600,
            key: MemoryKey::Line,
            min_parts: 8,
            top_fraction: 0.3,
            weight: 0.0,
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKey {
    #[default]
    Line,
    Camera,
}

/// Why a profile's `line_memory` is refused: each names the key at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineMemoryError {
    #[error("line_memory.min_parts {min_parts} must be within 1..=line_memory.size ({size})")]
    MinParts { min_parts: usize, size: usize },
    #[error("line_memory.top_fraction {top_fraction} is not within (0, 1]")]
    TopFraction { top_fraction: f32 },
    #[error("line_memory.weight {weight} is not within [0, 1]")]
    Weight { weight: f32 },
}

impl LineMemoryConfig {
    pub fn validate(&self) -> Result<(), LineMemoryError> {
        if self.size == 0 || self.min_parts == 0 || self.min_parts > self.size {
            return Err(LineMemoryError::MinParts {
                min_parts: self.min_parts,
                size: self.size,
            });
        }
        if !(self.top_fraction > 0.0 && self.top_fraction <= 1.0) {
            return Err(LineMemoryError::TopFraction {
                top_fraction: self.top_fraction,
            });
        }
        if !(0.0..=1.0).contains(&self.weight) {
            return Err(LineMemoryError::Weight {
                weight: self.weight,
            });
        }
        Ok(())
    }
}

struct Part {
    at: Instant,
    /// Unit vectors.
    views: Vec<Vec<f32>>,
}

impl Part {
    fn bytes(&self) -> usize {
        self.views.iter().map(|v| v.len() * 4 + 24).sum::<usize>() + 64
    }
}

#[derive(Default)]
struct Ring {
    parts: VecDeque<std::sync::Arc<Part>>,
    used: u64,
}

impl Ring {
    /// Forgets parts older than `max_age_s`; returns the bytes given back.
    fn forget_old(&mut self, cfg: &LineMemoryConfig, now: Instant) -> usize {
        let age = Duration::from_secs(cfg.max_age_s);
        let mut freed = 0;
        while self
            .parts
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.at) > age)
        {
            freed += self.parts.pop_front().map_or(0, |p| p.bytes());
        }
        freed
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
}

/// A part's score (unit `views`) against other parts (each its unit views), as the module
/// docs define it; `None` under `min_parts` parts. What the worker's memory computes against
/// the line's recent parts, and `clipqc eval --line-memory` against the rest of a dataset.
pub fn score_against(
    views: &[Vec<f32>],
    parts: &[&[Vec<f32>]],
    cfg: &LineMemoryConfig,
) -> Option<f32> {
    let n = parts.len();
    if n < cfg.min_parts.max(1) || views.is_empty() {
        return None;
    }
    let top = ((cfg.top_fraction * n as f32).ceil() as usize).clamp(1, n);
    let mut per_part = Vec::with_capacity(n);
    let worst = views
        .iter()
        .map(|v| {
            per_part.clear();
            per_part.extend(parts.iter().map(|m| {
                m.iter()
                    .map(|r| dot(v, r))
                    .fold(f32::NEG_INFINITY, f32::max)
            }));
            per_part.sort_by(|a, b| b.total_cmp(a));
            let similarity = per_part[..top].iter().sum::<f32>() / top as f32;
            (1.0 - similarity).clamp(0.0, 1.0)
        })
        .fold(0f32, f32::max);
    Some(worst)
}

/// Every line's memory, for one worker.
pub struct LineMemory {
    rings: Mutex<Rings>,
    clock: std::sync::atomic::AtomicU64,
    max_bytes: usize,
}

#[derive(Default)]
struct Rings {
    by_key: HashMap<(String, String), Ring>,
    /// Bytes of the parts in `by_key`.
    bytes: usize,
}

impl Default for LineMemory {
    fn default() -> Self {
        Self::with_max_bytes(MAX_BYTES)
    }
}

impl LineMemory {
    /// The part's score against the remembered parts of `(profile, key)` (its own views are
    /// not yet there), or `None` while fewer than `min_parts` are remembered. `views` are
    /// the part's embeddings (not necessarily unit).
    pub fn score(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
    ) -> Option<f32> {
        let units: Vec<Vec<f32>> = views.iter().map(|v| super::normalized(v)).collect();
        let parts: Vec<std::sync::Arc<Part>> = {
            let mut guard = self.rings.lock().unwrap_or_else(|e| e.into_inner());
            let rings = &mut *guard;
            let ring = rings
                .by_key
                .get_mut(&(profile.to_string(), key.to_string()))?;
            rings.bytes -= ring.forget_old(cfg, now);
            ring.parts.iter().cloned().collect()
        };
        // Scored without the lock: other records' lines (and this one's) go on meanwhile.
        let parts: Vec<&[Vec<f32>]> = parts.iter().map(|p| p.views.as_slice()).collect();
        score_against(&units, &parts, cfg)
    }

    /// A memory of at most `max_bytes` of views (instead of [`MAX_BYTES`]).
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self {
            rings: Mutex::default(),
            clock: Default::default(),
            max_bytes,
        }
    }

    /// Bytes of views remembered.
    pub fn bytes(&self) -> usize {
        self.rings.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Remembers a part judged not DEFECT.
    pub fn remember(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
    ) {
        let units = views.iter().map(|v| super::normalized(v)).collect();
        let tick = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = std::sync::Arc::new(Part {
            at: now,
            views: units,
        });
        let mut guard = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let rings = &mut *guard;
        let id = (profile.to_string(), key.to_string());
        let least_used = |by_key: &HashMap<(String, String), Ring>, id: &(String, String)| {
            by_key
                .iter()
                .filter(|(k, _)| *k != id)
                .min_by_key(|(_, r)| r.used)
                .map(|(k, _)| k.clone())
        };
        if !rings.by_key.contains_key(&id) && rings.by_key.len() >= MAX_KEYS {
            // The line not heard from for longest goes.
            if let Some(old) = least_used(&rings.by_key, &id) {
                rings.bytes -= rings.by_key.remove(&old).map_or(0, |r| r.bytes());
            }
        }
        // Over the byte bound: the lines not heard from for longest go first.
        while rings.bytes + part.bytes() > self.max_bytes {
            let Some(old) = least_used(&rings.by_key, &id) else {
                break;
            };
            rings.bytes -= rings.by_key.remove(&old).map_or(0, |r| r.bytes());
        }
        rings.bytes += part.bytes();
        let ring = rings.by_key.entry(id).or_default();
        ring.used = tick;
        let mut freed = ring.forget_old(cfg, now);
        ring.parts.push_back(part);
        while ring.parts.len() > cfg.size.max(1) {
            freed += ring.parts.pop_front().map_or(0, |p| p.bytes());
        }
        // Still over (this line alone): its oldest parts go, never the one just added.
        while rings.bytes - freed > self.max_bytes && ring.parts.len() > 1 {
            freed += ring.parts.pop_front().map_or(0, |p| p.bytes());
        }
        rings.bytes -= freed;
    }

    /// Lines (or cameras) remembered.
    pub fn keys(&self) -> usize {
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
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
        let part_bytes = Part {
            at: Instant::now(),
            views: vec![view.clone(); 4],
        }
        .bytes();
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
}
