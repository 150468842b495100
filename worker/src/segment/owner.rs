//! The one OS thread that owns the SAM models, beside (never instead of) the classification
//! model's thread ([`crate::model::owner`]).
//!
//! Guarantees: frames are segmented in arrival order, except that a frame whose caller has
//! dropped the receiver before its turn is skipped; [`SegmentHandle::try_submit`] never
//! waits — when `queue` frames are already waiting it returns [`SegmentError::QueueFull`] at
//! once, so a caller on the classification path can send its verdict without a mask instead of
//! slowing down; the thread stops when every handle is dropped, after the frames already
//! queued; a segmenter that fails to load is reported by [`SegmentOwner::spawn`] and no handle
//! is ever returned for it.

use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::prepare::SamInput;
use super::{Segment, SegmentError, Segmenter};
use crate::model::owner::{OwnerThread, ThreadError};

/// The answer to one frame: a segment per box, in the order of the boxes.
pub type SegmentReply = oneshot::Receiver<Result<Vec<Segment>, SegmentError>>;

struct Job {
    input: SamInput,
    reply: oneshot::Sender<Result<Vec<Segment>, SegmentError>>,
}

/// A cheap, cloneable way to submit frames to the segmentation thread.
#[derive(Clone)]
pub struct SegmentHandle {
    jobs: mpsc::SyncSender<Job>,
    capacity: usize,
    description: Arc<str>,
}

/// The segmentation thread, joined once every [`SegmentHandle`] is dropped.
pub type SegmentOwner = OwnerThread<SegmentHandle>;

impl SegmentOwner {
    /// Start the segmentation thread; `build` runs on it and loads the segmenter. Returns once
    /// it is loaded (or failed to load). `queue` bounds the frames waiting (at least 1).
    pub fn spawn<S, F>(build: F, queue: usize) -> Result<(Self, SegmentHandle), SegmentError>
    where
        S: Segmenter + 'static,
        F: FnOnce() -> Result<S, SegmentError> + Send + 'static,
    {
        let capacity = queue.max(1);
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(capacity);
        let serve = move |mut segmenter: S| {
            // Ends when every handle is gone and the queue is drained.
            for job in jobs_rx {
                // The caller gave up waiting (its verdict went out without a mask): the
                // frame is skipped rather than segmented for nobody.
                if job.reply.is_closed() {
                    continue;
                }
                let _ = job.reply.send(segmenter.segment(&job.input));
            }
        };
        let handle = |description: String| SegmentHandle {
            jobs: jobs_tx,
            capacity,
            description: description.into(),
        };
        Self::start(
            "clipqc-segment",
            "segmentation",
            build,
            S::describe,
            serve,
            handle,
        )
    }
}

impl From<ThreadError> for SegmentError {
    fn from(e: ThreadError) -> Self {
        Self::Inference(e.to_string())
    }
}

impl SegmentHandle {
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// How many frames may wait for the thread.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queue a frame without waiting: the receiver of its answer (`.await` it, or
    /// `blocking_recv` off the async runtime), or [`SegmentError::QueueFull`] at once.
    pub fn try_submit(&self, input: SamInput) -> Result<SegmentReply, SegmentError> {
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { input, reply }) {
            Ok(()) => Ok(rx),
            Err(mpsc::TrySendError::Full(_)) => Err(SegmentError::QueueFull {
                capacity: self.capacity,
            }),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(SegmentError::Stopped),
        }
    }

    /// Segment a frame, waiting for room in the queue and for the answer (offline commands
    /// and tests). Not for use on an async runtime's workers.
    pub fn segment_blocking(&self, input: SamInput) -> Result<Vec<Segment>, SegmentError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { input, reply })
            .map_err(|_| SegmentError::Stopped)?;
        rx.blocking_recv().map_err(|_| SegmentError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Mask;
    use std::time::Duration;

    /// Marks the top-left pixel of a frame-sized mask per box, after `delay`; counts frames.
    struct Fake {
        delay: Duration,
        frames: Arc<std::sync::atomic::AtomicUsize>,
    }

    fn fake(delay_ms: u64) -> Fake {
        Fake {
            delay: Duration::from_millis(delay_ms),
            frames: Arc::default(),
        }
    }

    impl Segmenter for Fake {
        fn describe(&self) -> String {
            "fake segmenter".into()
        }

        fn segment(&mut self, input: &SamInput) -> Result<Vec<Segment>, SegmentError> {
            std::thread::sleep(self.delay);
            self.frames
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (w, h) = input.frame;
            let mut bits = vec![false; (w * h) as usize];
            bits[0] = true;
            let mask = Mask::new(w, h, bits)?;
            Ok(input
                .boxes
                .iter()
                .map(|b| Segment {
                    mask: mask.clone(),
                    iou: b[0],
                })
                .collect())
        }
    }

    fn input(first_box_x: f32) -> SamInput {
        SamInput {
            pixels: vec![],
            size: 4,
            frame: (3, 2),
            resized: (4, 3),
            boxes: vec![[first_box_x, 0.0, 1.0, 1.0], [9.0, 0.0, 1.0, 1.0]],
        }
    }

    #[test]
    fn answers_a_segment_per_box_in_order_and_stops_with_its_handles() {
        let fake = fake(0);
        let (owner, handle) = SegmentOwner::spawn(move || Ok(fake), 2).unwrap();
        assert_eq!(handle.describe(), "fake segmenter");
        let out = handle.segment_blocking(input(0.25)).unwrap();
        assert_eq!(
            out.iter().map(|s| s.iou).collect::<Vec<_>>(),
            vec![0.25, 9.0]
        );
        assert_eq!(out[0].mask.area(), 1);
        let rx = handle.try_submit(input(0.5)).unwrap();
        assert_eq!(rx.blocking_recv().unwrap().unwrap()[0].iou, 0.5);
        drop(handle);
        owner.join();
    }

    #[test]
    fn a_full_queue_is_refused_at_once_and_the_queued_frames_still_answered() {
        let fake = fake(200);
        let (owner, handle) = SegmentOwner::spawn(move || Ok(fake), 1).unwrap();
        // One running (taken off the queue), one waiting: the queue of one is full.
        let first = handle.try_submit(input(1.0)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let second = handle.try_submit(input(2.0)).unwrap();
        let started = std::time::Instant::now();
        let err = handle.try_submit(input(3.0)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "try_submit waited"
        );
        assert!(
            matches!(err, SegmentError::QueueFull { capacity: 1 }),
            "{err}"
        );
        assert_eq!(first.blocking_recv().unwrap().unwrap()[0].iou, 1.0);
        assert_eq!(second.blocking_recv().unwrap().unwrap()[0].iou, 2.0);
        drop(handle);
        owner.join();
    }

    #[test]
    fn a_frame_whose_caller_gave_up_is_skipped() {
        let fake = fake(100);
        let frames = fake.frames.clone();
        // Room for all three, whether or not the thread has taken the first yet.
        let (owner, handle) = SegmentOwner::spawn(move || Ok(fake), 3).unwrap();
        let first = handle.try_submit(input(1.0)).unwrap();
        // Dropped while the first (100 ms) is still running or waiting.
        drop(handle.try_submit(input(2.0)).unwrap());
        let third = handle.try_submit(input(3.0)).unwrap();
        assert_eq!(first.blocking_recv().unwrap().unwrap()[0].iou, 1.0);
        assert_eq!(third.blocking_recv().unwrap().unwrap()[0].iou, 3.0);
        drop(handle);
        owner.join();
        assert_eq!(frames.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_load_is_reported_and_gives_no_handle() {
        let err = SegmentOwner::spawn(
            || Err::<Fake, _>(SegmentError::Inference("no weights".into())),
            1,
        )
        .err()
        .expect("the load failed");
        assert!(err.to_string().contains("no weights"));
    }
}
