//! What the pipeline holds right now, for whoever asks why a record has not finished (a test
//! that waited too long, the drain that ran out of time): every record in flight with the step
//! it is at and for how long, the intake (records taken, waiting for a slot, paused), the byte
//! budget, and the consumer as librdkafka last reported it (fetch state, messages fetched but
//! not yet taken, offsets), so a stall names its place: a record inside the pipeline, or a
//! record that never left the consumer.
//!
//! Guarantees: one short lock per step of a record (a few per record, next to a decode that
//! takes milliseconds); a record leaves the table when its task ends, however it ends (its
//! [`Tracked`] is dropped, panics included); a snapshot copies the table and never waits on
//! the pipeline.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::Offset;

use crate::source::{ConsumerStats, Source};

/// Where a record is on its way to its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Waiting for the byte budget to hold its payload.
    PayloadBytes,
    /// Reading its request, choosing its profile.
    Request,
    /// Fetching its image.
    Fetch,
    /// Waiting for the byte budget to hold its payload, image and pixels (bytes in all).
    FrameBytes(u64),
    /// Decoding and cutting its views, on the blocking pool.
    Decode,
    /// Its views queued for the batcher or in the model (how many).
    Model(usize),
    /// Decided; its defects being outlined by SAM.
    Segment,
    /// Its verdict (and dead letter) being published and acknowledged, or staged for the
    /// next transaction.
    Publish,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::PayloadBytes => write!(f, "waiting for the byte budget (payload)"),
            Step::Request => write!(f, "reading the request"),
            Step::Fetch => write!(f, "fetching the image"),
            Step::FrameBytes(b) => write!(f, "waiting for the byte budget ({b} bytes)"),
            Step::Decode => write!(f, "decoding"),
            Step::Model(n) => write!(f, "in the batcher or the model ({n} views)"),
            Step::Segment => write!(f, "segmenting"),
            Step::Publish => write!(f, "publishing"),
        }
    }
}

type Key = (String, i32, i64);

#[derive(Debug, Clone, Copy)]
struct Entry {
    step: Step,
    since: Instant,
    taken: Instant,
}

/// The pipeline's state for a snapshot. One per run: [`super::Deps::probe`].
#[derive(Default)]
pub struct Probe {
    records: Mutex<BTreeMap<Key, Entry>>,
    intake: Mutex<Intake>,
    /// Set when the run starts; weak, so the probe never keeps a stopped worker's consumer.
    consumer: OnceLock<Weak<Source>>,
    shared: OnceLock<Weak<super::Shared>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Intake {
    taken: u64,
    last_taken: Option<Instant>,
    waiting: usize,
    paused: bool,
    free_slots: usize,
    max_slots: usize,
}

/// A record's line in the table, removed when dropped.
pub struct Tracked {
    probe: Arc<Probe>,
    key: Key,
}

impl Tracked {
    /// The record moved on to `step`.
    pub fn step(&self, step: Step) {
        if let Some(e) = self.probe.lock_records().get_mut(&self.key) {
            e.step = step;
            e.since = Instant::now();
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.probe.lock_records().remove(&self.key);
    }
}

impl Probe {
    fn lock_records(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Entry>> {
        // Plain bookkeeping: a panic elsewhere while holding it leaves nothing inconsistent.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_intake(&self) -> std::sync::MutexGuard<'_, Intake> {
        self.intake.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn attach(&self, consumer: &Arc<Source>, shared: &Arc<super::Shared>, max: usize) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
        let _ = self.shared.set(Arc::downgrade(shared));
        self.lock_intake().max_slots = max;
    }

    /// A record taken from the consumer: in the table until the returned guard is dropped.
    pub(super) fn taken(self: &Arc<Self>, topic: &str, partition: i32, offset: i64) -> Tracked {
        let now = Instant::now();
        let key = (topic.to_string(), partition, offset);
        self.lock_records().insert(
            key.clone(),
            Entry {
                step: Step::PayloadBytes,
                since: now,
                taken: now,
            },
        );
        let mut intake = self.lock_intake();
        intake.taken += 1;
        intake.last_taken = Some(now);
        Tracked {
            probe: self.clone(),
            key,
        }
    }

    /// The intake's queue and slots, after each change.
    pub(super) fn intake(&self, waiting: usize, paused: bool, free_slots: usize) {
        let mut intake = self.lock_intake();
        intake.waiting = waiting;
        intake.paused = paused;
        intake.free_slots = free_slots;
    }

    /// Records in flight now (topic, partition, offset), oldest first.
    pub fn in_flight(&self) -> Vec<(String, i32, i64)> {
        let records = self.lock_records();
        let mut keys: Vec<_> = records.iter().map(|(k, e)| (e.taken, k.clone())).collect();
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    }

    /// What the pipeline holds and where each record is, now.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let mut records: Vec<RecordState> = self
            .lock_records()
            .iter()
            .map(|((topic, partition, offset), e)| RecordState {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                step: e.step,
                for_: now.saturating_duration_since(e.since),
                age: now.saturating_duration_since(e.taken),
            })
            .collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.age));
        let intake = *self.lock_intake();
        let budget = self
            .shared
            .get()
            .and_then(Weak::upgrade)
            .map(|s| (s.budget.held(), s.budget.total()));
        let consumer = self.consumer.get().and_then(Weak::upgrade);
        let (assignment, positions, stats) = match &consumer {
            Some(c) => (
                c.assignment()
                    .map(|tpl| {
                        tpl.elements()
                            .iter()
                            .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                            .collect()
                    })
                    .unwrap_or_default(),
                c.position()
                    .map(|tpl| {
                        tpl.elements()
                            .iter()
                            .map(|e| {
                                let at = match e.offset() {
                                    Offset::Offset(o) => o.to_string(),
                                    other => format!("{other:?}"),
                                };
                                format!("{}[{}]@{at}", e.topic(), e.partition())
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                c.context().last_stats(),
            ),
            None => (Vec::new(), Vec::new(), None),
        };
        Snapshot {
            records,
            taken: intake.taken,
            since_last_taken: intake.last_taken.map(|t| now.saturating_duration_since(t)),
            waiting: intake.waiting,
            paused: intake.paused,
            free_slots: intake.free_slots,
            max_slots: intake.max_slots,
            budget,
            assignment,
            positions,
            stats,
        }
    }
}

/// One record in flight.
#[derive(Debug, Clone)]
pub struct RecordState {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub step: Step,
    /// How long it has been at this step, and since it was taken.
    pub for_: Duration,
    pub age: Duration,
}

/// The pipeline at one moment ([`Probe::snapshot`]); its `Display` is the dump.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// In flight, the oldest first.
    pub records: Vec<RecordState>,
    /// Records taken from the consumer since the start, and how long ago the last was.
    pub taken: u64,
    pub since_last_taken: Option<Duration>,
    /// Received but waiting for a slot.
    pub waiting: usize,
    pub paused: bool,
    pub free_slots: usize,
    pub max_slots: usize,
    /// Bytes held and the budget.
    pub budget: Option<(u64, u64)>,
    /// The consumer's assignment and positions (the next offset it hands over), now.
    pub assignment: Vec<String>,
    pub positions: Vec<String>,
    pub stats: Option<ConsumerStats>,
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pipeline: {} records taken (the last {}), {} in flight, {} waiting for a slot, {}/{} slots free, partitions {}",
            self.taken,
            self.since_last_taken
                .map_or("never".into(), |d| format!("{:.1} s ago", d.as_secs_f64())),
            self.records.len(),
            self.waiting,
            self.free_slots,
            self.max_slots,
            if self.paused { "paused" } else { "not paused" },
        )?;
        if let Some((held, total)) = self.budget {
            write!(f, ", {held} of {total} budget bytes held")?;
        }
        writeln!(f)?;
        for r in &self.records {
            writeln!(
                f,
                "  {}[{}]@{}: {} for {:.1} s (taken {:.1} s ago)",
                r.topic,
                r.partition,
                r.offset,
                r.step,
                r.for_.as_secs_f64(),
                r.age.as_secs_f64()
            )?;
        }
        writeln!(
            f,
            "consumer: assigned [{}], positions [{}]",
            self.assignment.join(", "),
            self.positions.join(", ")
        )?;
        match &self.stats {
            Some(s) => write!(f, "  {s}"),
            None => write!(f, "  librdkafka has sent no statistics yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_listed_at_its_step_until_its_guard_is_dropped() {
        let probe = Arc::new(Probe::default());
        let a = probe.taken("t", 0, 7);
        let b = probe.taken("t", 1, 3);
        b.step(Step::Model(5));
        let snap = probe.snapshot();
        assert_eq!(snap.taken, 2);
        assert_eq!(snap.records.len(), 2);
        let b_state = snap.records.iter().find(|r| r.partition == 1).unwrap();
        assert_eq!((b_state.offset, b_state.step), (3, Step::Model(5)));
        let dump = snap.to_string();
        assert!(
            dump.contains("t[1]@3: in the batcher or the model (5 views)"),
            "{dump}"
        );
        assert!(
            dump.contains("t[0]@7: waiting for the byte budget (payload)"),
            "{dump}"
        );
        drop(a);
        assert_eq!(probe.in_flight(), vec![("t".to_string(), 1, 3)]);
        // A task that panics drops its guard while unwinding: the record leaves too.
        let p = probe.clone();
        let _ = std::thread::spawn(move || {
            let _held = p.taken("t", 2, 0);
            panic!("the record's task failed");
        })
        .join();
        drop(b);
        assert!(probe.in_flight().is_empty());
        assert_eq!(probe.snapshot().taken, 3);
    }
}
