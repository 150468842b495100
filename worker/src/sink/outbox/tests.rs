use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::offsets::OffsetTracker;

fn p(n: i32) -> Partition {
    Partition::new("requests", n)
}

/// The verdict of input offset `offset`: its payload names the offset.
fn staged(offset: i64) -> Staged {
    let record = |what: &str| OwnedRecord {
        topic: "verdicts".into(),
        key: None,
        payload: format!("{what} {offset}").into_bytes(),
        headers: Vec::new(),
    };
    Staged {
        records: vec![record("verdict")],
        fallback: vec![record("small")],
        on_fallback: false,
        hold: None,
    }
}

fn offsets(batch: &Batch, n: i32) -> Vec<i64> {
    batch
        .parts
        .iter()
        .filter(|b| b.partition == p(n))
        .flat_map(|b| b.records.iter().map(|(o, _)| *o))
        .collect()
}

#[test]
fn a_transaction_takes_the_done_prefix_and_later_records_wait() {
    let mut outbox = Outbox::new();
    // Offsets 10, 12 and 13 finished; 11 is still running: the position stays at 11.
    for o in [10, 12, 13] {
        outbox.stage(&p(0), 1, o, staged(o));
    }
    outbox.advance(&p(0), 1, 11);
    let batch = outbox.take(None);
    assert_eq!(offsets(&batch, 0), [10]);
    assert_eq!(batch.parts[0].position, 11);
    outbox.committed(&batch);
    assert!(outbox.take(None).is_empty(), "nothing new is done");
    outbox.stage(&p(0), 1, 11, staged(11));
    outbox.advance(&p(0), 1, 14);
    let batch = outbox.take(None);
    assert_eq!(offsets(&batch, 0), [11, 12, 13]);
    assert_eq!(batch.parts[0].position, 14);
}

#[test]
fn a_failed_transaction_puts_its_records_back_and_a_committed_one_drops_late_copies() {
    let mut outbox = Outbox::new();
    for o in 0..3 {
        outbox.stage(&p(0), 1, o, staged(o));
    }
    outbox.advance(&p(0), 1, 3);
    let batch = outbox.take(None);
    outbox.restore(batch);
    let batch = outbox.take(None);
    assert_eq!(offsets(&batch, 0), [0, 1, 2]);
    // A copy of offset 1 (the consumer rewound) finishes while the transaction runs.
    outbox.stage(&p(0), 1, 1, staged(1));
    outbox.committed(&batch);
    assert_eq!(
        outbox.staged(),
        0,
        "offset 1 was answered by the transaction"
    );
    // And one that finishes after the commit is dropped at once.
    outbox.stage(&p(0), 1, 2, staged(2));
    assert_eq!(outbox.staged(), 0);
}

#[test]
fn a_partition_assigned_anew_starts_from_nothing_and_stragglers_are_dropped() {
    let mut outbox = Outbox::new();
    outbox.stage(&p(0), 1, 5, staged(5));
    outbox.advance(&p(0), 1, 6);
    // Revoked and assigned again (epoch 2) before a transaction took offset 5.
    outbox.forget(&p(0), 1);
    outbox.stage(&p(0), 2, 5, staged(5));
    outbox.stage(&p(0), 1, 6, staged(6)); // a straggler of the first assignment
    outbox.advance(&p(0), 1, 7);
    outbox.advance(&p(0), 2, 6);
    let batch = outbox.take(None);
    assert_eq!(offsets(&batch, 0), [5]);
    assert_eq!(batch.parts[0].position, 6);
    assert_eq!(batch.parts[0].epoch, 2);
}

/// A record of a revoked (or lost) partition that finishes after the revocation: before, its
/// stage re-created the partition at the old epoch, where no transaction would ever take it,
/// and its record slot (the hold) was never given back. Now it is dropped at once, slot and
/// all, whether or not the partition had staged anything before it left; the partition's next
/// assignment here starts as usual.
#[test]
fn a_record_finished_after_its_partition_left_is_dropped_and_gives_its_slot_back() {
    let slot = std::sync::Arc::new(());
    let held = |o: i64| Staged {
        hold: Some(Hold(Box::new(slot.clone()))),
        ..staged(o)
    };
    let mut outbox = Outbox::new();
    // p(0) had staged something when it left at epoch 3; p(1) had nothing (epoch 4).
    outbox.stage(&p(0), 3, 0, held(0));
    outbox.forget(&p(0), 4);
    outbox.forget(&p(1), 4);
    assert_eq!(
        std::sync::Arc::strong_count(&slot),
        1,
        "forget drops staged records"
    );
    for (n, epoch) in [(0, 3), (1, 4)] {
        outbox.stage(&p(n), epoch, 1, held(1));
        outbox.advance(&p(n), epoch, 2);
    }
    assert_eq!(outbox.staged(), 0, "stragglers are not staged");
    assert_eq!(
        std::sync::Arc::strong_count(&slot),
        1,
        "their slots are back"
    );
    assert!(
        outbox.take(None).is_empty(),
        "no transaction for a partition that left"
    );
    // Assigned here again (epoch 5): its records are taken as usual.
    outbox.stage(&p(1), 5, 7, staged(7));
    outbox.advance(&p(1), 5, 8);
    let batch = outbox.take(None);
    assert_eq!(offsets(&batch, 1), [7]);
    assert_eq!(batch.parts[0].epoch, 5);
}

#[test]
fn a_transaction_for_revoked_partitions_takes_only_those() {
    let mut outbox = Outbox::new();
    for n in 0..3 {
        outbox.stage(&p(n), 1, 0, staged(0));
        outbox.advance(&p(n), 1, 1);
    }
    let batch = outbox.take(Some(&[p(1)]));
    assert_eq!(batch.parts.len(), 1);
    assert_eq!(offsets(&batch, 1), [0]);
    assert_eq!(outbox.staged(), 2);
}

/// Kafka's transactions as a read_committed reader sees them: a transaction's records and
/// its input positions appear together when it commits, and never after an abort or a
/// crash of the worker that had it open.
#[derive(Default)]
struct Broker {
    visible: HashMap<Partition, Vec<i64>>,
    committed: HashMap<Partition, i64>,
}

/// A worker's state, all lost in a crash.
struct Worker {
    tracker: OffsetTracker,
    outbox: Outbox,
    in_flight: Vec<(Partition, i64)>,
    next: HashMap<Partition, i64>,
}

impl Worker {
    fn start(broker: &Broker, parts: &[Partition]) -> Self {
        Self {
            tracker: OffsetTracker::new(),
            outbox: Outbox::new(),
            in_flight: Vec::new(),
            next: parts
                .iter()
                .map(|q| (q.clone(), broker.committed.get(q).copied().unwrap_or(0)))
                .collect(),
        }
    }

    fn receive(&mut self, q: &Partition, offset: i64) {
        self.tracker.received(q, offset);
        self.in_flight.push((q.clone(), offset));
    }

    fn finish(&mut self, i: usize) {
        let (q, offset) = self.in_flight.swap_remove(i);
        self.outbox.stage(&q, 1, offset, staged(offset));
        if let Some(position) = self.tracker.completed(&q, offset) {
            self.outbox.advance(&q, 1, position);
        }
    }

    fn transaction(&mut self, broker: &mut Broker, fails: bool) {
        let batch = self.outbox.take(None);
        if fails {
            self.outbox.restore(batch);
            return;
        }
        for b in &batch.parts {
            let visible = broker.visible.entry(b.partition.clone()).or_default();
            for (offset, staged) in &b.records {
                assert_eq!(
                    staged.current()[0].payload,
                    format!("verdict {offset}").as_bytes()
                );
                visible.push(*offset);
            }
            broker.committed.insert(b.partition.clone(), b.position);
        }
        self.outbox.committed(&batch);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Records finish in any order, transactions fail, the consumer rewinds, the worker
    /// crashes at any point and starts over from the committed positions: in the end a
    /// read_committed reader has seen every input offset's verdict exactly once.
    #[test]
    fn crashes_at_any_point_leave_each_record_exactly_one_committed_verdict(
        ops in proptest::collection::vec(any::<u16>(), 0..400),
    ) {
        const RECORDS: i64 = 24;
        let parts = [p(0), p(1)];
        let mut broker = Broker::default();
        let mut w = Worker::start(&broker, &parts);
        for op in ops {
            let q = &parts[usize::from(op >> 8) % 2];
            match op % 8 {
                0..=2 => {
                    let next = w.next[q];
                    if next < RECORDS && w.in_flight.len() < 8 {
                        w.receive(q, next);
                        w.next.insert(q.clone(), next + 1);
                    }
                }
                3 | 4 if !w.in_flight.is_empty() => {
                    let i = usize::from(op >> 4) % w.in_flight.len();
                    w.finish(i);
                }
                5 => w.transaction(&mut broker, op & 0x100 != 0 && op & 0x200 != 0),
                6 => {
                    // The consumer rewinds to a position not committed yet.
                    let from = broker.committed.get(q).copied().unwrap_or(0);
                    let next = w.next[q];
                    if next > from && w.in_flight.len() < 8 {
                        let offset = from + i64::from(op >> 9) % (next - from);
                        w.receive(q, offset);
                    }
                }
                7 if op & 0x700 == 0 => w = Worker::start(&broker, &parts),
                _ => {}
            }
        }
        // Run to the end without faults.
        loop {
            while !w.in_flight.is_empty() {
                w.finish(0);
            }
            let mut received = false;
            for q in &parts {
                let next = w.next[q];
                if next < RECORDS {
                    w.receive(q, next);
                    w.next.insert(q.clone(), next + 1);
                    received = true;
                }
            }
            w.transaction(&mut broker, false);
            if !received && w.in_flight.is_empty() {
                break;
            }
        }
        w.transaction(&mut broker, false);
        for q in &parts {
            let seen = broker.visible.get(q).cloned().unwrap_or_default();
            let in_order = seen.windows(2).all(|w| w[0] < w[1]);
            prop_assert!(in_order, "{q:?}: verdicts out of offset order: {seen:?}");
            prop_assert_eq!(seen, (0..RECORDS).collect::<Vec<_>>(), "{:?}", q);
            prop_assert_eq!(broker.committed.get(q).copied(), Some(RECORDS));
        }
    }
}
