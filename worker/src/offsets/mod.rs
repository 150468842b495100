//! The offsets stage: which input offsets may be committed.
//!
//! Guarantee (at-least-once): the position stored for a partition is always the lowest offset
//! not yet done, so a commit never passes a message whose verdict (or DLQ record) the broker
//! has not acknowledged. Completion may come in any order (a small image finishes before a
//! big one fetched earlier); the position advances only over a contiguous done prefix.
//!
//! Kafka delivers a partition's records in offset order, so "every offset seen below the
//! lowest one still in flight is done" holds, gaps (compaction, transaction markers) included.

mod ledger;

use std::collections::{BTreeSet, HashMap};

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
    in_flight: BTreeSet<i64>,
    /// Highest offset received; the position is one past it when nothing is in flight.
    highest: Option<i64>,
    /// Last position reported, so callers store only changes.
    reported: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        match self.in_flight.first() {
            Some(&lowest) => Some(lowest),
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

    /// A record was taken from `p` for processing.
    pub fn received(&mut self, p: &Partition, offset: i64) {
        let state = self.partitions.entry(p.clone()).or_default();
        debug_assert!(
            state.highest.is_none_or(|h| offset > h),
            "offsets of a partition arrive in order"
        );
        // The consumer started at or before this offset: as a position it is no news.
        state.reported.get_or_insert(offset);
        state.in_flight.insert(offset);
        state.highest = Some(state.highest.map_or(offset, |h| h.max(offset)));
    }

    /// The record's outcome was acknowledged downstream. Returns the partition's new commit
    /// position (the next offset to consume) when it moved, for `store_offset`.
    pub fn completed(&mut self, p: &Partition, offset: i64) -> Option<i64> {
        // A partition revoked meanwhile: its new owner re-processes from the last commit.
        let state = self.partitions.get_mut(p)?;
        if !state.in_flight.remove(&offset) {
            return None;
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
        self.partitions.get(p).map_or(0, |s| s.in_flight.len())
    }

    pub fn total_in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
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

    proptest! {
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
