//! Tip-Adapter-F's training (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter,
//! `run_tip_adapter_F`) on a profile's exemplars, with tch's autograd.
//!
//! As published: the cache's keys are a linear layer's weights (`adapter`, no bias), initialised
//! with the exemplars' unit embeddings; the logits are CLIP's (`logit_scale × f · Wᵀ`, the
//! profile's text prototypes, here fixed) plus `alpha × cache`, the cache term
//! `exp(−beta × (1 − f · keys))` summed per class (each class's `k` nearest, `k` the smallest
//! class's count: the worker's balanced cache, [`crate::score::bank`]); the loss is their
//! cross-entropy on the exemplars' classes; AdamW (lr 0.001, eps 1e-4, weight decay 0.01)
//! under a cosine schedule over every step; batches of 256 in an order drawn from the seed.
//!
//! One change: Tip-Adapter-F trains on augmented views of the cached images, so an image is
//! never its own key exactly; the bank holds embeddings, not images, so each exemplar's own key
//! is left out of its cache term (masked), or every exemplar would find itself at cosine 1 and
//! the loss would teach nothing.
//!
//! Reproducible: for one seed, one device and one thread count, the same keys bit for bit
//! (libtorch's CPU kernels are deterministic at a fixed thread count; `adapt` sets one).

use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

/// What training needs: the exemplars' unit embeddings, their classes, the profile's text
/// logits for each (`logit_scale × f · prototypeᵀ + bias`), and the settings.
pub struct Training<'a> {
    pub features: &'a [Vec<f32>],
    pub labels: &'a [usize],
    pub text_logits: &'a [Vec<f32>],
    pub classes: usize,
    pub alpha: f32,
    pub beta: f32,
    pub epochs: usize,
    pub seed: u64,
    pub device: Device,
}

/// The trained keys (one per exemplar, in their order) and the mean loss of each epoch.
pub struct Trained {
    pub keys: Vec<Vec<f32>>,
    pub loss: Vec<f32>,
}

pub const LEARNING_RATE: f64 = 0.001;
pub const BATCH: i64 = 256;

fn matrix(rows: &[Vec<f32>], device: Device) -> Tensor {
    let cols = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<f32> = rows.concat();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, cols])
        .to_device(device)
}

/// Tip-Adapter-F's cache logits (before `alpha`) for `features` (B×D) against `keys` (N×D),
/// each class summing its `k` largest affinities; `exclude` (B×N, true where a row's own
/// key is) is left out.
fn cache(
    features: &Tensor,
    keys: &Tensor,
    beta: f32,
    of_class: &[Tensor],
    k: i64,
    exclude: Option<&Tensor>,
) -> Tensor {
    let mut affinity = features.matmul(&keys.tr());
    if let Some(mask) = exclude {
        affinity = affinity.masked_fill(mask, f64::NEG_INFINITY);
    }
    let e = ((affinity - 1.0) * f64::from(beta)).exp();
    let b = features.size()[0];
    let per_class: Vec<Tensor> = of_class
        .iter()
        .map(|idx| {
            let n = idx.size()[0];
            if n == 0 {
                Tensor::zeros([b], (Kind::Float, features.device()))
            } else {
                let (top, _) = e.index_select(1, idx).topk(k.min(n), 1, true, true);
                top.sum_dim_intlist(1, false, Kind::Float)
            }
        })
        .collect();
    Tensor::stack(&per_class, 1)
}

/// Trains; `epoch_done` is called after each epoch with its mean loss (the progress bar).
pub fn train(t: &Training, mut epoch_done: impl FnMut(f32)) -> Trained {
    tch::manual_seed(t.seed as i64);
    let n = t.features.len() as i64;
    let device = t.device;
    let features = matrix(t.features, device);
    let text = matrix(t.text_logits, device);
    let labels = Tensor::from_slice(&t.labels.iter().map(|&c| c as i64).collect::<Vec<_>>())
        .to_device(device);
    let of_class: Vec<Tensor> = (0..t.classes)
        .map(|c| {
            let idx: Vec<i64> = (0..t.labels.len())
                .filter(|&i| t.labels[i] == c)
                .map(|i| i as i64)
                .collect();
            Tensor::from_slice(&idx).to_device(device)
        })
        .collect();
    let k = of_class
        .iter()
        .map(|i| i.size()[0])
        .filter(|&n| n > 0)
        .min()
        .unwrap_or(1);
    let vs = nn::VarStore::new(device);
    let keys = vs.root().var_copy("keys", &features);
    let mut opt = nn::AdamW {
        eps: 1e-4,
        wd: 0.01,
        ..Default::default()
    }
    .build(&vs, LEARNING_RATE)
    .expect("AdamW over one variable");
    let eye = Tensor::eye(n, (Kind::Bool, device));
    let steps_per_epoch = (n + BATCH - 1) / BATCH;
    let total = (t.epochs as i64 * steps_per_epoch).max(1);
    let mut step = 0i64;
    let mut loss = Vec::with_capacity(t.epochs);
    for _ in 0..t.epochs {
        let order = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).to_device(device);
        let (mut sum, mut seen) = (0f64, 0i64);
        for start in (0..n).step_by(BATCH as usize) {
            let idx = order.narrow(0, start, BATCH.min(n - start));
            let f = features.index_select(0, &idx);
            let mask = eye.index_select(0, &idx);
            let c = cache(&f, &keys, t.beta, &of_class, k, Some(&mask));
            let logits = text.index_select(0, &idx) + c * f64::from(t.alpha);
            let l = logits.cross_entropy_for_logits(&labels.index_select(0, &idx));
            // CosineAnnealingLR, stepped every batch as Tip-Adapter-F does.
            let lr = LEARNING_RATE
                * 0.5
                * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_lr(lr);
            opt.backward_step(&l);
            step += 1;
            let b = idx.size()[0];
            sum += l.double_value(&[]) * b as f64;
            seen += b;
        }
        loss.push((sum / seen.max(1) as f64) as f32);
        epoch_done(loss[loss.len() - 1]);
    }
    let keys = keys.detach().to_device(Device::Cpu);
    let (rows, cols) = (keys.size()[0], keys.size()[1]);
    let flat: Vec<f32> = Vec::<f32>::try_from(keys.reshape([-1])).expect("float keys");
    let keys = (0..rows as usize)
        .map(|r| flat[r * cols as usize..(r + 1) * cols as usize].to_vec())
        .collect();
    Trained { keys, loss }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> (Vec<Vec<f32>>, Vec<usize>, Vec<Vec<f32>>) {
        // Two classes along two axes, with some spread; text logits that slightly prefer the
        // wrong class, so the cache has something to fix.
        let f: Vec<Vec<f32>> = (0..12)
            .map(|i| {
                let a = 0.5 + 0.4 * (i % 6) as f32 / 6.0;
                let v = if i < 6 { [1.0, a, 0.8] } else { [a, 1.0, 0.8] };
                crate::score::normalized(&v)
            })
            .collect();
        let labels = (0..12).map(|i| usize::from(i >= 6)).collect();
        let text = (0..12).map(|_| vec![20.0, 21.0]).collect();
        (f, labels, text)
    }

    #[test]
    fn one_seed_trains_the_same_keys_twice_and_the_loss_falls() {
        let (features, labels, text_logits) = data();
        let run = |seed| {
            train(
                &Training {
                    features: &features,
                    labels: &labels,
                    text_logits: &text_logits,
                    classes: 2,
                    alpha: 1.0,
                    beta: 5.5,
                    epochs: 30,
                    seed,
                    device: Device::Cpu,
                },
                |_| {},
            )
        };
        let (a, b) = (run(7), run(7));
        assert_eq!(a.keys, b.keys, "same seed, same keys");
        assert_eq!(a.loss, b.loss);
        assert_eq!(a.loss.len(), 30);
        assert!(a.loss[29] < a.loss[0], "{:?}", a.loss);
        assert_ne!(a.keys, features, "training moved the keys");
    }
}
