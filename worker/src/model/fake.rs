//! A backend without libtorch, for fast tests of everything around the model.
//!
//! Deterministic: equal inputs give equal embeddings, different images give different ones
//! (each output is a mean over an interleaved slice of the pixels), and texts hash to
//! pseudo-random directions. It can be told to fail or to take time, to test faults and
//! back-pressure without a model.

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
        }
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
