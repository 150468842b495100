//! The batch stage: the dynamic batcher in front of the model thread.
//!
//! Guarantee: a batch closes when it holds `max_size` items or when `max_delay` has passed
//! since its **first** item, whichever comes first: a lone request waits at most
//! `max_delay`, and under load the model gets full batches. It closes **at once** when
//! nothing more is queued and the model has no batch to work on ([`next_batch_when`]'s
//! `idle`): waiting then could only add latency, because nothing would run meanwhile; while
//! the model works, requests gather into the next batch, so batches grow with the load
//! (continuous batching, as text-embeddings-inference forms its batches). The queue in front
//! is a bounded channel, so a slow model pushes back on the producers instead of growing
//! memory.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most images (views) per model call.
    pub max_size: usize,
    /// A batch closes this long after its first image at the latest, full or not.
    pub max_delay_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        // 32 × 224² images keep a GPU busy with ViT-B/32; 5 ms is well under a camera's cycle.
        Self {
            max_size: 32,
            max_delay_ms: 5,
        }
    }
}

impl BatchConfig {
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay_ms)
    }
}

/// Wait for the next batch. `None` once the channel is closed and drained.
pub async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, cfg: &BatchConfig) -> Option<Vec<T>> {
    next_batch_when(rx, cfg, || false).await
}

/// [`next_batch`], closing at once when the queue holds nothing more and `idle()` says the
/// model has nothing to do.
pub async fn next_batch_when<T>(
    rx: &mut mpsc::Receiver<T>,
    cfg: &BatchConfig,
    idle: impl Fn() -> bool,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let deadline = Instant::now() + cfg.max_delay();
    let mut batch = Vec::with_capacity(cfg.max_size.max(1));
    batch.push(first);
    while batch.len() < cfg.max_size {
        // What is queued already joins without waiting.
        match rx.try_recv() {
            Ok(item) => {
                batch.push(item);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if idle() => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            // Closed (drain what we have) or the first item's delay is up.
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_size: usize, max_delay_ms: u64) -> BatchConfig {
        BatchConfig {
            max_size,
            max_delay_ms,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closes_when_full_without_waiting() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        let start = Instant::now();
        assert_eq!(
            next_batch(&mut rx, &cfg(4, 1000)).await.unwrap(),
            [0, 1, 2, 3]
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_max_delay_after_the_first_item() {
        let (tx, mut rx) = mpsc::channel(16);
        let producer = tokio::spawn(async move {
            tx.send(1).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await; // past the 50 ms delay
            tx.send(3).await.unwrap();
        });
        let start = Instant::now();
        assert_eq!(next_batch(&mut rx, &cfg(8, 50)).await.unwrap(), [1, 2]);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(50),
            "counted from the first item"
        );
        assert_eq!(next_batch(&mut rx, &cfg(8, 50)).await.unwrap(), [3]);
        producer.await.unwrap();
        assert_eq!(
            next_batch(&mut rx, &cfg(8, 50)).await,
            None,
            "closed and drained"
        );
    }

    /// With the model idle a batch closes as soon as the queue is empty (taking what was
    /// queued), however long `max_delay`; with the model busy it waits for `max_delay`.
    #[tokio::test(start_paused = true)]
    async fn an_idle_model_gets_the_batch_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..3 {
            tx.send(i).await.unwrap();
        }
        let start = Instant::now();
        let got = next_batch_when(&mut rx, &cfg(8, 1000), || true).await;
        assert_eq!(got.unwrap(), [0, 1, 2]);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "no wait with the model idle"
        );
        tx.send(3).await.unwrap();
        let got = next_batch_when(&mut rx, &cfg(8, 1000), || false).await;
        assert_eq!(got.unwrap(), [3]);
        assert_eq!(start.elapsed(), Duration::from_secs(1), "busy: max_delay");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_queue_does_not_start_the_clock() {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(7).await.unwrap();
            tx.send(8).await.unwrap();
        });
        let start = Instant::now();
        assert_eq!(next_batch(&mut rx, &cfg(8, 10)).await.unwrap(), [7, 8]);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "the channel closed right after 8"
        );
    }
}
