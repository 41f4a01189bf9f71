//! The one error type of the crate: every message names the thing at fault.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--device cuda` (or `Device::Cuda`) was asked for on a machine without a usable GPU.
    #[error("no CUDA device available: {0}")]
    NoCuda(String),
    /// A CUDA driver, cuBLAS or kernel launch call failed.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },
    /// The memory plan does not fit the device.
    #[error(
        "the memory plan needs {need_mib:.1} MiB but the device has {free_mib:.1} MiB free; \
         the largest batch that fits is {max_batch}"
    )]
    OutOfMemory { need_mib: f64, free_mib: f64, max_batch: usize },
    /// A tensor was expected in a checkpoint or a golden file but is absent.
    #[error("{file}: missing tensor '{name}'")]
    MissingTensor { file: String, name: String },
    /// A tensor has a different shape from the one the model needs.
    #[error("{file}: tensor '{name}' has shape {got:?}, expected {want:?}")]
    ShapeMismatch { file: String, name: String, got: Vec<usize>, want: Vec<usize> },
    /// A checkpoint holds tensors the model does not know.
    #[error("{file}: unexpected tensor(s) {names:?}")]
    UnexpectedTensors { file: String, names: Vec<String> },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A file is not in the format it claims.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// An option or argument has an impossible value.
    #[error("invalid option {option}: {msg}")]
    Invalid { option: String, msg: String },
}

impl Error {
    pub fn invalid(option: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { option: option.into(), msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn cuda(op: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Cuda { op: op.into(), msg: e.to_string() }
    }
}
