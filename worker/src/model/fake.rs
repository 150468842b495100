//! A backend without libtorch, for fast tests of everything around the model.
//!
//! Deterministic: equal inputs give equal embeddings, different images give different ones
//! (each output is a mean over an interleaved slice of the pixels), and texts hash to
//! pseudo-random directions. It can be told to fail or to take time, to test faults and
//! back-pressure without a model, or to hold image batches at a [`Gate`] until the test lets
//! them through, so that what is in flight at a given moment is the test's choice, not the
//! scheduler's.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Backend, Embeddings, ImageBatch, ModelError, TokenBatch};

#[derive(Debug, Clone)]
pub struct FakeBackend {
    dim: usize,
    image_size: usize,
    /// Fail every image batch with this message.
    pub fail_images: Option<String>,
    /// Sleep this long per batch, as a real model would take time.
    pub delay: Duration,
    /// Return one embedding fewer than the batch has images (a broken backend).
    pub short_by_one: bool,
    /// Fail this many image batches first, then work (a transient fault: one CUDA OOM).
    pub fail_first: usize,
    /// Fail every batch holding an image whose mean input value is above this (one image
    /// the model cannot take, whatever else is in its batch).
    pub fail_bright: Option<f32>,
    /// Hold each image batch here until the test lets it through.
    pub gate: Option<Gate>,
}

impl FakeBackend {
    pub fn new(dim: usize, image_size: usize) -> Self {
        Self {
            dim,
            image_size,
            fail_images: None,
            delay: Duration::ZERO,
            short_by_one: false,
            fail_first: 0,
            fail_bright: None,
            gate: None,
        }
    }
}

/// Image batches wait here until the test lets them through: [`Gate::release`] some,
/// [`Gate::open`] for good. Shared by the test and the backend (clones are one gate).
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Debug, Default)]
struct GateState {
    /// Batches that may still pass before the gate closes again.
    permits: usize,
    open: bool,
    /// Images of the batches waiting at the gate now.
    waiting: usize,
    /// Images that have passed.
    passed: usize,
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Let `batches` more batches through.
    pub fn release(&self, batches: usize) {
        self.update(|s| s.permits += batches);
    }

    /// Let every batch through from now on.
    pub fn open(&self) {
        self.update(|s| s.open = true);
    }

    /// Images that have passed the gate so far.
    pub fn passed(&self) -> usize {
        self.lock().passed
    }

    /// Wait until `passed` images have passed and a batch waits at the gate (or `within`
    /// passes: a bound on a hung test, not an expectation); returns the images waiting, 0
    /// when none came.
    pub fn wait_for_a_batch(&self, passed: usize, within: Duration) -> usize {
        let (lock, changed) = &*self.0;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = changed
            .wait_timeout_while(state, within, |s| s.passed < passed || s.waiting == 0)
            .unwrap_or_else(|e| e.into_inner());
        if state.passed < passed {
            0
        } else {
            state.waiting
        }
    }

    /// The backend's side: wait for a permit (or the open gate) for a batch of `n` images.
    pub fn pass(&self, n: usize) {
        let (lock, changed) = &*self.0;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting += n;
        changed.notify_all();
        state = changed
            .wait_while(state, |s| !s.open && s.permits == 0)
            .unwrap_or_else(|e| e.into_inner());
        if !state.open {
            state.permits -= 1;
        }
        state.waiting -= n;
        state.passed += n;
        changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.lock());
        self.0 .1.notify_all();
    }
}

impl Backend for FakeBackend {
    fn describe(&self) -> String {
        format!(
            "fake backend (dim {}, image {}px)",
            self.dim, self.image_size
        )
    }

    fn embed_images(&mut self, batch: &ImageBatch) -> Result<Embeddings, ModelError> {
        if let Some(gate) = &self.gate {
            gate.pass(batch.n);
        }
        std::thread::sleep(self.delay);
        if let Some(msg) = &self.fail_images {
            return Err(ModelError::Inference(msg.clone()));
        }
        if self.fail_first > 0 {
            self.fail_first -= 1;
            return Err(ModelError::Inference(
                "CUDA out of memory (a transient fault)".into(),
            ));
        }
        if let Some(limit) = self.fail_bright {
            let per_image = (3 * batch.size * batch.size).max(1);
            let bright = batch.data.chunks(per_image).any(|image| {
                image.iter().map(|&v| f64::from(v)).sum::<f64>() / image.len() as f64
                    > f64::from(limit)
            });
            if bright {
                return Err(ModelError::Inference(
                    "an image the model cannot take".into(),
                ));
            }
        }
        if batch.size != self.image_size {
            return Err(ModelError::Inference(format!(
                "expected {}px images, got {}px",
                self.image_size, batch.size
            )));
        }
        let per_image = 3 * batch.size * batch.size;
        let mut data = Vec::with_capacity(batch.n * self.dim);
        for pixels in batch.data.chunks_exact(per_image) {
            for k in 0..self.dim {
                let slice = pixels.iter().skip(k).step_by(self.dim);
                let (sum, count) =
                    slice.fold((0.0f64, 0usize), |(s, c), &v| (s + f64::from(v), c + 1));
                data.push((sum / count.max(1) as f64) as f32 + 0.01 * k as f32);
            }
        }
        let n = if self.short_by_one {
            data.truncate(batch.n.saturating_sub(1) * self.dim);
            batch.n.saturating_sub(1)
        } else {
            batch.n
        };
        Ok(Embeddings {
            data,
            n,
            dim: self.dim,
        })
    }

    fn embed_texts(&mut self, batch: &TokenBatch) -> Result<Embeddings, ModelError> {
        let mut data = Vec::with_capacity(batch.n * self.dim);
        for (ids, mask) in batch
            .ids
            .chunks_exact(batch.len)
            .zip(batch.mask.chunks_exact(batch.len))
        {
            let mut state = ids
                .iter()
                .zip(mask)
                .filter(|(_, m)| **m == 1)
                .fold(0xcbf2_9ce4_8422_2325u64, |h, (id, _)| {
                    (h ^ *id as u64).wrapping_mul(0x0100_0000_01b3)
                });
            for _ in 0..self.dim {
                // xorshift: cheap, deterministic, spread over [-1, 1).
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
            }
        }
        Ok(Embeddings {
            data,
            n: batch.n,
            dim: self.dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_holds_each_batch_until_released_and_lets_all_through_once_open() {
        let gate = Gate::new();
        let mut fake = FakeBackend::new(4, 2);
        fake.gate = Some(gate.clone());
        let mut batch = ImageBatch::new(2);
        batch.push(&[0.5; 12]);
        batch.push(&[0.25; 12]);
        let model = std::thread::spawn(move || {
            (0..3)
                .map(|_| fake.embed_images(&batch).unwrap().n)
                .collect::<Vec<_>>()
        });
        // The bounds are for a hung test only.
        let long = Duration::from_secs(60);
        assert_eq!(gate.wait_for_a_batch(0, long), 2, "held, not passed");
        assert_eq!(gate.passed(), 0);
        gate.release(1);
        assert_eq!(gate.wait_for_a_batch(2, long), 2, "the next one is held");
        assert_eq!(gate.passed(), 2);
        gate.open();
        assert_eq!(model.join().unwrap(), [2, 2, 2]);
        assert_eq!(gate.passed(), 6);
    }
}
