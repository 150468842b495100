//! The CUDA device's memory in the metrics (`clipqc_gpu_memory_bytes`), read from NVML.
//!
//! Guarantees: never fails the worker. Without NVML (no driver, CPU-only machine) it logs
//! once and exports nothing. The numbers are the device's (every process on it), which is
//! what decides whether another replica or a bigger batch fits.

use std::time::Duration;

use nvml_wrapper::Nvml;

/// Polls device `cuda_index` (as libtorch numbers it) every `every` on a thread of its own.
pub fn spawn_monitor(cuda_index: usize, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("clipqc-gpu-metrics".into())
        .spawn(move || {
            let nvml = match Nvml::init() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "NVML unavailable: no clipqc_gpu_memory_bytes");
                    return;
                }
            };
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            let device = match nvml_device(&nvml, visible.as_deref(), cuda_index) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, cuda_index, "no NVML device for the model's CUDA device");
                    return;
                }
            };
            loop {
                match device.memory_info() {
                    Ok(m) => crate::metrics::gpu_memory(cuda_index as u32, m.used, m.total),
                    Err(e) => tracing::debug!(error = %e, "NVML memory_info"),
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the GPU metrics thread");
    }
}

/// libtorch numbers the devices CUDA_VISIBLE_DEVICES leaves; NVML numbers all of them.
fn nvml_device<'n>(
    nvml: &'n Nvml,
    visible: Option<&str>,
    cuda_index: usize,
) -> Result<nvml_wrapper::Device<'n>, nvml_wrapper::error::NvmlError> {
    match visible_entry(visible, cuda_index) {
        Some(Visible::Index(i)) => nvml.device_by_index(i),
        Some(Visible::Uuid(u)) => nvml.device_by_uuid(u),
        None => nvml.device_by_index(cuda_index as u32),
    }
}

#[derive(Debug, PartialEq)]
enum Visible<'a> {
    Index(u32),
    Uuid(&'a str),
}

fn visible_entry(visible: Option<&str>, cuda_index: usize) -> Option<Visible<'_>> {
    let entry = visible?.split(',').map(str::trim).nth(cuda_index)?;
    Some(match entry.parse() {
        Ok(i) => Visible::Index(i),
        Err(_) => Visible::Uuid(entry),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_maps_torch_indices_to_nvml() {
        assert_eq!(visible_entry(None, 0), None);
        assert_eq!(visible_entry(Some("2,3"), 1), Some(Visible::Index(3)));
        assert_eq!(
            visible_entry(Some("GPU-8f0c, GPU-11aa"), 1),
            Some(Visible::Uuid("GPU-11aa"))
        );
        assert_eq!(visible_entry(Some("2"), 1), None);
    }
}
