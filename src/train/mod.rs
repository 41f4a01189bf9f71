//! Training: labelled image sources (`data`), the paper's augmentation pipelines (`augment`), batches of
//! augmented images (`loader`), the learning-rate schedule (`schedule`), recipes (`recipe`), the training
//! loop (`trainer`), checkpoints (`checkpoint`), the pictures of a run (`pictures`) and exports of the
//! fine-tuned weights (`export`; LoRA runs also as peft adapters, `peft_adapter`).
pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod loader;
pub mod peft_adapter;
pub mod pictures;
pub mod recipe;
pub mod schedule;
pub mod trainer;
