//! snella: a hand-written engine that fine-tunes vision transformers with SNELLA.
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
