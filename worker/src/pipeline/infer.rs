//! The batch → model hop: gathers preprocessed images into batches for the model thread and
//! hands each image its embedding back.
//!
//! Guarantees: the next batch is formed while the model runs this one; a failed batch fails
//! only its own images, unless the model is broken (its thread stopped, it answered with the
//! wrong number of embeddings, or `max_model_failures` batches in a row failed): then `fatal` fires and every waiting image
//! gets [`Embedded::Broken`], so no record is turned into an error verdict for the model's
//! fault; the worker drains and exits instead, leaving those offsets uncommitted.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{next_batch, BatchConfig};
use crate::metrics;
use crate::model::{ImageBatch, ModelError, ModelHandle};

/// What an image gets back from the model.
pub enum Embedded {
    Ok(Vec<f32>),
    /// This batch failed; the record gets an ERROR verdict.
    Failed(String),
    /// The model is broken: the record is left for a healthy worker.
    Broken,
}

pub struct BatchItem {
    pub pixels: Vec<f32>,
    /// When it was handed to the batcher (for the queue-wait metric).
    pub queued: std::time::Instant,
    pub reply: oneshot::Sender<Embedded>,
}

/// Why the worker cannot go on (the model broke, the batcher died, the dead-letter topic
/// refuses records), for its exit.
#[derive(Default)]
pub struct Fatal {
    pub token: CancellationToken,
    pub reason: Mutex<Option<String>>,
}

impl Fatal {
    /// The first reason wins; `reason` is a whole sentence for the exit message.
    pub fn declare(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            tracing::error!(reason, "draining and stopping the worker");
            *r = Some(reason);
        }
        self.token.cancel();
    }
}

pub async fn batch_loop(
    mut rx: mpsc::Receiver<BatchItem>,
    cfg: BatchConfig,
    model: ModelHandle,
    size: usize,
    max_failures: u32,
    fatal: Arc<Fatal>,
) {
    let failures = Arc::new(AtomicU32::new(0));
    while let Some(items) = next_batch(&mut rx, &cfg).await {
        let mut batch = ImageBatch::new(size);
        let mut replies = Vec::with_capacity(items.len());
        metrics::batch(items.len(), cfg.max_size);
        for item in items {
            metrics::stage("queue_wait", item.queued.elapsed().as_secs_f64());
            batch.push(&item.pixels);
            replies.push(item.reply);
        }
        if fatal.token.is_cancelled() {
            for reply in replies {
                let _ = reply.send(Embedded::Broken);
            }
            continue;
        }
        // Blocks only while the model thread's bounded queue is full: that is the back-pressure.
        let submitted = tokio::task::block_in_place(|| model.submit_images(batch));
        let (failures, fatal) = (failures.clone(), fatal.clone());
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let result = match submitted {
                Ok(rx) => rx.await.unwrap_or(Err(ModelError::Stopped)),
                Err(e) => Err(e),
            };
            // A backend that answers with the wrong number of rows is broken: no image of
            // the batch can be told its own embedding (and indexing past the end would
            // panic this task, leaving every record of the batch waiting forever).
            let result = result.and_then(|e| {
                if e.n == replies.len() {
                    Ok(e)
                } else {
                    Err(ModelError::WrongRows {
                        got: e.n,
                        expected: replies.len(),
                    })
                }
            });
            match result {
                Ok(embeddings) => {
                    metrics::stage("inference", started.elapsed().as_secs_f64());
                    failures.store(0, Ordering::Relaxed);
                    for (i, reply) in replies.into_iter().enumerate() {
                        let _ = reply.send(Embedded::Ok(embeddings.row(i).to_vec()));
                    }
                }
                Err(e) => {
                    metrics::model_batch_failed();
                    let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let broken = matches!(e, ModelError::Stopped | ModelError::WrongRows { .. })
                        || n >= max_failures;
                    if broken {
                        fatal.declare(format!(
                            "the model is broken: {e} ({n} failed batches in a row)"
                        ));
                    } else {
                        tracing::warn!(error = %e, failed_in_a_row = n, "model batch failed");
                    }
                    for reply in replies {
                        let _ = reply.send(if broken {
                            Embedded::Broken
                        } else {
                            Embedded::Failed(e.to_string())
                        });
                    }
                }
            }
        });
    }
}
