//! The one OS thread that owns the SAM models, beside (never instead of) the classification
//! model's thread ([`crate::model::owner`]).
//!
//! Guarantees: frames are segmented in arrival order, except that a frame whose caller has
//! dropped the receiver before its turn is skipped; [`SegmentHandle::try_submit`] never
//! waits — when `queue` frames are already waiting it returns [`SegmentError::QueueFull`] at
//! once, so a caller on the classification path can send its verdict without a mask instead of
//! slowing down; the thread stops when every handle is dropped, after the frames already
//! queued; a segmenter that fails to load is reported by [`SegmentOwner::spawn`] and no handle
//! is ever returned for it. A call that panics (a tch error unwrapped deep in a backend) fails
//! that frame alone ([`SegmentError::Inference`], `clipqc_segment_panics_total`) and the
//! thread goes on; after [`MAX_PANICS`] panics in a row it stops, and says so: its
//! [`SegmentHealth`] (which `/healthz` and `/readyz` read) reports it stopped, as it reports a
//! call running past its bound (a hung call), so the orchestrator restarts the worker instead
//! of every later verdict going out without masks unnoticed.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::prepare::SamInput;
use super::{Segment, SegmentError, Segmenter};
use crate::model::owner::{OwnerThread, ThreadError};

/// The answer to one frame: a segment per box, in the order of the boxes.
pub type SegmentReply = oneshot::Receiver<Result<Vec<Segment>, SegmentError>>;

struct Job {
    input: SamInput,
    reply: oneshot::Sender<Result<Vec<Segment>, SegmentError>>,
    /// The frame's place in the queue, given back when the thread takes it.
    slot: Slot,
}

/// A place in the segmentation queue, taken before a frame is decoded for SAM
/// ([`SegmentHandle::try_slot`]): a frame that would find the queue full is turned away
/// before it costs a decode or a byte of budget. Given back when dropped.
pub struct Slot {
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A cheap, cloneable way to submit frames to the segmentation thread.
#[derive(Clone)]
pub struct SegmentHandle {
    jobs: mpsc::SyncSender<Job>,
    capacity: usize,
    description: Arc<str>,
    health: Arc<SegmentHealth>,
    /// Frames holding a place in the queue (taken, not yet taken off by the thread).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// Panics in a row after which the segmentation thread stops (a segmenter that panics on
/// every frame is broken, not unlucky).
pub const MAX_PANICS: u64 = 3;

/// What the segmentation thread is doing, for the health endpoints.
#[derive(Debug, Default)]
pub struct SegmentHealth {
    /// When the call running now started.
    busy_since: Mutex<Option<Instant>>,
    /// The thread stopped after [`MAX_PANICS`] panics in a row.
    stopped: AtomicBool,
    panics_in_a_row: AtomicU64,
}

impl SegmentHealth {
    /// Why segmentation is broken at `now`, if it is: the thread stopped, or a call has run
    /// longer than `limit`.
    pub fn problem(&self, now: Instant, limit: Duration) -> Option<String> {
        if self.stopped.load(Ordering::Relaxed) {
            return Some(format!(
                "the segmentation thread stopped after {MAX_PANICS} panics in a row"
            ));
        }
        let since = (*self.busy_since.lock().unwrap_or_else(|e| e.into_inner()))?;
        let busy = now.saturating_duration_since(since);
        (busy > limit).then(|| {
            format!(
                "a segmentation call has run for {} s (bound {} s): SAM hangs",
                busy.as_secs(),
                limit.as_secs()
            )
        })
    }

    fn busy(&self, since: Option<Instant>) {
        *self.busy_since.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }
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
        let health = Arc::new(SegmentHealth::default());
        let watched = health.clone();
        let serve = move |mut segmenter: S| {
            crate::metrics::segment_thread_up(true);
            // Ends when every handle is gone and the queue is drained, or the segmenter
            // panics on frame after frame.
            for job in jobs_rx {
                // The caller gave up waiting (its verdict went out without a mask): the
                // frame is skipped rather than segmented for nobody.
                let Job { input, reply, slot } = job;
                // Off the queue: its place is free for the next frame.
                drop(slot);
                if reply.is_closed() {
                    continue;
                }
                watched.busy(Some(Instant::now()));
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| segmenter.segment(&input)));
                watched.busy(None);
                let answer = match result {
                    Ok(answer) => {
                        watched.panics_in_a_row.store(0, Ordering::Relaxed);
                        answer
                    }
                    Err(panic) => {
                        let why = crate::panics::panic_message(panic.as_ref());
                        crate::metrics::segment_panicked();
                        let n = watched.panics_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::error!(panic = %why, in_a_row = n, "the segmenter panicked");
                        Err(SegmentError::Inference(format!(
                            "the segmenter panicked: {why}"
                        )))
                    }
                };
                let _ = reply.send(answer);
                if watched.panics_in_a_row.load(Ordering::Relaxed) >= MAX_PANICS {
                    tracing::error!("the segmentation thread stops: {MAX_PANICS} panics in a row");
                    watched.stopped.store(true, Ordering::Relaxed);
                    crate::metrics::segment_thread_up(false);
                    return;
                }
            }
        };
        let handle = |description: String| SegmentHandle {
            jobs: jobs_tx,
            capacity,
            description: description.into(),
            health,
            pending: Arc::default(),
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

    /// The thread's health (busy since, stopped).
    pub fn health(&self) -> Arc<SegmentHealth> {
        self.health.clone()
    }

    /// A place in the queue, or [`SegmentError::QueueFull`] at once when `capacity` frames
    /// already wait.
    pub fn try_slot(&self) -> Result<Slot, SegmentError> {
        let taken = self.pending.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            pending: self.pending.clone(),
        };
        if taken >= self.capacity {
            return Err(SegmentError::QueueFull {
                capacity: self.capacity,
            });
        }
        Ok(slot)
    }

    /// Queue a frame without waiting: the receiver of its answer (`.await` it, or
    /// `blocking_recv` off the async runtime), or [`SegmentError::QueueFull`] at once.
    pub fn try_submit(&self, input: SamInput) -> Result<SegmentReply, SegmentError> {
        self.submit(self.try_slot()?, input)
    }

    /// Queue a frame in the place `slot` holds for it.
    pub fn submit(&self, slot: Slot, input: SamInput) -> Result<SegmentReply, SegmentError> {
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { input, reply, slot }) {
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
        // Waits for room in the channel; its place is counted like any other frame's.
        self.pending.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            pending: self.pending.clone(),
        };
        self.jobs
            .send(Job { input, reply, slot })
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

    /// Panics on frames whose first box starts at x = 13, else answers as [`Fake`]; holds
    /// frames whose first box starts at x = 99 until `gate` is opened.
    struct Moody {
        fake: Fake,
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Segmenter for Moody {
        fn describe(&self) -> String {
            "moody".into()
        }

        fn segment(&mut self, input: &SamInput) -> Result<Vec<Segment>, SegmentError> {
            match input.boxes[0][0] {
                13.0 => panic!("tch: CUDA error: an illegal memory access"),
                99.0 => {
                    let (open, cv) = &*self.gate;
                    let mut open = open.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                    self.fake.segment(input)
                }
                _ => self.fake.segment(input),
            }
        }
    }

    fn moody() -> (Moody, Arc<(Mutex<bool>, std::sync::Condvar)>) {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let m = Moody {
            fake: fake(0),
            gate: gate.clone(),
        };
        (m, gate)
    }

    /// A panicking call fails its frame alone and the thread goes on; after `MAX_PANICS` in a
    /// row it stops, and its health says so (and later frames are refused as stopped).
    #[test]
    fn a_panic_fails_its_frame_and_panics_in_a_row_stop_the_thread_loudly() {
        let (m, _gate) = moody();
        let (owner, handle) = SegmentOwner::spawn(move || Ok(m), 4).unwrap();
        let health = handle.health();
        let err = handle.segment_blocking(input(13.0)).unwrap_err();
        assert!(
            err.to_string().contains("panicked") && err.to_string().contains("CUDA"),
            "{err}"
        );
        assert_eq!(handle.segment_blocking(input(1.0)).unwrap()[0].iou, 1.0);
        assert_eq!(
            health.problem(Instant::now(), Duration::from_secs(60)),
            None
        );
        for _ in 0..MAX_PANICS {
            assert!(handle.segment_blocking(input(13.0)).is_err());
        }
        owner.join();
        let problem = health.problem(Instant::now(), Duration::from_secs(60));
        assert!(problem.is_some_and(|p| p.contains("stopped")));
        assert!(matches!(
            handle.try_submit(input(1.0)),
            Err(SegmentError::Stopped)
        ));
    }

    /// A call running past the bound shows as a hang, and stops showing once it returns.
    #[test]
    fn a_call_running_past_its_bound_shows_as_hung() {
        let (m, gate) = moody();
        let (owner, handle) = SegmentOwner::spawn(move || Ok(m), 4).unwrap();
        let health = handle.health();
        let held = handle.try_submit(input(99.0)).unwrap();
        // Wait until the thread has taken the frame (it is busy from then on).
        while health.busy_since.lock().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let bound = Duration::from_secs(30);
        assert_eq!(health.problem(Instant::now(), bound), None);
        let later = Instant::now() + Duration::from_secs(31);
        let problem = health.problem(later, bound).unwrap();
        assert!(problem.contains("hangs"), "{problem}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(held.blocking_recv().unwrap().is_ok());
        assert_eq!(health.problem(later, bound), None, "not busy any more");
        drop(handle);
        owner.join();
    }
}
