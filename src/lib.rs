//! snella: a hand-written engine that fine-tunes vision transformers with SNELLA (kernelized sparse
//! fine-tuning with bi-level parameter competition), on CUDA or the CPU, with every byte planned.
//!
//! ```
//! use snella::model::{load::Weights, ModelBuilder, Recompute, ViTConfig};
//! use snella::peft::Method;
//! use snella::train::trainer::random_backbone;
//! use snella::Device;
//!
//! # fn main() -> snella::Result<()> {
//! // A real run starts from a file or Hub id: Model::builder("dinov2_vits14.safetensors", method), which
//! // recognises DINOv2-S/14 and its 6 heads. Here a small random ViT, of a size the library does not know.
//! let cfg = ViTConfig::by_name("tiny", 10)?;
//! let weights = Weights { tensors: random_backbone(&cfg, 0), source: "tiny.safetensors".into() };
//! let (mut model, notes) = ModelBuilder::from_weights(weights, Method::snella(8, 0.5))
//!     .num_heads(4) // an unknown size: give its head count
//!     .batch(2)
//!     .recompute(Recompute::Attention)
//!     .device(Device::Cpu) // the default, Device::auto(), picks a GPU when there is one
//!     .build()?; // backbone loaded, position table and head adapted, branches initialised
//! println!("{}", notes.join("\n")); // what was inferred
//! print!("{}", model.plan().table()); // every pool, sized before anything runs
//! let images = vec![0.1f32; 2 * 3 * 32 * 32]; // (B, C, H, W), normalised
//! model.set_batch(&images, &[3, 7])?;
//! let loss = model.forward()?;
//! model.backward()?;
//! model.adamw_step(1e-3, 0.05)?;
//! assert!(loss.is_finite());
//! # Ok(())
//! # }
//! ```
//!
//! Where things are: `ARCHITECTURE.md`. The command line (`snella memory`, `selftest`, ...) is a client
//! of this library.
#![warn(missing_docs)]

pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod golden;
#[cfg(test)]
mod golden_parity;
mod io;
pub mod model;
mod ops;
pub mod peft;
mod plot;
pub mod report;
mod rng;
mod runtime;
pub mod selftest;
pub mod train;

pub use error::{Error, Result};
pub use ops::kmerge::KernelKind;
pub use runtime::{mib, Backend, DType, Device, GemmPrecision, Plan, Pool, PoolUsage, TensorSpec};

/// Whether a usable GPU is present: `Ok(name)` of device 0 (the driver, a device, cuBLAS and this binary's
/// kernels are all there), or `Err(reason)` saying what is missing. Never panics, also without a driver.
///
/// # Errors
/// The reason there is no usable GPU, as a sentence (not an [`Error`]: it is an answer, not a failure).
pub fn cuda_available() -> std::result::Result<String, String> {
    runtime::Cuda::probe()?;
    runtime::Cuda::device_name()
}

/// The GPU that [`Device::Cuda`] runs on, as its driver reports it.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// Device name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Device memory in bytes.
    pub total_bytes: usize,
    /// Free device memory in bytes, measured after this process created its context.
    pub free_bytes: usize,
}

/// Opens device 0 and reports its name and memory.
///
/// # Errors
/// [`Error::NoCuda`] naming what is missing; [`Error::Cuda`] when the context cannot be created.
pub fn gpu_info() -> Result<GpuInfo> {
    let c = runtime::Cuda::new()?;
    let (free_bytes, total_bytes) = c.mem_info()?;
    Ok(GpuInfo { name: c.name.clone(), total_bytes, free_bytes })
}

/// Whether this build embeds the CUDA kernels (nvcc was found when it was compiled).
pub const KERNELS_COMPILED: bool = runtime::cuda::KERNELS_COMPILED;

/// Test support: the planted-bug kernels of the emulated device (`tests/emu_sanitizer.rs`) and write faults
/// (`tests/disk_faults.rs`). Not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::io::fault::FailWrites;
    pub use crate::runtime::planted::{launch_planted, PlantedArg};
}

/// Whether this build has the emulated CUDA device ([`Device::CudaEmu`]): `Err(reason)` when its kernels could not
/// be compiled for the host (see build.rs).
///
/// # Errors
/// The reason, as a sentence.
pub fn cuda_emu_available() -> std::result::Result<(), String> {
    match runtime::cuda::EMU_UNAVAILABLE {
        None => Ok(()),
        Some(why) => Err(why.to_string()),
    }
}
