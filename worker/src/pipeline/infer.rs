//! The batch → model hop: gathers preprocessed images into batches for the model thread and
//! hands each image its embedding back.
//!
//! Guarantees: the next batch is formed while the model runs this one; a failed batch is
//! split in halves, and failing halves again, so only the images that fail on their own get
//! an error (one CUDA out-of-memory does not fail a whole batch of healthy records), unless
//! the model is broken (its thread stopped, it answered with the wrong number of
//! embeddings, or every image failed in `max_model_failures` batches in a row): then `fatal`
//! fires and every waiting image gets [`Embedded::Broken`], so no record is turned into an
//! error verdict for the model's fault; the worker drains and exits instead, leaving those
//! offsets uncommitted.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{next_batch_when, BatchConfig};
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

/// One view's pixels: CHW floats on the host (the CPU path), or a `3×S×S` tensor where the
/// device preprocessing path made it (the model's device), which reaches the model's batch
/// without a trip through host memory.
pub enum Pixels {
    Host(Vec<f32>),
    Device(tch::Tensor),
}

pub struct BatchItem {
    pub pixels: Pixels,
    /// When it was handed to the batcher (for the queue-wait metric).
    pub queued: std::time::Instant,
    pub reply: oneshot::Sender<Embedded>,
}

/// Why the worker cannot go on (the model broke, the batcher died, the dead-letter topic
/// refuses records), for its exit.
#[derive(Default)]
pub struct Fatal {
    pub token: CancellationToken,
    pub reason: Mutex<Option<super::RunError>>,
}

impl Fatal {
    /// The first reason wins.
    pub fn declare(&self, reason: super::RunError) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            tracing::error!(reason = %reason, "draining and stopping the worker");
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
    // Batches submitted and not yet answered: none means the model has nothing to do, and a
    // batch closes without waiting for more (see `batch`).
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let idle = {
        let running = running.clone();
        move || running.load(Ordering::Acquire) == 0
    };
    while let Some(items) = next_batch_when(&mut rx, &cfg, &idle).await {
        metrics::batch(items.len(), cfg.max_size);
        let mut pixels = Vec::with_capacity(items.len());
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            metrics::stage("queue_wait", item.queued.elapsed().as_secs_f64());
            pixels.push(item.pixels);
            replies.push(item.reply);
        }
        if fatal.token.is_cancelled() {
            for reply in replies {
                let _ = reply.send(Embedded::Broken);
            }
            continue;
        }
        // Waits only while the model thread's bounded queue is full: that is the back-pressure.
        let job = prepare(size, &pixels);
        let in_model = Running::start(&running);
        let submitted = submit(&model, job).await;
        let (failures, fatal, model) = (failures.clone(), fatal.clone(), model.clone());
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let first = answer(submitted, pixels.len()).await;
            drop(in_model);
            let answers = match first {
                Ok(embeddings) => {
                    metrics::stage("inference", started.elapsed().as_secs_f64());
                    (0..pixels.len())
                        .map(|i| Ok(embeddings.row(i).to_vec()))
                        .collect()
                }
                Err(e) if is_broken(&e) => vec![Err(e); pixels.len()],
                // One failure may be the model's moment (a CUDA out-of-memory) or one image's
                // fault: halve the batch down to the images that fail on their own.
                Err(e) => bisect(&model, size, pixels, e, &fatal).await,
            };
            settle(answers, replies, &failures, max_failures, &fatal);
        });
    }
}

/// One batch counted as in the model from its submission to its answer (or its task's end,
/// however that comes).
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A batch for the model thread: host views as an [`ImageBatch`]; with any view from the
/// device path, one tensor on that device (host views uploaded to it).
enum Job {
    Images(ImageBatch),
    Tensor(tch::Tensor),
}

/// `pixels` as one batch. Not async: no borrow of the views is held across an await (a
/// tensor is `Send` but not `Sync`).
fn prepare(size: usize, pixels: &[Pixels]) -> Result<Job, ModelError> {
    let on = pixels.iter().find_map(|p| match p {
        Pixels::Device(t) => Some(t.device()),
        Pixels::Host(_) => None,
    });
    let Some(device) = on else {
        let mut batch = ImageBatch::new(size);
        for p in pixels {
            if let Pixels::Host(v) = p {
                batch.push(v);
            }
        }
        return Ok(Job::Images(batch));
    };
    let s = size as i64;
    let rows: Vec<tch::Tensor> = pixels
        .iter()
        .map(|p| match p {
            Pixels::Host(v) => tch::Tensor::from_slice(v).view([3, s, s]).to_device(device),
            Pixels::Device(t) => t.shallow_clone(),
        })
        .collect();
    tch::Tensor::f_stack(&rows, 0)
        .map(Job::Tensor)
        .map_err(|e| ModelError::Inference(format!("cannot batch the device path's views: {e}")))
}

async fn submit(
    model: &ModelHandle,
    job: Result<Job, ModelError>,
) -> Result<oneshot::Receiver<Result<crate::model::Embeddings, ModelError>>, ModelError> {
    match job? {
        Job::Images(batch) => model.submit_images_async(batch).await,
        Job::Tensor(batch) => model.submit_tensor_async(batch).await,
    }
}

/// The model's answer to a submitted batch of `n` images.
async fn answer(
    submitted: Result<
        tokio::sync::oneshot::Receiver<Result<crate::model::Embeddings, ModelError>>,
        ModelError,
    >,
    n: usize,
) -> Result<crate::model::Embeddings, ModelError> {
    let result = match submitted {
        Ok(rx) => rx.await.unwrap_or(Err(ModelError::Stopped)),
        Err(e) => Err(e),
    };
    // A backend that answers with the wrong number of rows is broken: no image of the batch
    // can be told its own embedding (and indexing past the end would panic this task,
    // leaving every record of the batch waiting forever).
    result.and_then(|e| {
        if e.n == n {
            Ok(e)
        } else {
            Err(ModelError::WrongRows {
                got: e.n,
                expected: n,
            })
        }
    })
}

/// Errors that say the model itself is gone, whatever the images.
fn is_broken(e: &ModelError) -> bool {
    matches!(e, ModelError::Stopped | ModelError::WrongRows { .. })
}

/// A failed batch split in halves, and the halves that fail split again, down to single
/// images: each image gets its embedding, or the error its own one-image batch got. Stops
/// splitting (every image left gets the error) when the model turns out broken.
async fn bisect(
    model: &ModelHandle,
    size: usize,
    pixels: Vec<Pixels>,
    error: ModelError,
    fatal: &Fatal,
) -> Vec<Result<Vec<f32>, ModelError>> {
    let n = pixels.len();
    if n == 1 && !is_broken(&error) && !fatal.token.is_cancelled() {
        // Nothing to split: one more try alone.
        let job = prepare(size, &pixels);
        let submitted = submit(model, job).await;
        return vec![answer(submitted, 1).await.map(|e| e.row(0).to_vec())];
    }
    let mut answers: Vec<Option<Result<Vec<f32>, ModelError>>> = vec![None; n];
    let mut ranges = vec![(0, n, error)];
    while let Some((from, to, e)) = ranges.pop() {
        if to - from == 1 || is_broken(&e) || fatal.token.is_cancelled() {
            for a in &mut answers[from..to] {
                *a = Some(Err(e.clone()));
            }
            continue;
        }
        let mid = from + (to - from) / 2;
        for (a, b) in [(from, mid), (mid, to)] {
            let job = prepare(size, &pixels[a..b]);
            let submitted = submit(model, job).await;
            match answer(submitted, b - a).await {
                Ok(embeddings) => {
                    for (row, slot) in answers[a..b].iter_mut().enumerate() {
                        *slot = Some(Ok(embeddings.row(row).to_vec()));
                    }
                }
                Err(e) => ranges.push((a, b, e)),
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.expect("every image of a bisected batch is answered. This is a bug."))
        .collect()
}

/// Hand each image its answer. Images that failed alone are the records' own errors
/// (ERROR verdicts), unless the model is broken: it stopped, answered with the wrong
/// number of rows, or every image failed in `max_failures` batches in a row; then every
/// failed image gets [`Embedded::Broken`] and the worker stops.
fn settle(
    answers: Vec<Result<Vec<f32>, ModelError>>,
    replies: Vec<oneshot::Sender<Embedded>>,
    failures: &AtomicU32,
    max_failures: u32,
    fatal: &Fatal,
) {
    let first_error = answers.iter().find_map(|a| a.as_ref().err()).cloned();
    let broken = match &first_error {
        None => {
            failures.store(0, Ordering::Relaxed);
            false
        }
        Some(e) => {
            metrics::model_batch_failed();
            let any_ok = answers.iter().any(Result::is_ok);
            let n = if any_ok {
                // The model works: the failures are the images'.
                failures.store(0, Ordering::Relaxed);
                0
            } else {
                failures.fetch_add(1, Ordering::Relaxed) + 1
            };
            let broken = is_broken(e) || n >= max_failures;
            if broken {
                fatal.declare(super::RunError::ModelBroken(format!(
                    "{e} ({n} failed batches in a row)"
                )));
            } else {
                tracing::warn!(error = %e, failed_in_a_row = n, "model batch failed");
            }
            broken
        }
    };
    for (answer, reply) in answers.into_iter().zip(replies) {
        let _ = reply.send(match answer {
            Ok(embedding) => Embedded::Ok(embedding),
            Err(_) if broken => Embedded::Broken,
            Err(e) => Embedded::Failed(e.to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fake::FakeBackend;
    use crate::model::Backend;

    /// Views from both paths in one batch: one tensor, in order, with the host views' pixels
    /// unchanged; the model's embeddings of it are those of the same pixels as host views.
    #[test]
    fn a_batch_mixing_host_and_device_views_is_one_tensor_in_order() {
        let size = 4;
        let view = |v: f32| {
            (0..3 * size * size)
                .map(|i| v + i as f32)
                .collect::<Vec<f32>>()
        };
        let (a, b, c) = (view(0.0), view(100.0), view(200.0));
        let on_device = tch::Tensor::from_slice(&b).view([3, size as i64, size as i64]);
        let pixels = [
            Pixels::Host(a.clone()),
            Pixels::Device(on_device),
            Pixels::Host(c.clone()),
        ];
        let Ok(Job::Tensor(batch)) = prepare(size, &pixels) else {
            panic!("a device view makes a tensor batch");
        };
        assert_eq!(batch.size(), [3, 3, size as i64, size as i64]);
        let flat = Vec::<f32>::try_from(&batch.view(-1)).unwrap();
        assert_eq!(flat, [a.clone(), b.clone(), c.clone()].concat());

        let mut fake = FakeBackend::new(8, size);
        let from_tensor = fake.embed_tensor(&batch).unwrap();
        let Ok(Job::Images(host)) =
            prepare(size, &[Pixels::Host(a), Pixels::Host(b), Pixels::Host(c)])
        else {
            panic!("host views make an ImageBatch");
        };
        assert_eq!(from_tensor.data, fake.embed_images(&host).unwrap().data);
    }
}
