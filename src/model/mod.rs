//! The ViT: configuration, parameters, forward and backward written out per layer, checkpoint loaders.
pub mod config;
pub mod vit;
pub mod load;

pub use config::{Position, ViTConfig};
pub use vit::{plan_model, Model, Recompute};
pub mod posembed;
