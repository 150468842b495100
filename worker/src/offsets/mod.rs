//! The offsets stage: which input offsets may be committed.
//!
//! Guarantee (at-least-once): the position stored for a partition is always the lowest offset
//! not yet done, so a commit never passes a message whose verdict (or DLQ record) the broker
//! has not acknowledged. Completion may come in any order (a small image finishes before a
//! big one fetched earlier); the position advances only over a contiguous done prefix.
//!
//! Kafka delivers a partition's records in offset order, so "every offset seen below the
//! lowest one still in flight is done" holds, gaps (compaction, transaction markers) included.
//! Except when it does not: a consumer that rewinds (a seek, a fetch restarted from an older
//! position, a partition handed back after its assignment was lost) delivers offsets it
//! delivered before, some possibly still in flight. The tracker takes that as it comes, in
//! release builds as in debug ones: a re-delivered offset is in flight again (twice, if its
//! first copy has not finished), so the position never passes it, and never moves back
//! either (a stored position was true when it was stored).

mod ledger;

use std::collections::{BTreeMap, HashMap};

pub use ledger::Ledger;

/// A topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub topic: String,
    pub partition: i32,
}

impl Partition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets in flight, with how many copies of each (a re-delivered record can run
    /// beside its first copy).
    in_flight: BTreeMap<i64, u32>,
    /// Highest offset received; the position is one past it when nothing is in flight.
    highest: Option<i64>,
    /// Last position reported, so callers store only changes.
    reported: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        match self.in_flight.first_key_value() {
            Some((&lowest, _)) => Some(lowest),
            None => self.highest.map(|h| h + 1),
        }
    }
}

/// In-flight offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A record was taken from `p` for processing. Offsets normally arrive in order; one at
    /// or below the highest seen is a re-delivery (the consumer rewound) and is tracked all
    /// the same: see the module docs. Returns false for a re-delivery, for the caller to log.
    pub fn received(&mut self, p: &Partition, offset: i64) -> bool {
        let state = self.partitions.entry(p.clone()).or_default();
        let in_order = state.highest.is_none_or(|h| offset > h);
        // The consumer started at or before this offset: as a position it is no news.
        state.reported.get_or_insert(offset);
        *state.in_flight.entry(offset).or_insert(0) += 1;
        state.highest = Some(state.highest.map_or(offset, |h| h.max(offset)));
        in_order
    }

    /// The record's outcome was acknowledged downstream. Returns the partition's new commit
    /// position (the next offset to consume) when it moved, for `store_offset`.
    pub fn completed(&mut self, p: &Partition, offset: i64) -> Option<i64> {
        // A partition revoked meanwhile: its new owner re-processes from the last commit.
        let state = self.partitions.get_mut(p)?;
        match state.in_flight.get_mut(&offset) {
            None => return None,
            Some(copies) if *copies > 1 => {
                // Another copy of this record is still running: nothing moves yet.
                *copies -= 1;
                return None;
            }
            Some(_) => {
                state.in_flight.remove(&offset);
            }
        }
        let position = state.position()?;
        if state.reported.is_some_and(|r| r >= position) {
            return None;
        }
        state.reported = Some(position);
        Some(position)
    }

    /// The commit position of `p`: every offset below it is done.
    pub fn position(&self, p: &Partition) -> Option<i64> {
        self.partitions.get(p).and_then(PartitionState::position)
    }

    pub fn in_flight(&self, p: &Partition) -> usize {
        self.partitions
            .get(p)
            .map_or(0, |s| s.in_flight.values().map(|&n| n as usize).sum())
    }

    pub fn total_in_flight(&self) -> usize {
        self.partitions
            .values()
            .flat_map(|s| s.in_flight.values())
            .map(|&n| n as usize)
            .sum()
    }

    /// Forget a partition (revoked): late completions for it are ignored.
    pub fn revoke(&mut self, p: &Partition) -> Option<i64> {
        self.partitions.remove(p).and_then(|s| s.position())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_a_done_prefix() {
        let p = Partition::new("requests", 0);
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.received(&p, o);
        }
        assert_eq!(t.completed(&p, 12), None, "11 and 10 are still in flight");
        assert_eq!(t.completed(&p, 11), None);
        assert_eq!(t.position(&p), Some(10));
        assert_eq!(t.completed(&p, 10), Some(13), "10..=12 done");
        assert_eq!(t.completed(&p, 14), None, "13 still in flight");
        assert_eq!(t.completed(&p, 13), Some(15));
        assert_eq!(t.in_flight(&p), 0);
    }

    #[test]
    fn revoked_partitions_ignore_late_completions() {
        let p = Partition::new("requests", 3);
        let mut t = OffsetTracker::new();
        t.received(&p, 5);
        t.received(&p, 6);
        assert_eq!(t.completed(&p, 6), None);
        assert_eq!(t.revoke(&p), Some(5));
        assert_eq!(t.completed(&p, 5), None);
        assert_eq!(t.total_in_flight(), 0);
    }

    #[test]
    fn a_rewound_consumer_never_moves_the_position_past_a_redelivered_record() {
        // Offsets 10..=14 taken; 10..=12 done (position 13 stored). The consumer rewinds to
        // 11 (a seek, a restarted fetch): 11 and 12 come again, 13 and 14 twice while their
        // first copies still run.
        let p = Partition::new("requests", 0);
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            assert!(t.received(&p, o));
        }
        for o in 10..13 {
            t.completed(&p, o);
        }
        assert_eq!(t.position(&p), Some(13));
        for o in 11..15 {
            assert!(!t.received(&p, o), "{o} is a re-delivery");
        }
        assert_eq!(t.position(&p), Some(11), "11 runs again");
        // The first copies of 13 and 14 finish: the second copies still hold them.
        assert_eq!(t.completed(&p, 13), None);
        assert_eq!(t.completed(&p, 14), None);
        assert_eq!(t.completed(&p, 11), None, "never back below the stored 13");
        assert_eq!(t.completed(&p, 12), None, "13 and 14 are still running");
        assert_eq!(t.position(&p), Some(13));
        assert_eq!(t.completed(&p, 13), Some(14));
        assert_eq!(t.completed(&p, 14), Some(15));
        assert_eq!(t.total_in_flight(), 0);
    }

    proptest! {
        /// Whatever the order records come in (re-deliveries of earlier offsets included)
        /// and finish in: the stored position never passes an offset with a copy still in
        /// flight and never moves back.
        #[test]
        fn redeliveries_in_any_order_never_let_the_position_pass_a_running_record(
            steps in prop::collection::vec((0i64..20, any::<bool>()), 1..120),
        ) {
            let p = Partition::new("t", 0);
            let mut t = OffsetTracker::new();
            let mut running: Vec<i64> = Vec::new();
            let mut last: Option<i64> = None;
            for (offset, receive) in steps {
                if receive || running.is_empty() {
                    t.received(&p, offset);
                    running.push(offset);
                } else {
                    let i = (offset as usize) % running.len();
                    let done = running.swap_remove(i);
                    if let Some(pos) = t.completed(&p, done) {
                        prop_assert!(last.is_none_or(|l| pos > l), "position moved back");
                        prop_assert!(
                            running.iter().all(|&o| o >= pos),
                            "stored {pos} passed a running record: {running:?}"
                        );
                        last = Some(pos);
                    }
                }
            }
        }

        /// Whatever the completion order: the position never passes an offset not yet done,
        /// never moves back, and ends one past the last offset.
        #[test]
        fn position_never_passes_an_unfinished_offset(
            gaps in prop::collection::vec(1i64..4, 1..60),
            seed in any::<u64>(),
        ) {
            let p = Partition::new("t", 0);
            let mut t = OffsetTracker::new();
            let mut offsets = Vec::new();
            let mut o = 100;
            for g in gaps {
                o += g;
                offsets.push(o);
                t.received(&p, o);
            }
            let mut order = offsets.clone();
            // Deterministic shuffle from the seed (Fisher-Yates with a xorshift).
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut done = std::collections::BTreeSet::new();
            let mut last = None;
            for off in order {
                done.insert(off);
                if let Some(pos) = t.completed(&p, off) {
                    prop_assert!(last.is_none_or(|l| pos > l), "position moved back");
                    last = Some(pos);
                }
                let pos = t.position(&p).unwrap();
                for &x in &offsets {
                    if x < pos {
                        prop_assert!(done.contains(&x), "position {pos} passed unfinished offset {x}");
                    }
                }
            }
            prop_assert_eq!(last, Some(*offsets.last().unwrap() + 1));
        }
    }
}
