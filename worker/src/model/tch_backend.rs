//! The TorchScript backend: the artifact's two encoders on libtorch, through `tch`.
//!
//! Guarantees: runs in inference mode (no autograd state kept); half precision on CUDA
//! (CLIP's encoders are trained for it and it halves memory traffic), float32 on CPU;
//! embeddings always come back as float32 on the host.

use tch::{CModule, Device, Kind, Tensor};

use super::artifact::{Artifact, IMAGE_ENCODER, TEXT_ENCODER};
use super::{Backend, DeviceSpec, Embeddings, ImageBatch, ModelError, TokenBatch};

pub struct TchBackend {
    image: CModule,
    text: CModule,
    device: Device,
    kind: Kind,
    with_mask: bool,
    name: String,
}

/// Resolve `auto`/`cuda:N` against what this process can see.
pub fn resolve_device(spec: DeviceSpec) -> Result<Device, ModelError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(Device::cuda_if_available()),
        DeviceSpec::Cuda(n) => {
            let count = tch::Cuda::device_count();
            if !tch::Cuda::is_available() || n as i64 >= count {
                return Err(ModelError::Device(
                    format!("cuda:{n}"),
                    format!(
                        "libtorch sees {count} CUDA device(s); check the driver, CUDA_VISIBLE_DEVICES and that the \
                         binary links libtorch_cuda.so (readelf -d)"
                    ),
                ));
            }
            Ok(Device::Cuda(n))
        }
    }
}

/// Convert the floating-point parameters to half precision, in place.
///
/// Not `CModule::to(device, Kind::Half)`: TorchScript's `Module::to` converts every buffer,
/// integer ones included, and CLIP's `position_ids` buffer then breaks the embedding lookup
/// (PyTorch's Python `nn.Module.to` converts floating-point tensors only; this does the same).
pub(crate) fn to_half(module: &CModule) -> Result<(), tch::TchError> {
    let _guard = tch::no_grad_guard();
    for (_, mut p) in module.named_parameters()? {
        if p.kind() == Kind::Float {
            let half = p.to_kind(Kind::Half);
            p.set_data(&half);
        }
    }
    Ok(())
}

impl TchBackend {
    pub fn load(artifact: &Artifact, spec: DeviceSpec) -> Result<Self, ModelError> {
        let device = resolve_device(spec)?;
        let kind = if device.is_cuda() {
            Kind::Half
        } else {
            Kind::Float
        };
        let load = |file: &str| -> Result<CModule, ModelError> {
            let path = artifact.path(file);
            let mut m =
                CModule::load_on_device(&path, device).map_err(|e| ModelError::Artifact {
                    dir: artifact.dir.clone(),
                    message: format!("cannot load {file} as TorchScript: {e}"),
                })?;
            m.set_eval();
            if kind != Kind::Float {
                to_half(&m).map_err(|e| ModelError::Artifact {
                    dir: artifact.dir.clone(),
                    message: format!("cannot convert {file} to half precision: {e}"),
                })?;
            }
            Ok(m)
        };
        let image = load(IMAGE_ENCODER)?;
        let text = load(TEXT_ENCODER)?;
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(Self {
            image,
            text,
            device,
            kind,
            with_mask: artifact.manifest.text.needs_attention_mask(),
            name: artifact.model_id(),
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn to_embeddings(&self, out: Tensor, n: usize) -> Result<Embeddings, ModelError> {
        let out = out.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
        let dims = out.size();
        if dims.len() != 2 || dims[0] as usize != n {
            return Err(ModelError::Inference(format!(
                "encoder returned shape {dims:?} for a batch of {n}"
            )));
        }
        let dim = dims[1] as usize;
        let data =
            Vec::<f32>::try_from(out.view(-1)).map_err(|e| ModelError::Inference(e.to_string()))?;
        Ok(Embeddings { data, n, dim })
    }
}

impl Backend for TchBackend {
    fn describe(&self) -> String {
        format!("{} on {:?} ({:?})", self.name, self.device, self.kind)
    }

    fn embed_images(&mut self, batch: &ImageBatch) -> Result<Embeddings, ModelError> {
        let _guard = tch::no_grad_guard();
        let s = batch.size as i64;
        let failed = |e: tch::TchError| ModelError::Inference(e.to_string());
        let input = Tensor::from_slice(&batch.data).view([batch.n as i64, 3, s, s]);
        // Pinned host memory lets the copy to the card run asynchronously.
        let input = if self.device.is_cuda() {
            input.f_pin_memory(self.device).map_err(failed)?
        } else {
            input
        };
        let input = input
            .f_to_device_(self.device, self.kind, true, false)
            .map_err(failed)?;
        let out = self.image.forward_ts(&[input]).map_err(failed)?;
        self.to_embeddings(out, batch.n)
    }

    fn embed_tensor(&mut self, batch: &Tensor) -> Result<Embeddings, ModelError> {
        let _guard = tch::no_grad_guard();
        let failed = |e: tch::TchError| ModelError::Inference(e.to_string());
        let n = batch.size().first().copied().unwrap_or(0) as usize;
        // Already on the model's device when the device path made it: only the precision
        // changes there (a no-op copy on the CPU).
        let input = batch
            .f_to_device_(self.device, self.kind, true, false)
            .map_err(failed)?;
        let out = self.image.forward_ts(&[input]).map_err(failed)?;
        self.to_embeddings(out, n)
    }

    fn embed_texts(&mut self, batch: &TokenBatch) -> Result<Embeddings, ModelError> {
        let _guard = tch::no_grad_guard();
        let shape = [batch.n as i64, batch.len as i64];
        let ids = Tensor::from_slice(&batch.ids)
            .view(shape)
            .to_device(self.device);
        let out = if self.with_mask {
            let mask = Tensor::from_slice(&batch.mask)
                .view(shape)
                .to_device(self.device);
            self.text.forward_ts(&[ids, mask])
        } else {
            self.text.forward_ts(&[ids])
        };
        self.to_embeddings(
            out.map_err(|e| ModelError::Inference(e.to_string()))?,
            batch.n,
        )
    }
}
