//! A record's acknowledgement: the value that resolves its offset in the ledger.
//!
//! Guarantee (as Vector's finalizers): it resolves exactly once, also when the record's task
//! never gets to say how it went. A task cancelled at shutdown drops it unresolved, which
//! counts as not acknowledged (the offset stays uncommitted and the record is processed
//! again), and still wakes a revocation waiting for the partition. Panics are caught before
//! they get here (see [`super::Intake::start`]) and become ERROR verdicts, so a panicking
//! record can never freeze its partition's position.
//!
//! Exactly-once: a record's verdict and dead letter are not published by its task but staged
//! for the next transaction, here, before its offset is counted done, so a transaction that
//! commits a position always holds the records of every offset below it.

use std::sync::Arc;

use rdkafka::consumer::Consumer;

use crate::offsets::{Ledger, Partition};
use crate::sink::outbox::Staged;
use crate::sink::transaction::Transactions;
use crate::source::{self, Source};

/// How a record's handling ended.
#[derive(Debug)]
pub enum Delivered {
    /// Its verdict (and dead letter) were acknowledged by the broker.
    Acknowledged,
    /// Nothing or not everything was published (the worker is stopping): the offset stays
    /// uncommitted and the record is processed again.
    NotAcknowledged,
    /// Exactly-once: what it publishes, for the next transaction.
    Staged(Staged),
}

pub struct Acknowledgement {
    ledger: Arc<Ledger>,
    consumer: Arc<Source>,
    /// Exactly-once delivery: positions and staged records go here, not to the consumer.
    transactions: Option<Arc<Transactions>>,
    partition: Partition,
    offset: i64,
    epoch: u64,
    delivered: Option<Delivered>,
}

impl Acknowledgement {
    pub fn new(
        ledger: Arc<Ledger>,
        consumer: Arc<Source>,
        transactions: Option<Arc<Transactions>>,
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
            transactions,
            partition,
            offset,
            epoch,
            delivered: None,
        }
    }

    /// The record is done.
    pub fn resolve(mut self, delivered: Delivered) {
        self.delivered = Some(delivered);
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
        let acked = match (self.delivered.take(), &self.transactions) {
            (Some(Delivered::Staged(staged)), Some(txn)) => {
                txn.stage(p, self.epoch, self.offset, staged);
                true
            }
            (Some(Delivered::Staged(_)), None) => {
                // Records are staged only with exactly-once delivery; never panic in a drop.
                tracing::error!(
                    "a record was staged without exactly-once delivery. This is a bug."
                );
                false
            }
            (Some(Delivered::Acknowledged), _) => true,
            (Some(Delivered::NotAcknowledged) | None, _) => false,
        };
        self.ledger
            .finished(p, self.offset, self.epoch, acked, |position| {
                if let Some(txn) = &self.transactions {
                    txn.advance(p, self.epoch, position);
                } else if let Err(e) =
                    source::store_position(consumer, &p.topic, p.partition, position)
                {
                    // Revoked meanwhile: the new owner resumes from the last commit (a
                    // duplicate, never a loss).
                    tracing::debug!(topic = %p.topic, partition = p.partition, error = %e, "store offset");
                }
            });
    }
}
