//! The ViT: configuration, parameters, forward and backward written out per layer, checkpoint loaders.
pub mod config;

pub use config::{Position, ViTConfig};
