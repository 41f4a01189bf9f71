//! The one error type of the crate: every message names the thing at fault.
use std::path::PathBuf;

/// The crate's result type: `Err` is always an [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library. The `Display` text names the file, tensor or option at
/// fault; `Invalid { option, .. }` is the catch-all for impossible arguments.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--device cuda` (or `Device::Cuda`) was asked for on a machine without a usable GPU.
    #[error("no CUDA device available: {0}")]
    NoCuda(String),
    /// A CUDA driver, cuBLAS or kernel launch call failed.
    #[error("CUDA error in {op}: {msg}")]
    Cuda {
        /// The call that failed (e.g. `cuMemAlloc`, a kernel name).
        op: String,
        /// The driver's or library's error text.
        msg: String,
    },
    /// The memory plan does not fit the device.
    #[error(
        "the memory plan needs {need_mib:.1} MiB but the device has {free_mib:.1} MiB free; \
         the largest batch that fits is {max_batch}"
    )]
    OutOfMemory {
        /// MiB the plan needs.
        need_mib: f64,
        /// MiB the device reports free.
        free_mib: f64,
        /// The largest batch whose plan fits (0: none).
        max_batch: usize,
    },
    /// A tensor was expected in a checkpoint or a golden file but is absent.
    #[error("{file}: missing tensor '{name}'")]
    MissingTensor {
        /// The file that lacks it.
        file: String,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has a different shape from the one the model needs.
    #[error("{file}: tensor '{name}' has shape {got:?}, expected {want:?}")]
    ShapeMismatch {
        /// The file holding it.
        file: String,
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the model needs.
        want: Vec<usize>,
    },
    /// A checkpoint holds tensors the model does not know.
    #[error("{file}: unexpected tensor(s) {names:?}")]
    UnexpectedTensors {
        /// The file holding them.
        file: String,
        /// Their names.
        names: Vec<String>,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file is not in the format it claims.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An option or argument has an impossible value.
    #[error("invalid option {option}: {msg}")]
    Invalid {
        /// The option, argument or field at fault (e.g. `batch`, `lr`, `labels`).
        option: String,
        /// Why its value is impossible.
        msg: String,
    },
}

impl Error {
    /// [`Error::Invalid`] naming `option`.
    pub fn invalid(option: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { option: option.into(), msg: msg.into() }
    }
    /// [`Error::Io`] naming `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// [`Error::Format`] naming `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    /// [`Error::Cuda`] for the call `op`.
    pub fn cuda(op: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Cuda { op: op.into(), msg: e.to_string() }
    }
}
