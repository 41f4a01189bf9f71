//! The ViT: configuration, parameters, forward and backward written out per layer, checkpoint loaders.
pub mod config;
pub mod load;
pub mod vit;

pub use config::{Position, ViTConfig};
pub(crate) use vit::plan_model;
pub use vit::{plan, MemoryOptions, Model, Precision, Recompute};
pub mod posembed;
