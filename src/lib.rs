//! snella: a hand-written engine that fine-tunes vision transformers with SNELLA (kernelized sparse
//! fine-tuning with bi-level parameter competition), on CUDA or the CPU, with every byte planned.
//!
//! ```
//! use snella::model::{Model, Recompute, ViTConfig};
//! use snella::peft::Method;
//! use snella::{Backend, Device};
//!
//! # fn main() -> snella::Result<()> {
//! // A small ViT with SNELLA-8 branches (Device::auto() picks a GPU when there is one).
//! let cfg = ViTConfig::by_name("tiny", 10)?;
//! let method = Method::snella(8, 0.5);
//! let mut model = Model::new(Backend::new(Device::Cpu)?, &cfg, method, 2, Recompute::Attention)?;
//! print!("{}", model.rt.plan.table()); // every pool, sized before anything runs
//! model.init_branches(0)?; // official init; load real weights with model::load
//! let images = vec![0.1f32; 2 * 3 * 32 * 32]; // (B, C, H, W)
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
pub mod error;
pub mod golden;
pub mod model;
pub mod ops;
pub mod peft;
pub mod report;
pub mod runtime;
pub mod selftest;
pub mod train;

pub use error::{Error, Result};
pub use runtime::{Backend, Device, Plan, Pool, Runtime, Tensor};
