//! The exactly-once committer: turns what the record tasks staged into transactions.
//!
//! Guarantees: a transaction every `kafka.transaction_interval_ms` while records wait, and at
//! once again while they hold half the record slots (the intake waits on them); a failure
//! that every later transaction would meet too (fenced, unsupported, a topic refusing even a
//! small verdict) stops the worker; the drain ends with one last transaction. The work is
//! blocking (librdkafka's transactional calls wait for the broker), so it runs on the
//! blocking pool, never on a runtime worker.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::sync::Semaphore;

use super::infer::Fatal;
use crate::sink::transaction::{Transactions, TxnError};
use crate::source::Source;

/// One transaction of whatever is done, off the runtime. Returns the records answered.
/// While it waits longer than a step's bound (`kafka.transaction_call_timeout_ms`: a broker
/// that stopped answering), the transaction shows as stalled.
async fn commit(txn: &Arc<Transactions>, consumer: &Arc<Source>) -> Result<usize, TxnError> {
    let (committer, consumer) = (txn.clone(), consumer.clone());
    let mut task =
        tokio::task::spawn_blocking(move || committer.commit(None, || consumer.group_metadata()));
    let mut flagged = false;
    let started = std::time::Instant::now();
    let mut said = 0u32;
    let joined = loop {
        tokio::select! {
            joined = &mut task => break joined,
            () = tokio::time::sleep(txn.call_timeout()) => {
                if !flagged {
                    tracing::warn!(bound = ?txn.call_timeout(), "a transaction has waited for the broker longer than a step's bound: stalled");
                    txn.stalled(true);
                    flagged = true;
                }
                // Said again every 30 s or so while it lasts, so a call that never returns
                // shows in the log as one, not as silence.
                let secs = started.elapsed().as_secs();
                if secs / 30 > u64::from(said) {
                    said += 1;
                    tracing::warn!(waited_s = secs, "a transaction is still waiting for the broker");
                }
            }
        }
    };
    if flagged {
        txn.stalled(false);
    }
    joined.unwrap_or_else(|e| {
        let why = if e.is_panic() {
            super::panic_message(e.into_panic().as_ref())
        } else {
            "cancelled (the runtime is shutting down)".into()
        };
        Err(TxnError::Fenced {
            id: String::new(),
            detail: format!("the transaction committer stopped: {why}"),
        })
    })
}

pub async fn commit_loop(
    txn: Arc<Transactions>,
    consumer: Arc<Source>,
    interval: Duration,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    fatal: Arc<Fatal>,
) {
    let mut answered = 0;
    loop {
        let scarce = slots.available_permits() < max_in_flight.div_ceil(2);
        if !(scarce && answered > 0) {
            tokio::time::sleep(interval).await;
        }
        if txn.staged() == 0 {
            answered = 0;
            continue;
        }
        match commit(&txn, &consumer).await {
            Ok(n) => answered = n,
            Err(e) if e.is_fatal() => {
                fatal.declare(e.into());
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, staged = txn.staged(), "transaction failed; its records wait for the next one");
                answered = 0;
            }
        }
    }
}

/// The drain's last transaction: what finished is committed; what could not be (a record
/// before it never finished) is processed again by the partition's next owner.
pub async fn final_commit(txn: &Arc<Transactions>, consumer: &Arc<Source>, fatal: &Fatal) {
    match commit(txn, consumer).await {
        Ok(n) => tracing::info!(answered = n, "last transaction committed"),
        Err(e) => {
            tracing::warn!(error = %e, "last transaction not committed: its records are processed again after a restart");
            if e.is_fatal() {
                fatal.declare(e.into());
            }
        }
    }
    let left = txn.staged();
    if left > 0 {
        tracing::info!(
            left,
            "records finished behind one that did not: processed again after a restart"
        );
    }
}
