//! Training data: labelled image sources (`data`) and the paper's augmentation pipelines (`augment`).
pub mod augment;
pub mod data;
