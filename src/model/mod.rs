//! The ViT: configuration, parameters, forward and backward written out per layer, checkpoint loaders.
pub mod config;
pub mod load;
pub mod vit;

pub use config::{Position, ViTConfig};
pub use vit::{plan_model, Model, Recompute};
pub mod posembed;
