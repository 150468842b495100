//! The one OS thread that owns the backend.
//!
//! libtorch modules are not meant to be shared across threads, and a GPU is best fed from one
//! place, so the backend is built on this thread and never leaves it. Work arrives through a
//! bounded channel (a full channel makes callers wait: back-pressure, not a growing queue),
//! which async callers wait on with `.await` (no blocking of a runtime worker) and blocking
//! callers with a blocking send; each job carries a one-shot channel for its answer, usable
//! from blocking and async code.
//!
//! Guarantees: image jobs run in arrival order; a text job (a profile's prompts, built at
//! start or when a profile changes while running: rare and small) goes ahead of the image
//! jobs waiting, so it waits for at most the batch the thread is running, even while the
//! batcher keeps the queue full; the thread stops when every [`ModelHandle`] is dropped,
//! after finishing the jobs already queued; a backend that fails to load is
//! reported by [`ModelOwner::spawn`] and no handle is ever returned for it.

use std::marker::PhantomData;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Backend, Embeddings, ImageBatch, ModelError, TokenBatch};

type Reply = oneshot::Sender<Result<Embeddings, ModelError>>;

enum Job {
    Images(ImageBatch, Reply),
    /// Images already in one `n×3×S×S` tensor (the device preprocessing path's).
    Tensor(tch::Tensor, Reply),
    Texts(TokenBatch, Reply),
    /// Wakes an idle thread to take the text jobs waiting.
    Wake,
}

/// A cheap, cloneable way to submit work to the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    jobs: tokio::sync::mpsc::Sender<Job>,
    /// Text jobs, taken before the next image job: a sender blocked on the full `jobs`
    /// queue beside the batcher could wait for seconds under load.
    texts: mpsc::Sender<Job>,
    description: std::sync::Arc<str>,
}

/// The model thread, joined once every [`ModelHandle`] is dropped.
pub type ModelOwner = OwnerThread<ModelHandle>;

impl ModelOwner {
    /// Start the model thread; `build` runs on it and creates the backend. Returns once the
    /// backend is loaded (or failed to load). `queue` bounds the jobs waiting for the thread.
    pub fn spawn<B, F>(build: F, queue: usize) -> Result<(Self, ModelHandle), ModelError>
    where
        B: Backend + 'static,
        F: FnOnce() -> Result<B, ModelError> + Send + 'static,
    {
        let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::channel::<Job>(queue.max(1));
        let (texts_tx, texts_rx) = mpsc::channel::<Job>();
        let serve = move |mut backend: B| {
            // Ends when every handle (every sender) is gone and the queue is drained.
            while let Some(job) = jobs_rx.blocking_recv() {
                for text in texts_rx.try_iter() {
                    run(&mut backend, text);
                }
                run(&mut backend, job);
            }
        };
        Self::start(
            "clipqc-model",
            "model",
            build,
            B::describe,
            serve,
            |description| ModelHandle {
                jobs: jobs_tx,
                texts: texts_tx,
                description: description.into(),
            },
        )
    }
}

/// The one OS thread that owns a value libtorch code must not share (the model's backend,
/// the segmenter), fed through handles `H`: built on the thread, described once, then served
/// there until its work runs out. [`ModelOwner`] is one, and the segment stage's
/// `SegmentOwner` another.
pub struct OwnerThread<H> {
    thread: Option<JoinHandle<()>>,
    handles: PhantomData<fn() -> H>,
}

/// The owner thread itself failed, before its value was built.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the {what} thread panicked while loading")]
    Panicked { what: &'static str },
}

impl From<ThreadError> for ModelError {
    fn from(e: ThreadError) -> Self {
        Self::Inference(e.to_string())
    }
}

impl<H> OwnerThread<H> {
    /// Start the thread `name` (`what` in its errors); `build` runs on it. Returns once it has
    /// built the value, with the handle `handle` makes of `describe`'s words for it, or failed
    /// to (`build`'s error, or the thread's own as `E`; the thread joined then); `serve` then
    /// runs on the thread with the value, and the thread ends when it returns.
    pub fn start<T, E>(
        name: &str,
        what: &'static str,
        build: impl FnOnce() -> Result<T, E> + Send + 'static,
        describe: impl FnOnce(&T) -> String + Send + 'static,
        serve: impl FnOnce(T) + Send + 'static,
        handle: impl FnOnce(String) -> H,
    ) -> Result<(Self, H), E>
    where
        E: From<ThreadError> + Send + 'static,
    {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, E>>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let value = match build() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(describe(&value)));
                serve(value);
            })
            .map_err(|source| ThreadError::Spawn { what, source })?;
        let description = match ready_rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ThreadError::Panicked { what }.into());
            }
        };
        let owner = Self {
            thread: Some(thread),
            handles: PhantomData,
        };
        Ok((owner, handle(description)))
    }

    /// Wait for the thread to finish; it finishes once every handle is dropped.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(backend: &mut impl Backend, job: Job) {
    match job {
        Job::Images(batch, reply) => {
            let _ = reply.send(backend.embed_images(&batch));
        }
        Job::Tensor(batch, reply) => {
            let _ = reply.send(backend.embed_tensor(&batch));
        }
        Job::Texts(batch, reply) => {
            let _ = reply.send(backend.embed_texts(&batch));
        }
        Job::Wake => {}
    }
}

impl ModelHandle {
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Every tensor's embedding, in order, in batches of at most `batch` (offline commands:
    /// classify, eval, exemplars; the worker batches through the dynamic batcher instead).
    /// Each tensor holds 3 × `size`² floats.
    pub fn embed_all_blocking(
        &self,
        size: usize,
        tensors: &[Vec<f32>],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut rows = Vec::with_capacity(tensors.len());
        for part in tensors.chunks(batch.max(1)) {
            let mut b = ImageBatch::new(size);
            for t in part {
                b.push(t);
            }
            rows.extend(self.embed_images_blocking(b)?.rows().map(<[f32]>::to_vec));
        }
        Ok(rows)
    }

    fn submit(
        &self,
        make: impl FnOnce(Reply) -> Job,
    ) -> Result<oneshot::Receiver<Result<Embeddings, ModelError>>, ModelError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .blocking_send(make(tx))
            .map_err(|_| ModelError::Stopped)?;
        Ok(rx)
    }

    /// Embed images, waiting on this thread. Not for use on an async runtime's workers.
    pub fn embed_images_blocking(&self, batch: ImageBatch) -> Result<Embeddings, ModelError> {
        self.submit(|r| Job::Images(batch, r))?
            .blocking_recv()
            .map_err(|_| ModelError::Stopped)?
    }

    /// Embed texts, waiting on this thread. Not for use on an async runtime's workers.
    pub fn embed_texts_blocking(&self, batch: TokenBatch) -> Result<Embeddings, ModelError> {
        let (tx, rx) = oneshot::channel();
        self.texts
            .send(Job::Texts(batch, tx))
            .map_err(|_| ModelError::Stopped)?;
        // A full queue means a busy thread, which takes the text before its next image job.
        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
            self.jobs.try_send(Job::Wake)
        {
            return Err(ModelError::Stopped);
        }
        rx.blocking_recv().map_err(|_| ModelError::Stopped)?
    }

    /// Submit images and return the receiver of the answer, waiting on this thread while the
    /// bounded job queue is full. Not for use on an async runtime's workers.
    pub fn submit_images(
        &self,
        batch: ImageBatch,
    ) -> Result<oneshot::Receiver<Result<Embeddings, ModelError>>, ModelError> {
        self.submit(|r| Job::Images(batch, r))
    }

    /// Submit images from async code: waits (without blocking the runtime) while the bounded
    /// job queue is full, which is the back-pressure on the batcher. `.await` the receiver
    /// for the answer.
    pub async fn submit_images_async(
        &self,
        batch: ImageBatch,
    ) -> Result<oneshot::Receiver<Result<Embeddings, ModelError>>, ModelError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Images(batch, tx))
            .await
            .map_err(|_| ModelError::Stopped)?;
        Ok(rx)
    }

    /// As [`Self::submit_images_async`], for a batch already in a tensor (`n×3×S×S`, on any
    /// device): the device preprocessing path's views go to the model without a host copy.
    pub async fn submit_tensor_async(
        &self,
        batch: tch::Tensor,
    ) -> Result<oneshot::Receiver<Result<Embeddings, ModelError>>, ModelError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Tensor(batch, tx))
            .await
            .map_err(|_| ModelError::Stopped)?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fake::FakeBackend;

    /// Async submission waits for room in the queue without blocking the runtime, so it works
    /// on a current-thread runtime too (the blocking send it replaced, wrapped in
    /// `block_in_place`, panics there).
    #[tokio::test(flavor = "current_thread")]
    async fn async_submission_waits_for_room_on_a_current_thread_runtime() {
        let (owner, handle) = ModelOwner::spawn(|| Ok(FakeBackend::new(8, 4)), 1).unwrap();
        let mut answers = Vec::new();
        for i in 0..6 {
            let mut batch = ImageBatch::new(4);
            batch.push(&[i as f32 / 10.0; 48]);
            answers.push(handle.submit_images_async(batch).await.unwrap());
        }
        for answer in answers {
            let out = answer.await.unwrap().unwrap();
            assert_eq!((out.n, out.dim), (1, 8));
        }
        drop(handle);
        owner.join();
    }

    #[test]
    fn answers_in_order_and_stops_with_its_handles() {
        let (owner, handle) = ModelOwner::spawn(|| Ok(FakeBackend::new(8, 4)), 2).unwrap();
        assert!(handle.describe().contains("fake"));
        let mut batch = ImageBatch::new(4);
        batch.push(&[0.5; 48]);
        batch.push(&[-0.5; 48]);
        let out = handle.embed_images_blocking(batch).unwrap();
        assert_eq!((out.n, out.dim), (2, 8));
        assert_ne!(out.row(0), out.row(1));
        drop(handle);
        owner.join();
    }

    #[test]
    fn a_text_job_goes_ahead_of_the_image_jobs_waiting() {
        let mut fake = FakeBackend::new(8, 4);
        fake.delay = std::time::Duration::from_millis(200);
        let (owner, handle) = ModelOwner::spawn(move || Ok(fake), 2).unwrap();
        let image = || {
            let mut batch = ImageBatch::new(4);
            batch.push(&[0.5; 48]);
            batch
        };
        // One running, two waiting (the queue holds two): the batcher under load.
        let mut waiting: Vec<_> = (0..3)
            .map(|_| handle.submit_images(image()).unwrap())
            .collect();
        let texts = TokenBatch {
            ids: vec![1, 2],
            mask: vec![1, 1],
            n: 1,
            len: 2,
        };
        assert_eq!(handle.embed_texts_blocking(texts).unwrap().n, 1);
        let mut last = waiting.pop().unwrap();
        assert!(
            matches!(last.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the text was embedded before the last image batch waiting"
        );
        assert!(
            matches!(last.blocking_recv(), Ok(Ok(_))),
            "the images still get their answers"
        );
        drop(handle);
        owner.join();
    }

    #[test]
    fn a_failed_load_is_reported_and_gives_no_handle() {
        let err = ModelOwner::spawn(
            || Err::<FakeBackend, _>(ModelError::Inference("boom".into())),
            1,
        )
        .err()
        .expect("the load failed");
        assert!(err.to_string().contains("boom"));
    }

    #[test]
    fn an_owner_thread_reports_its_build_failing_or_panicking() {
        let describe = |_: &u8| String::new();
        let err = OwnerThread::<()>::start(
            "clipqc-test",
            "test",
            || Err(ModelError::Stopped),
            describe,
            drop,
            drop,
        )
        .err()
        .expect("the build failed");
        assert!(matches!(err, ModelError::Stopped), "{err}");
        let panics = || -> Result<u8, ThreadError> { panic!("while loading") };
        let err = OwnerThread::<()>::start("clipqc-test", "test", panics, describe, drop, drop)
            .err()
            .expect("the build panicked");
        assert!(
            matches!(err, ThreadError::Panicked { what: "test" }),
            "{err}"
        );
        assert_eq!(
            ModelError::from(err).to_string(),
            "inference failed: the test thread panicked while loading"
        );
    }
}
