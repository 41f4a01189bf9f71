//! The ViT: configuration, the plan of every tensor of a step, the forward and backward written out per
//! layer, checkpoint loaders.
mod access;
pub mod config;
pub mod hub;
mod linear;
pub mod load;
mod plan;
pub mod vit;

pub(crate) use access::TrackedFactor;
pub use config::{Position, ViTConfig};
pub(crate) use plan::plan_model;
pub use plan::{plan, MemoryOptions, Precision, Recompute};
pub use vit::Model;
pub mod posembed;
