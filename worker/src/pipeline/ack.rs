//! A record's acknowledgement: the value that resolves its offset in the ledger.
//!
//! Guarantee (as Vector's finalizers): it resolves exactly once, also when the record's task
//! never gets to say how it went. A task cancelled at shutdown drops it unresolved, which
//! counts as not acknowledged (the offset stays uncommitted and the record is processed
//! again), and still wakes a revocation waiting for the partition. Panics are caught before
//! they get here (see [`super::Intake::start`]) and become ERROR verdicts, so a panicking
//! record can never freeze its partition's position.

use std::sync::Arc;

use rdkafka::consumer::Consumer;

use crate::offsets::{Ledger, Partition};
use crate::source::{self, Source};

pub struct Acknowledgement {
    ledger: Arc<Ledger>,
    consumer: Arc<Source>,
    partition: Partition,
    offset: i64,
    epoch: u64,
    acked: bool,
}

impl Acknowledgement {
    pub fn new(
        ledger: Arc<Ledger>,
        consumer: Arc<Source>,
        partition: Partition,
        offset: i64,
        epoch: u64,
    ) -> Self {
        consumer
            .context()
            .readiness
            .progress
            .started(std::time::Instant::now());
        Self {
            ledger,
            consumer,
            partition,
            offset,
            epoch,
            acked: false,
        }
    }

    /// The record is done; `acked`: its verdict (and dead letter) were acknowledged.
    pub fn resolve(mut self, acked: bool) {
        self.acked = acked;
    }
}

impl Drop for Acknowledgement {
    fn drop(&mut self) {
        self.consumer
            .context()
            .readiness
            .progress
            .finished(std::time::Instant::now());
        let (p, consumer) = (&self.partition, &self.consumer);
        self.ledger
            .finished(p, self.offset, self.epoch, self.acked, |position| {
                if let Err(e) = source::store_position(consumer, &p.topic, p.partition, position) {
                    // Revoked meanwhile: the new owner resumes from the last commit (a
                    // duplicate, never a loss).
                    tracing::debug!(topic = %p.topic, partition = p.partition, error = %e, "store offset");
                }
            });
    }
}
