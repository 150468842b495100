//! The ledger: the offset tracker shared by the record tasks and the consumer's rebalance
//! callback.
//!
//! Guarantees: a partition's position is stored under the ledger's lock, so stores never go
//! backwards even when records of one partition finish on different threads at once; a
//! revocation waits (bounded) until the revoked partitions have nothing in flight, so their
//! final positions can be committed before the partitions move; records of a partition
//! received before it was revoked are recognised by their assignment epoch and dropped, so
//! a partition that comes back is tracked from scratch; completions are counted only for the
//! epoch the tracker holds, so a straggler of an earlier assignment can never resolve the
//! same offset of the current one. A partition assigned again without a revocation (its
//! assignment lost in a rebalance error) is tracked from scratch too: the consumer starts it
//! over from the committed position.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{OffsetTracker, Partition};

#[derive(Debug, Default)]
struct State {
    tracker: OffsetTracker,
    /// Assigned partitions and the epoch of their current assignment.
    assigned: HashMap<Partition, u64>,
    /// The epoch whose records the tracker holds for each partition.
    tracking: HashMap<Partition, u64>,
    next_epoch: u64,
}

impl State {
    /// Forget what the tracker holds for `p`; its final position, if any.
    fn forget(&mut self, p: &Partition) -> Option<i64> {
        self.tracking.remove(p);
        self.tracker.revoke(p)
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    state: Mutex<State>,
    changed: Condvar,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions were assigned to this worker. One already assigned (no revocation came
    /// between: its assignment was lost) starts afresh: the consumer re-reads it from the
    /// committed position, and records still running from before no longer count.
    pub fn assigned(&self, partitions: &[Partition]) {
        let mut s = self.lock();
        for p in partitions {
            s.next_epoch += 1;
            let epoch = s.next_epoch;
            if s.assigned.insert(p.clone(), epoch).is_some() {
                tracing::warn!(topic = %p.topic, partition = p.partition, "partition assigned again without a revocation: tracking it afresh");
                s.forget(p);
            }
        }
    }

    /// Every partition is gone at once, without the chance to finish their records (a
    /// rebalance error: librdkafka drops the whole assignment). Returns those partitions.
    pub fn lost_all(&self) -> Vec<Partition> {
        let mut s = self.lock();
        let lost: Vec<Partition> = s.assigned.drain().map(|(p, _)| p).collect();
        let tracked: Vec<Partition> = s.tracking.keys().cloned().collect();
        for p in &tracked {
            s.forget(p);
        }
        drop(s);
        self.changed.notify_all();
        lost
    }

    /// The epoch of `p`'s current assignment; `None` when it is not assigned (yet: the first
    /// records can arrive before the assignment callback on some brokers, so callers treat
    /// `None` as epoch 0, which [`Self::assigned`] never hands out).
    pub fn epoch(&self, p: &Partition) -> u64 {
        self.lock().assigned.get(p).copied().unwrap_or(0)
    }

    /// The greatest epoch handed out so far: every later assignment gets a greater one.
    pub fn latest_epoch(&self) -> u64 {
        self.lock().next_epoch
    }

    /// Whether `p` is assigned to this worker now.
    pub fn is_assigned(&self, p: &Partition) -> bool {
        self.lock().assigned.contains_key(p)
    }

    /// A record taken for processing, received under assignment `epoch`. Returns the epoch
    /// it is tracked under (to give [`Self::finished`]), or `None` when the partition has
    /// been revoked since the record arrived: drop the record, its partition's new owner (or
    /// this worker, when the partition comes back) reads it again from the committed position.
    ///
    /// Epoch 0 means the partition was not in the ledger when the record arrived (its
    /// assignment was dropped by a rebalance error while librdkafka kept fetching it). Such
    /// a record is taken under whatever assignment holds now: dropping it while the
    /// partition stays here would lose it (nothing would deliver it again, and later records
    /// would carry the position past it); taking it at worst repeats work, as a record
    /// delivered again after the assignment is tracked twice.
    pub fn received(&self, p: &Partition, offset: i64, epoch: u64) -> Option<u64> {
        let mut s = self.lock();
        let current = s.assigned.get(p).copied().unwrap_or(0);
        if current != epoch && epoch != 0 {
            return None;
        }
        if s.tracking.get(p).is_some_and(|&e| e != current) {
            // Records of an earlier assignment are still tracked: that assignment is over.
            s.forget(p);
        }
        s.tracking.insert(p.clone(), current);
        if !s.tracker.received(p, offset) {
            tracing::info!(topic = %p.topic, partition = p.partition, offset, "record delivered again (the consumer rewound): the position waits for it");
        }
        Some(current)
    }

    /// A record of assignment `epoch` is done: `acked` when its verdict (and dead letter)
    /// was acknowledged by the broker. When the partition's position moves, `store` is
    /// called with it, under the lock, so concurrent completions store in order.
    pub fn finished(
        &self,
        p: &Partition,
        offset: i64,
        epoch: u64,
        acked: bool,
        store: impl FnOnce(i64),
    ) {
        let mut s = self.lock();
        if acked && s.tracking.get(p) == Some(&epoch) {
            if let Some(position) = s.tracker.completed(p, offset) {
                store(position);
            }
        }
        // Not acknowledged (shutting down): it stays in flight, and nothing past it is stored.
        drop(s);
        self.changed.notify_all();
    }

    /// `partitions` are being revoked: wait until none of them has a record in flight, or
    /// `bound` passes. Then forget them and return their final positions (already stored by
    /// [`Self::finished`]) and how many records were still in flight.
    pub fn revoke(
        &self,
        partitions: &[Partition],
        bound: Duration,
    ) -> (Vec<(Partition, i64)>, usize) {
        let deadline = Instant::now() + bound;
        let mut s = self.lock();
        // Records not yet taken are dropped by their epoch from now on.
        for p in partitions {
            s.assigned.remove(p);
        }
        loop {
            let busy: usize = partitions.iter().map(|p| s.tracker.in_flight(p)).sum();
            let now = Instant::now();
            if busy == 0 || now >= deadline {
                let positions = partitions
                    .iter()
                    .filter_map(|p| s.forget(p).map(|pos| (p.clone(), pos)))
                    .collect();
                return (positions, busy);
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn total_in_flight(&self) -> usize {
        self.lock().tracker.total_in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn p(n: i32) -> Partition {
        Partition::new("t", n)
    }

    #[test]
    fn revoke_waits_for_in_flight_records_of_the_revoked_partitions_only() {
        let ledger = Arc::new(Ledger::new());
        ledger.assigned(&[p(0), p(1)]);
        let (e0, e1) = (ledger.epoch(&p(0)), ledger.epoch(&p(1)));
        assert!(ledger.received(&p(0), 10, e0).is_some());
        assert!(ledger.received(&p(0), 11, e0).is_some());
        assert!(ledger.received(&p(1), 5, e1).is_some());
        let worker = {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut stored = Vec::new();
                ledger.finished(&p(0), 11, e0, true, |pos| stored.push(pos));
                ledger.finished(&p(0), 10, e0, true, |pos| stored.push(pos));
                stored
            })
        };
        let (positions, busy) = ledger.revoke(&[p(0)], Duration::from_secs(10));
        assert_eq!(
            worker.join().unwrap(),
            vec![12],
            "10 held 11 back, then both count"
        );
        assert_eq!(positions, vec![(p(0), 12)]);
        assert_eq!(busy, 0);
        // Partition 1 is untouched; a record of partition 0 from before is refused.
        assert_eq!(ledger.total_in_flight(), 1);
        assert!(ledger.received(&p(0), 12, e0).is_none());
    }

    #[test]
    fn revoke_gives_up_after_the_bound_and_reports_what_was_left() {
        let ledger = Ledger::new();
        ledger.assigned(&[p(0)]);
        let e = ledger.epoch(&p(0));
        assert!(ledger.received(&p(0), 3, e).is_some());
        assert!(ledger.received(&p(0), 4, e).is_some());
        ledger.finished(&p(0), 4, e, true, |_| {
            panic!("3 is not done: nothing to store")
        });
        let (positions, busy) = ledger.revoke(&[p(0)], Duration::from_millis(20));
        assert_eq!(busy, 1);
        assert_eq!(
            positions,
            vec![(p(0), 3)],
            "never past the record still in flight"
        );
        // A late completion of a forgotten partition stores nothing.
        ledger.finished(&p(0), 3, e, true, |_| panic!("revoked"));
    }

    #[test]
    fn a_straggler_of_an_earlier_assignment_does_not_resolve_the_same_offset_now() {
        // The drain bound ran out with 7 in flight; the partition came back and 7 is being
        // processed again when the first copy finally finishes.
        let ledger = Ledger::new();
        ledger.assigned(&[p(0)]);
        let old = ledger.epoch(&p(0));
        assert!(ledger.received(&p(0), 7, old).is_some());
        ledger.revoke(&[p(0)], Duration::ZERO);
        ledger.assigned(&[p(0)]);
        let new = ledger.epoch(&p(0));
        assert!(ledger.received(&p(0), 7, new).is_some());
        assert!(ledger.received(&p(0), 8, new).is_some());
        ledger.finished(&p(0), 7, old, true, |pos| {
            panic!("the old copy stored {pos} past the running new one")
        });
        assert_eq!(ledger.total_in_flight(), 2);
        let mut stored = None;
        ledger.finished(&p(0), 8, new, true, |_| panic!("7 is still running"));
        ledger.finished(&p(0), 7, new, true, |pos| stored = Some(pos));
        assert_eq!(stored, Some(9));
    }

    #[test]
    fn an_assignment_given_again_without_a_revocation_is_tracked_afresh() {
        // A rebalance error drops the assignment without our revocation callback; the
        // partition comes back and the consumer starts over from the last commit (5), below
        // offsets already seen (up to 9): no assertion, no position from the old records.
        let ledger = Ledger::new();
        ledger.assigned(&[p(0)]);
        let old = ledger.epoch(&p(0));
        for o in 5..10 {
            assert!(ledger.received(&p(0), o, old).is_some());
        }
        ledger.assigned(&[p(0)]);
        let new = ledger.epoch(&p(0));
        assert_eq!(
            ledger.total_in_flight(),
            0,
            "the old records no longer count"
        );
        let mut stored = Vec::new();
        for o in 5..7 {
            assert!(ledger.received(&p(0), o, new).is_some());
        }
        ledger.finished(&p(0), 9, old, true, |pos| stored.push(pos));
        ledger.finished(&p(0), 5, new, true, |pos| stored.push(pos));
        assert_eq!(stored, vec![6]);
    }

    #[test]
    fn a_record_that_arrived_while_unassigned_is_taken_under_the_assignment_that_followed() {
        // A rebalance error dropped the ledger's assignment while librdkafka kept fetching:
        // records arrive with epoch 0 and wait for a slot; the partition is assigned again
        // before they start. Dropping them lost them (the partition stayed here, nothing
        // delivered them again, and the next records carried the position past them).
        let ledger = Ledger::new();
        ledger.assigned(&[p(0)]);
        ledger.lost_all();
        assert_eq!(ledger.epoch(&p(0)), 0);
        ledger.assigned(&[p(0)]);
        let now = ledger.epoch(&p(0));
        assert_eq!(ledger.received(&p(0), 10, 0), Some(now));
        assert_eq!(ledger.received(&p(0), 11, now), Some(now));
        let mut stored = Vec::new();
        ledger.finished(&p(0), 11, now, true, |pos| stored.push(pos));
        assert!(stored.is_empty(), "10 is still running");
        ledger.finished(&p(0), 10, now, true, |pos| stored.push(pos));
        assert_eq!(stored, vec![12]);
        // A record of an assignment that ended is still dropped.
        ledger.revoke(&[p(0)], Duration::ZERO);
        ledger.assigned(&[p(0)]);
        assert_eq!(ledger.received(&p(0), 12, now), None);
    }

    #[test]
    fn losing_every_partition_forgets_them_and_wakes_a_waiting_revocation() {
        let ledger = Ledger::new();
        ledger.assigned(&[p(0), p(1)]);
        assert!(ledger.received(&p(1), 3, ledger.epoch(&p(1))).is_some());
        let mut lost = ledger.lost_all();
        lost.sort();
        assert_eq!(lost, vec![p(0), p(1)]);
        assert_eq!(ledger.total_in_flight(), 0);
        assert!(!ledger.is_assigned(&p(0)));
    }

    #[test]
    fn a_partition_assigned_again_starts_a_new_epoch() {
        let ledger = Ledger::new();
        ledger.assigned(&[p(0)]);
        let old = ledger.epoch(&p(0));
        ledger.revoke(&[p(0)], Duration::ZERO);
        ledger.assigned(&[p(0)]);
        assert_ne!(ledger.epoch(&p(0)), old);
        assert!(ledger.received(&p(0), 1, old).is_none());
        assert!(ledger.received(&p(0), 1, ledger.epoch(&p(0))).is_some());
    }
}
