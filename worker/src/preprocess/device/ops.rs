//! torchvision's JPEG operators, reached from tch.
//!
//! tch 0.24 cannot call a custom operator by name; TorchScript can. The embedded module
//! (`worker/assets/device_ops.pt`, written by `deploy/model/device_ops.py`) has two methods
//! that call `image::decode_jpeg` (libjpeg-turbo, CPU) and `image::decode_jpegs_cuda` (nvJPEG)
//! and nothing else. Loading it needs the operators registered first, so torchvision's
//! `image.so` is opened (RTLD_GLOBAL, never closed: its registrations must outlive every
//! call). That library is built as a Python extension and links `libtorch_python.so`, whose
//! Python symbols must resolve at load time: the matching `libpythonX.Y.so` is opened first
//! (no interpreter is started; nothing in it is called).
//!
//! Guarantees: loaded once per process (later calls get the same result, error included);
//! every failure names the library or setting at fault.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tch::{CModule, IValue, Tensor};

use super::DeviceError;

/// The TorchScript module calling torchvision's operators.
const MODULE: &[u8] = include_bytes!("../../../assets/device_ops.pt");

/// torchvision's `ImageReadMode::UNCHANGED`: grey stays one channel, CMYK comes out as four.
const UNCHANGED: i64 = 0;

/// The loaded operators; cheap to share between threads (calls are reentrant).
pub struct DeviceOps {
    module: CModule,
    /// Where the operators came from (logged, and in error messages).
    pub library: PathBuf,
}

impl std::fmt::Debug for DeviceOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOps")
            .field("library", &self.library)
            .finish()
    }
}

/// Libraries opened so far, kept (never unloaded) for the life of the process, and the ops.
static LOADED: Mutex<Option<Result<Arc<DeviceOps>, DeviceError>>> = Mutex::new(None);

impl DeviceOps {
    /// Loads torchvision's operators (`library`: its `image.so`; `None`: found next to the
    /// libtorch this process runs on) and the module that calls them. `python`: the
    /// `libpythonX.Y.so` to open first (`None`: found from the library's path). Once per
    /// process: operators cannot be registered twice, so later calls get the first call's
    /// result whatever paths they name.
    pub fn load(
        library: Option<&Path>,
        python: Option<&Path>,
    ) -> Result<Arc<DeviceOps>, DeviceError> {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(result) = loaded.as_ref() {
            return result.clone();
        }
        let result = load_uncached(library, python).map(Arc::new);
        *loaded = Some(result.clone());
        result
    }

    /// One JPEG to CHW uint8 on the CPU, as stored (EXIF orientation not applied).
    pub fn decode_cpu(&self, bytes: &Tensor) -> Result<Tensor, OpError> {
        let out = self
            .module
            .forward_is(&[
                IValue::Tensor(bytes.shallow_clone()),
                IValue::Int(UNCHANGED),
            ])
            .map_err(OpError::refused)?;
        match out {
            IValue::Tensor(t) => Ok(t),
            other => Err(OpError::NotATensor {
                returned: format!("{other:?}"),
            }),
        }
    }

    /// One JPEG to CHW uint8 on `cuda:index` through nvJPEG.
    pub fn decode_cuda(&self, bytes: &Tensor, index: usize) -> Result<Tensor, OpError> {
        let out = self
            .module
            .method_is(
                "decode_cuda",
                &[
                    IValue::TensorList(vec![bytes.shallow_clone()]),
                    IValue::Int(UNCHANGED),
                    IValue::Int(index as i64),
                ],
            )
            .map_err(OpError::refused)?;
        let mut list = match out {
            IValue::TensorList(l) => l,
            IValue::GenericList(l) => l
                .into_iter()
                .filter_map(|v| match v {
                    IValue::Tensor(t) => Some(t),
                    _ => None,
                })
                .collect(),
            other => {
                return Err(OpError::NotAList {
                    returned: format!("{other:?}"),
                })
            }
        };
        list.pop().ok_or(OpError::NoImage)
    }
}

/// Why torchvision's decoder gave no image for a JPEG (the image then takes the CPU path).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    /// The operator refused it: the last line of the TorchScript interpreter's message, the
    /// operator's own error.
    #[error("{0}")]
    Refused(String),
    #[error("decode_jpeg returned {returned}, not a tensor")]
    NotATensor { returned: String },
    #[error("decode_jpegs_cuda returned {returned}")]
    NotAList { returned: String },
    #[error("decode_jpegs_cuda returned no image")]
    NoImage,
}

impl OpError {
    fn refused(e: tch::TchError) -> Self {
        Self::Refused(last_line(&e.to_string()))
    }
}

/// The TorchScript interpreter's message ends with the operator's own error.
fn last_line(message: &str) -> String {
    message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
        .to_string()
}

/// The operator library to open: `library` when given (it must exist), else the default.
pub fn resolve_library(library: Option<&Path>) -> Result<PathBuf, DeviceError> {
    let library = match library {
        Some(p) => p.to_path_buf(),
        None => default_library()?,
    };
    if !library.is_file() {
        return Err(DeviceError::Library {
            path: library,
            message: "no such file (set preprocess.device_ops_library to torchvision's image.so)"
                .into(),
        });
    }
    Ok(library)
}

fn load_uncached(library: Option<&Path>, python: Option<&Path>) -> Result<DeviceOps, DeviceError> {
    let library = resolve_library(library)?;
    if !python_loaded() {
        let python = match python {
            Some(p) => p.to_path_buf(),
            None => find_python(&library)?,
        };
        open_global(&python).map_err(|e| DeviceError::Library {
            path: python.clone(),
            message: format!(
                "{e} (torchvision's image.so needs libpython's symbols; set \
                 preprocess.device_python_library)"
            ),
        })?;
    }
    open_global(&library).map_err(|e| DeviceError::Library {
        path: library.clone(),
        message: e.to_string(),
    })?;
    let mut module = CModule::load_data(&mut std::io::Cursor::new(MODULE)).map_err(|e| {
        DeviceError::Library {
            path: library.clone(),
            message: format!(
                "loaded, but the decode module does not load against it (is it torchvision \
                 0.26 for this torch?): {}",
                last_line(&e.to_string())
            ),
        }
    })?;
    module.set_eval();
    Ok(DeviceOps { module, library })
}

/// Opens a shared library for the life of the process, its symbols global.
fn open_global(path: &Path) -> Result<(), libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: these libraries' initialisers register operators (torchvision) or set up static
    // data (libpython, libtorch_python); none starts threads or needs an interpreter. The
    // handle is leaked on purpose: unloading would leave dangling registrations.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }?;
    std::mem::forget(lib);
    Ok(())
}

/// Paths of the shared objects mapped into this process.
fn mapped_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && p.contains(".so"))
        .map(PathBuf::from)
        .collect();
    out.dedup();
    out
}

fn python_loaded() -> bool {
    mapped_libraries().iter().any(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libpython3"))
    })
}

/// torchvision's `image.so` in the site-packages holding the libtorch this process runs on
/// (`.../site-packages/torch/lib/libtorch_cpu.so` → `.../site-packages/torchvision/image.so`).
pub fn default_library() -> Result<PathBuf, DeviceError> {
    let torch = mapped_libraries()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "libtorch_cpu.so"))
        .ok_or_else(|| DeviceError::Library {
            path: PathBuf::from("libtorch_cpu.so"),
            message: "not found among this process's libraries; set \
                      preprocess.device_ops_library to torchvision's image.so"
                .into(),
        })?;
    let site = torch
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    let candidate = site.join("torchvision").join("image.so");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(DeviceError::Library {
            path: candidate,
            message: format!(
                "no torchvision beside the torch at {} (install torchvision 0.26.0 there, or \
                 set preprocess.device_ops_library)",
                torch.display()
            ),
        })
    }
}

/// The `libpythonX.Y.so` of the Python whose site-packages hold `library`: X.Y from the path
/// (`lib/pythonX.Y/site-packages`), looked for in a virtual environment's base installation
/// (`pyvenv.cfg`'s `home`), the installation itself, then the system's library path.
fn find_python(library: &Path) -> Result<PathBuf, DeviceError> {
    let version = library
        .ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| n.starts_with("python3."))
        .map(str::to_string);
    let not_found = |message: String| DeviceError::Library {
        path: library.to_path_buf(),
        message,
    };
    let version = version.ok_or_else(|| {
        not_found(
            "not under lib/pythonX.Y/site-packages: cannot tell which libpython it needs; set \
             preprocess.device_python_library"
                .into(),
        )
    })?;
    let name = format!("lib{version}.so.1.0");
    // .../lib/python3.11/site-packages/torchvision/image.so → the prefix 4 levels up.
    let prefix = library.ancestors().nth(4).map(Path::to_path_buf);
    let mut candidates = Vec::new();
    if let Some(prefix) = &prefix {
        if let Ok(cfg) = std::fs::read_to_string(prefix.join("pyvenv.cfg")) {
            let home = cfg.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "home").then(|| PathBuf::from(v.trim()))
            });
            if let Some(home) = home.and_then(|h| h.parent().map(Path::to_path_buf)) {
                candidates.push(home.join("lib").join(&name));
            }
        }
        candidates.push(prefix.join("lib").join(&name));
    }
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        candidates.push(Path::new(dir).join(&name));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        not_found(format!(
            "no {name} found (the Python that torchvision is installed for must be a shared \
             build); set preprocess.device_python_library"
        ))
    })
}
