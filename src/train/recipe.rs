//! Training recipes: [`TrainConfig`], read from TOML files (`recipes/*.toml`) and adjusted with
//! `key=value` overrides from the command line.
//!
//! Every field has a default: the paper's recipe (method.md §14: AdamW lr 1e-3, 100 epochs, 10 warm-up epochs
//! from 1e-6, cosine to 1e-5; SNELLA allocator β1 = β2 = 0.85, init_warmup = final_warmup = 0,
//! mask_interval = 1: §8–§10). A recipe file only needs the fields it changes. Unknown keys are an error (a typo
//! must not silently fall back to a default).
//!
//! Validation is split in two: [`TrainConfig::validate`] checks values (no file system access, so the
//! shipped recipes with placeholder data paths load), [`TrainConfig::validate_paths`] checks that the data
//! and weights exist. Every failure is `Error::Invalid { option, msg }` naming the option.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{MemoryOptions, Precision, Recompute};
use crate::ops::kmerge::KernelKind;
use crate::peft::allocator::AllocatorConfig;
use crate::peft::Method;
use crate::runtime::Device;
use crate::runtime::GemmPrecision;
use crate::train::augment::Transform;

/// Where the images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `idx` when the folder holds `train-images-idx3-ubyte(.gz)`, else `folder`.
    Auto,
    /// `<data>/<train_split>/<class>/*.jpg|png` and `<data>/<test_split>/<class>/...` (torchvision ImageFolder).
    Folder,
    /// MNIST / Fashion-MNIST IDX files in `<data>` (`train-*` and `t10k-*`, gzipped or not), 10 classes.
    Idx,
}

/// A complete training run: model, method, optimizer and schedule, data, device and output.
///
/// TOML keys are the field names (flat, no tables). Paths in a recipe file are relative to the current
/// directory of the process, not to the file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ---- model ----
    /// A configuration name of [`crate::model::ViTConfig::by_name`] (`dinov2_s14`, `vit_b16`, `vit_l16`,
    /// `vit_h14`, `tiny`, ...), or `infer` to read the sizes from `weights` (`num_heads` then looked up for a
    /// size the library recognises, see [`crate::model::load::identify`], and required otherwise).
    pub model: String,
    /// Pre-trained backbone: timm / Hugging Face ViT or DINOv2 safetensors, a Google `.npz`, or a Hugging Face
    /// Hub id (`facebook/dinov2-small`, `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`, with or without
    /// `hf-hub:`) read from the local cache. Absent: a random backbone (for tests and smoke runs only).
    pub weights: Option<PathBuf>,
    /// Attention heads (checkpoints do not store them): needed with `model = "infer"` for a backbone of no
    /// known size; a count that disagrees with the named model, or with a recognised backbone, is refused.
    pub num_heads: Option<usize>,
    /// Square input side in pixels (a multiple of the patch size); the position table is resized to it.
    pub image_size: usize,

    // ---- method ----
    /// `full`, `linear`, `gps`, `loraR`, `snellR`, `snellaR`, `mixkR`, `kloraR` (R: rank; kernel ranks even).
    pub method: String,
    /// Kernel of the kernelized methods: `piecewise-linear` (the paper's), `linear`, `rbf`, `sigmoid`, `poly`.
    pub kernel: String,
    /// Rank override: replaces the rank written in `method` (or the method's default rank).
    pub rank: Option<usize>,
    /// Initial ratio of zeroed entries per layer: SNELL's fixed ratio s; SNELLA's ratio before the first
    /// reallocation (`init_thres`: FGVC 0, VTAB 0.01). In [0, 1].
    pub sparsity: f64,

    // ---- SNELLA allocator ----
    /// Ratio of zeroed entries the global budget decays to (per task, e.g. CUB 0.30). In [0, 1].
    pub target_ratio: f64,
    /// Epochs at the initial budget before the decay starts.
    pub init_warmup: usize,
    /// Epochs at the target budget at the end.
    pub final_warmup: usize,
    /// Reallocate every this many epochs (≥ 1).
    pub mask_interval: usize,
    /// EMA factor of the importance, in [0, 1).
    pub beta1: f64,
    /// EMA factor of the uncertainty, in [0, 1).
    pub beta2: f64,

    // ---- optimisation ----
    /// Peak learning rate of the cosine schedule (> 0).
    pub lr: f64,
    /// AdamW decoupled weight decay on ≥ 2-D non-bias tensors (≥ 0).
    pub weight_decay: f64,
    /// Epochs (≥ 1); also the cosine period and the allocator's schedule length.
    pub epochs: usize,
    /// Linear warm-up epochs of the schedule.
    pub warmup_epochs: usize,
    /// Learning rate of epoch 0 and start of the warm-up (≥ 0).
    pub warmup_lr: f64,
    /// Floor of the cosine (≥ 0).
    pub min_lr: f64,
    /// Images per optimizer step (≥ 1); the model is planned for it, evaluation uses it too.
    pub batch: usize,
    /// Seed of everything random: head and branch initialisation, subsets, shuffling, augmentation.
    pub seed: u64,

    // ---- execution ----
    /// `cpu`, `cuda` or `auto` (CUDA when usable, else the CPU).
    pub device: String,
    /// Activation recomputation: `none`, `norms`, `attention` (default), `block`.
    pub recompute: String,
    /// Dropout on the kernel branches' input and drop-path on their outputs (the official recipe: 0.1 and 0.1;
    /// default 0 = off, which lets the branches merge into W0 for speed).
    pub branch_dropout: f64,
    /// Drop-path rate on the kernel branches' outputs, in [0, 1) (see `branch_dropout`).
    pub branch_drop_path: f64,
    /// Stochastic depth of the blocks (timm `drop_path_rate`, linear over depth; the official recipe: 0.1).
    pub drop_path: f64,
    /// Precision of the matrix products: `fp32` (exact, default), or on CUDA `tf32` / `bf16` tensor cores
    /// (reduced-precision products). Independent of `precision`.
    pub gemm: String,
    /// Storage precision: `fp32` (default) or `bf16` (frozen block weights and the kept residual stream in
    /// bf16, the trainable set and all math fp32; see `snella::model::Precision`).
    #[serde(skip_serializing_if = "is_fp32")] // recipes and checkpoints from before the field keep their hash
    pub precision: String,
    /// CPU threads for the run (0: one per core).
    pub threads: usize,

    // ---- data ----
    /// Dataset folder (see [`DataFormat`]).
    pub data: PathBuf,
    /// How `data` is laid out.
    pub data_format: DataFormat,
    /// Subfolder of the training split (image folders).
    pub train_split: String,
    /// Subfolder of the evaluation split (image folders).
    pub test_split: String,
    /// Use only this many training images (a seeded, class-stratified subset); absent: all.
    pub train_subset: Option<usize>,
    /// Use only this many test images (seeded, class-stratified); absent: all.
    pub test_subset: Option<usize>,
    /// Training pipeline: `fgvc` (RandomResizedCrop + flip + ColorJitter) or `vtab` (direct resize).
    pub train_transform: String,
    /// Evaluation pipeline: `eval` (resize 256/224 + centre crop) or `vtab` (direct resize).
    pub eval_transform: String,

    // ---- output ----
    /// Folder for `metrics.jsonl`, `checkpoint.safetensors` and exports (created if missing).
    pub out_dir: PathBuf,
    /// Also write a checkpoint every this many optimizer steps inside an epoch (0: only at epoch ends).
    pub checkpoint_every: u64,
    /// Evaluate on the test split every this many epochs (≥ 1); the last epoch is always evaluated.
    pub eval_every: usize,
    /// Stop after this many optimizer steps in total, without writing anything more, as if the process had
    /// been killed there (smoke tests, resume tests). Absent: run all epochs.
    pub max_steps: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "dinov2_s14".into(),
            weights: None,
            num_heads: None,
            image_size: 224,
            method: "snella32".into(),
            kernel: "piecewise-linear".into(),
            rank: None,
            sparsity: 0.0,
            target_ratio: 0.9,
            init_warmup: 0,
            final_warmup: 0,
            mask_interval: 1,
            beta1: 0.85,
            beta2: 0.85,
            lr: 1e-3,
            weight_decay: 1e-4,
            epochs: 100,
            warmup_epochs: 10,
            warmup_lr: 1e-6,
            min_lr: 1e-5,
            batch: 32,
            seed: 0,
            device: "auto".into(),
            recompute: "attention".into(),
            gemm: "fp32".into(),
            precision: "fp32".into(),
            branch_dropout: 0.0,
            branch_drop_path: 0.0,
            drop_path: 0.0,
            threads: 0,
            data: PathBuf::from("data"),
            data_format: DataFormat::Auto,
            train_split: "train".into(),
            test_split: "test".into(),
            train_subset: None,
            test_subset: None,
            train_transform: "fgvc".into(),
            eval_transform: "eval".into(),
            out_dir: PathBuf::from("runs/default"),
            checkpoint_every: 0,
            eval_every: 1,
            max_steps: None,
        }
    }
}

// ---- the option names recipes and the command line use, as `FromStr` for the public option enums ----

impl std::str::FromStr for KernelKind {
    type Err = Error;
    /// A kernel name (case-insensitive, `-` or `_`): `piecewise-linear` (alias `pl`), `linear`, `rbf`,
    /// `sigmoid`, `poly`. Error: `Invalid { option: "kernel" }`.
    fn from_str(s: &str) -> Result<KernelKind> {
        Ok(match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "piecewise-linear" | "piecewiselinear" | "pl" => KernelKind::PiecewiseLinear,
            "linear" => KernelKind::Linear,
            "rbf" => KernelKind::Rbf,
            "sigmoid" => KernelKind::Sigmoid,
            "poly" => KernelKind::Poly,
            _ => {
                return Err(Error::invalid(
                    "kernel",
                    format!("unknown kernel '{s}' (piecewise-linear, linear, rbf, sigmoid, poly)"),
                ))
            }
        })
    }
}

impl std::str::FromStr for Recompute {
    type Err = Error;
    /// `none`, `norms`, `attention`, `block` (case-insensitive). Error: `Invalid { option: "recompute" }`.
    fn from_str(s: &str) -> Result<Recompute> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "none" => Recompute::None,
            "norms" => Recompute::Norms,
            "attention" => Recompute::Attention,
            "block" => Recompute::Block,
            _ => {
                return Err(Error::invalid("recompute", format!("unknown level '{s}' (none, norms, attention, block)")))
            }
        })
    }
}

fn is_fp32(s: &str) -> bool {
    s.trim().eq_ignore_ascii_case("fp32")
}

impl std::str::FromStr for Precision {
    type Err = Error;
    /// `fp32`, `bf16` (case-insensitive). Error: `Invalid { option: "precision" }`.
    fn from_str(s: &str) -> Result<Precision> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "fp32" => Precision::Fp32,
            "bf16" => Precision::Bf16,
            _ => return Err(Error::invalid("precision", format!("unknown storage precision '{s}' (fp32, bf16)"))),
        })
    }
}

impl std::str::FromStr for GemmPrecision {
    type Err = Error;
    /// `fp32`, `tf32`, `bf16` (case-insensitive). Error: `Invalid { option: "gemm" }`.
    fn from_str(s: &str) -> Result<GemmPrecision> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "fp32" => GemmPrecision::Fp32,
            "tf32" => GemmPrecision::Tf32,
            "bf16" => GemmPrecision::Bf16,
            _ => return Err(Error::invalid("gemm", format!("unknown precision '{s}' (fp32, tf32, bf16)"))),
        })
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda` (alias `gpu`), `cuda-emu` (alias `emu`, the emulated CUDA device) or `auto` (probes CUDA,
    /// see [`Device::auto`]), case-insensitive. Error: `Invalid { option: "device" }`.
    fn from_str(s: &str) -> Result<Device> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "cuda-emu" | "emu" => Ok(Device::CudaEmu),
            "auto" => Ok(Device::auto()),
            _ => Err(Error::invalid("device", format!("unknown device '{s}' (cpu, cuda, cuda-emu, auto)"))),
        }
    }
}

impl std::str::FromStr for DataFormat {
    type Err = Error;
    /// `auto`, `folder`, `idx` (case-insensitive), as in a recipe. Error: `Invalid { option: "data_format" }`.
    fn from_str(s: &str) -> Result<DataFormat> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "folder" => Ok(DataFormat::Folder),
            "idx" => Ok(DataFormat::Idx),
            _ => Err(Error::invalid("data_format", format!("unknown data format '{s}' (auto, folder, idx)"))),
        }
    }
}

/// The device a `device` string asks for (see `Device`'s `FromStr`).
pub(crate) fn parse_device(s: &str) -> Result<Device> {
    s.parse()
}

fn toml_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("not a valid training recipe: {e}"))
}

/// The fields that may be absent (`none` or an empty value in an override removes them).
pub const OPTIONAL_KEYS: [&str; 6] = ["weights", "num_heads", "rank", "train_subset", "test_subset", "max_steps"];

impl TrainConfig {
    /// Reads a TOML recipe and validates its values ([`TrainConfig::validate`]; paths are not checked).
    ///
    /// # Errors
    /// `Error::Io` (unreadable file), `Error::Format` (not TOML, an unknown key, a value of the
    /// wrong type — the message names the key and line), `Error::Invalid` (an impossible value).
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e| toml_err(path, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a recipe from TOML text and validates it.
    ///
    /// # Errors
    /// `Invalid { option: "recipe" }` for text that is not a recipe (bad TOML, unknown key, wrong type);
    /// `Invalid` naming the option for an impossible value.
    pub fn from_toml(text: &str) -> Result<TrainConfig> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| Error::invalid("recipe", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The recipe as TOML text (every field, absent options omitted).
    ///
    /// # Errors
    /// `Invalid` naming the field when a value has no TOML form (a path that is not UTF-8, an integer above
    /// `i64::MAX`).
    pub fn to_toml(&self) -> Result<String> {
        self.check_toml_values()?;
        toml::to_string(self).map_err(|e| Error::invalid("recipe", format!("cannot be written as TOML: {e}")))
    }

    /// Values TOML cannot hold: paths that are not UTF-8, integers above `i64::MAX`.
    fn check_toml_values(&self) -> Result<()> {
        for (name, p) in
            [("weights", self.weights.as_deref()), ("data", Some(&*self.data)), ("out_dir", Some(&*self.out_dir))]
        {
            if let Some(p) = p.filter(|p| p.to_str().is_none()) {
                return Err(Error::invalid(
                    name,
                    format!("{} is not valid UTF-8 (recipes are TOML text)", p.display()),
                ));
            }
        }
        let big = i64::MAX as u64;
        for (name, v) in [
            ("seed", Some(self.seed)),
            ("checkpoint_every", Some(self.checkpoint_every)),
            ("max_steps", self.max_steps),
        ] {
            if v.is_some_and(|v| v > big) {
                return Err(Error::invalid(name, format!("must be at most {big} (a TOML integer)")));
            }
        }
        for (name, v) in [
            ("image_size", Some(self.image_size)),
            ("num_heads", self.num_heads),
            ("rank", self.rank),
            ("init_warmup", Some(self.init_warmup)),
            ("final_warmup", Some(self.final_warmup)),
            ("mask_interval", Some(self.mask_interval)),
            ("epochs", Some(self.epochs)),
            ("warmup_epochs", Some(self.warmup_epochs)),
            ("batch", Some(self.batch)),
            ("threads", Some(self.threads)),
            ("train_subset", self.train_subset),
            ("test_subset", self.test_subset),
            ("eval_every", Some(self.eval_every)),
        ] {
            if v.is_some_and(|v| v as u64 > big) {
                return Err(Error::invalid(name, format!("must be at most {big} (a TOML integer)")));
            }
        }
        Ok(())
    }

    /// Applies command-line overrides `(key, value)` in order, then validates.
    ///
    /// `key` is a field name; `value` is read as a TOML value when it parses as one of the field's type
    /// (`1e-3`, `true`, `32`), else as a string (`snella32`, `/data/cub`); `none` (or an empty value)
    /// removes an optional field ([`OPTIONAL_KEYS`]) and is an error for the others.
    ///
    /// # Errors
    /// `Invalid { option: key }` for an unknown key, a value of the wrong type or an impossible value (the
    /// recipe is left unchanged); `Invalid` naming a field of the current recipe that has no TOML form.
    pub fn apply_overrides(&mut self, overrides: &[(&str, &str)]) -> Result<()> {
        self.check_toml_values()?;
        let mut table = match toml::Value::try_from(&*self) {
            Ok(toml::Value::Table(t)) => t,
            Ok(_) => return Err(Error::invalid("recipe", "does not serialise to a TOML table")),
            Err(e) => return Err(Error::invalid("recipe", format!("cannot be written as TOML: {e}"))),
        };
        let known = TrainConfig::keys();
        for &(key, value) in overrides {
            let key = key.trim().trim_start_matches("--").replace('-', "_");
            if key.is_empty() {
                return Err(Error::invalid("overrides", format!("'={value}' has no key (KEY=VALUE)")));
            }
            if !known.contains(&key.as_str()) {
                return Err(Error::invalid(key.clone(), format!("unknown option (known: {})", known.join(", "))));
            }
            let v = value.trim();
            if v.is_empty() || v.eq_ignore_ascii_case("none") {
                if !OPTIONAL_KEYS.contains(&key.as_str()) {
                    return Err(Error::invalid(
                        key.clone(),
                        format!("needs a value ('{v}' removes only the optional {})", OPTIONAL_KEYS.join(", ")),
                    ));
                }
                table.remove(&key);
                continue;
            }
            // A TOML literal if it is one, else the raw text as a string.
            let parsed = toml::from_str::<toml::Table>(&format!("v = {v}")).ok().and_then(|mut t| t.remove("v"));
            let val = match parsed {
                Some(p) => p,
                None => toml::Value::String(v.to_string()),
            };
            let mut trial = table.clone();
            trial.insert(key.clone(), val.clone());
            // A number given to a string field ("method = 8"?) or the reverse: retry as a string.
            let ok = toml::Value::Table(trial.clone()).try_into::<TrainConfig>();
            match ok {
                Ok(_) => table = trial,
                Err(e) => {
                    let mut as_str = table.clone();
                    as_str.insert(key.clone(), toml::Value::String(v.to_string()));
                    if toml::Value::Table(as_str.clone()).try_into::<TrainConfig>().is_ok() {
                        table = as_str;
                    } else {
                        return Err(Error::invalid(
                            key.clone(),
                            format!("bad value '{v}': {}", first_line(&e.to_string())),
                        ));
                    }
                }
            }
        }
        let cfg: TrainConfig =
            toml::Value::Table(table).try_into().map_err(|e| Error::invalid("overrides", e.to_string()))?;
        cfg.validate()?;
        *self = cfg;
        Ok(())
    }

    /// Every TOML key, in declaration order.
    pub fn keys() -> Vec<&'static str> {
        vec![
            "model",
            "weights",
            "num_heads",
            "image_size",
            "method",
            "kernel",
            "rank",
            "sparsity",
            "target_ratio",
            "init_warmup",
            "final_warmup",
            "mask_interval",
            "beta1",
            "beta2",
            "lr",
            "weight_decay",
            "epochs",
            "warmup_epochs",
            "warmup_lr",
            "min_lr",
            "batch",
            "seed",
            "device",
            "recompute",
            "gemm",
            "precision",
            "branch_dropout",
            "branch_drop_path",
            "drop_path",
            "threads",
            "data",
            "data_format",
            "train_split",
            "test_split",
            "train_subset",
            "test_subset",
            "train_transform",
            "eval_transform",
            "out_dir",
            "checkpoint_every",
            "eval_every",
            "max_steps",
        ]
    }

    /// Checks every value (not the file system).
    ///
    /// # Errors
    /// The first problem found, as `Invalid { option, msg }` naming the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(name, format!("must be a positive number, got {v}")));
            }
            Ok(())
        };
        let nonneg = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(name, format!("must be a non-negative number, got {v}")));
            }
            Ok(())
        };
        let ratio = |name: &str, v: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid(name, format!("must be a ratio in [0, 1], got {v}")));
            }
            Ok(())
        };
        let beta = |name: &str, v: f64| -> Result<()> {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(name, format!("must be in [0, 1), got {v}")));
            }
            Ok(())
        };
        if self.model.trim().is_empty() {
            return Err(Error::invalid("model", "is empty (a model name, or 'infer' with weights and num_heads)"));
        }
        if self.model == "infer" {
            if self.weights.is_none() {
                return Err(Error::invalid("model", "'infer' reads the sizes from weights, but no weights are set"));
            }
        } else {
            let named = crate::model::ViTConfig::by_name(&self.model, 1)?;
            if let Some(h) = self.num_heads.filter(|&h| h != named.num_heads) {
                return Err(Error::invalid(
                    "num_heads",
                    format!("{h} disagrees with model '{}', which has {} heads", self.model, named.num_heads),
                ));
            }
        }
        if self.num_heads == Some(0) {
            return Err(Error::invalid("num_heads", "must be at least 1"));
        }
        if self.image_size == 0 || self.image_size > crate::train::augment::MAX_SIZE {
            return Err(Error::invalid(
                "image_size",
                format!("{} is not in 1..={} pixels", self.image_size, crate::train::augment::MAX_SIZE),
            ));
        }
        ratio("sparsity", self.sparsity)?;
        self.method()?;
        ratio("target_ratio", self.target_ratio)?;
        if self.mask_interval == 0 {
            return Err(Error::invalid("mask_interval", "must be at least 1"));
        }
        beta("beta1", self.beta1)?;
        beta("beta2", self.beta2)?;
        pos("lr", self.lr)?;
        nonneg("weight_decay", self.weight_decay)?;
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1"));
        }
        nonneg("warmup_lr", self.warmup_lr)?;
        nonneg("min_lr", self.min_lr)?;
        if self.batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        if !matches!(
            self.device.trim().to_ascii_lowercase().as_str(),
            "cpu" | "cuda" | "gpu" | "cuda-emu" | "emu" | "auto"
        ) {
            return Err(Error::invalid(
                "device",
                format!("unknown device '{}' (cpu, cuda, cuda-emu, auto)", self.device),
            ));
        }
        self.recompute()?;
        self.gemm()?;
        self.precision()?;
        for (name, v) in [
            ("branch_dropout", self.branch_dropout),
            ("branch_drop_path", self.branch_drop_path),
            ("drop_path", self.drop_path),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(name, format!("must be in [0, 1), got {v}")));
            }
        }
        if self.train_split.is_empty() || self.test_split.is_empty() {
            return Err(Error::invalid("train_split", "split names must not be empty"));
        }
        if self.train_subset == Some(0) {
            return Err(Error::invalid("train_subset", "must be at least 1 (or absent for all images)"));
        }
        if self.test_subset == Some(0) {
            return Err(Error::invalid("test_subset", "must be at least 1 (or absent for all images)"));
        }
        self.train_transform()?;
        self.eval_transform()?;
        if self.out_dir.as_os_str().is_empty() {
            return Err(Error::invalid("out_dir", "is empty"));
        }
        if self.eval_every == 0 {
            return Err(Error::invalid("eval_every", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::invalid("max_steps", "must be at least 1 (or absent)"));
        }
        self.check_toml_values()
    }

    /// Checks that `data` (with its splits or IDX files) and `weights` exist.
    ///
    /// # Errors
    /// `Invalid { option: "data" | "weights", msg }` naming the missing path.
    pub fn validate_paths(&self) -> Result<()> {
        if let Some(w) = &self.weights {
            if !w.is_file() {
                return Err(Error::invalid("weights", format!("{} does not exist or is not a file", w.display())));
            }
        }
        if self.data.exists() && !self.data.is_dir() {
            return Err(Error::invalid("data", format!("{} is a file, not a folder", self.data.display())));
        }
        if !self.data.is_dir() {
            return Err(Error::invalid("data", format!("folder {} does not exist", self.data.display())));
        }
        match self.resolved_data_format() {
            DataFormat::Idx => {
                for p in ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"] {
                    let a = self.data.join(p);
                    let b = self.data.join(format!("{p}.gz"));
                    if !a.is_file() && !b.is_file() {
                        return Err(Error::invalid(
                            "data",
                            format!("IDX folder {} has no {p} (or {p}.gz)", self.data.display()),
                        ));
                    }
                }
            }
            _ => {
                for split in [&self.train_split, &self.test_split] {
                    let d = self.data.join(split);
                    if !d.is_dir() {
                        return Err(Error::invalid(
                            "data",
                            format!(
                                "image folder {} has no '{split}' split ({} is missing)",
                                self.data.display(),
                                d.display()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `data_format` with `auto` resolved by looking at the folder.
    pub fn resolved_data_format(&self) -> DataFormat {
        match self.data_format {
            DataFormat::Auto => {
                let idx = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"]
                    .iter()
                    .any(|n| self.data.join(n).is_file());
                if idx {
                    DataFormat::Idx
                } else {
                    DataFormat::Folder
                }
            }
            f => f,
        }
    }

    /// The method with `rank`, `kernel` and `sparsity` applied.
    ///
    /// # Errors
    /// `Invalid { option: "method" | "rank" | "kernel" }` (unknown method, odd kernel rank, ...).
    pub fn method(&self) -> Result<Method> {
        let m = self.method.trim().to_ascii_lowercase();
        let base = match self.rank {
            Some(0) => return Err(Error::invalid("rank", "must be at least 1")),
            Some(r) => {
                let name = m.trim_end_matches(|c: char| c.is_ascii_digit());
                if matches!(name, "full" | "linear" | "gps") {
                    return Err(Error::invalid("rank", format!("method '{name}' has no rank")));
                }
                let kernel = matches!(name, "snell" | "snella" | "mixk" | "klora");
                if kernel && r > 2 * crate::ops::kmerge::MAX_D {
                    return Err(Error::invalid(
                        "rank",
                        format!("rank {r} exceeds the largest supported {}", 2 * crate::ops::kmerge::MAX_D),
                    ));
                }
                if kernel && r % 2 != 0 {
                    return Err(Error::invalid(
                        "rank",
                        format!("kernel rank must be even (two pieces of r/2), got {r}"),
                    ));
                }
                format!("{name}{r}")
            }
            None => m,
        };
        let mut method = Method::parse(&base, self.sparsity as f32)?;
        let kernel: KernelKind = self.kernel.parse()?;
        if let Method::Kernel(k) = &mut method {
            k.kernel = kernel;
            k.dropout = self.branch_dropout as f32;
            k.drop_path = self.branch_drop_path as f32;
            if k.r / 2 > crate::ops::kmerge::MAX_D {
                return Err(Error::invalid(
                    "rank",
                    format!("rank {} exceeds the largest supported {}", k.r, 2 * crate::ops::kmerge::MAX_D),
                ));
            }
        }
        Ok(method)
    }

    /// The allocator settings (used by SNELLA only).
    pub fn allocator(&self) -> AllocatorConfig {
        AllocatorConfig {
            init_ratio: self.sparsity,
            target_ratio: self.target_ratio,
            init_warmup: self.init_warmup,
            final_warmup: self.final_warmup,
            mask_interval: self.mask_interval,
            beta1: self.beta1,
            beta2: self.beta2,
            total_epochs: self.epochs,
        }
    }

    /// The training pipeline at `image_size`.
    ///
    /// # Errors
    /// `Invalid { option: "train_transform" }` for an unknown pipeline.
    pub fn train_transform(&self) -> Result<Transform> {
        Transform::parse(&self.train_transform, self.image_size.max(1))
            .map_err(|e| Error::invalid("train_transform", e.to_string()))
    }

    /// The evaluation pipeline at `image_size`.
    ///
    /// # Errors
    /// `Invalid { option: "eval_transform" }` for an unknown or random pipeline.
    pub fn eval_transform(&self) -> Result<Transform> {
        let t = Transform::parse(&self.eval_transform, self.image_size.max(1))
            .map_err(|e| Error::invalid("eval_transform", e.to_string()))?;
        if matches!(t, Transform::TrainFgvc { .. }) {
            return Err(Error::invalid(
                "eval_transform",
                "the random FGVC training pipeline cannot evaluate (eval or vtab)",
            ));
        }
        Ok(t)
    }

    /// The precision of the matrix products.
    ///
    /// # Errors
    /// `Invalid { option: "gemm" }` for an unknown precision.
    pub fn gemm(&self) -> Result<GemmPrecision> {
        self.gemm.parse()
    }

    /// The storage precision.
    ///
    /// # Errors
    /// `Invalid { option: "precision" }` for an unknown precision.
    pub fn precision(&self) -> Result<Precision> {
        self.precision.parse()
    }

    /// The memory options of the model: recompute level and storage precision, and at `block` the branch
    /// factors updated inside the backward ([`MemoryOptions::for_training`]).
    ///
    /// # Errors
    /// As [`TrainConfig::recompute`] and [`TrainConfig::precision`].
    pub fn memory(&self) -> Result<MemoryOptions> {
        Ok(MemoryOptions::for_training(self.recompute()?, self.precision()?))
    }

    /// The recompute level.
    ///
    /// # Errors
    /// `Invalid { option: "recompute" }` for an unknown level.
    pub fn recompute(&self) -> Result<Recompute> {
        self.recompute.parse()
    }

    /// The fields that determine the training trajectory, as JSON: everything except `out_dir`, `threads`,
    /// `device`, `recompute`, `checkpoint_every`, `eval_every` and `max_steps` (which change where and how
    /// fast a run goes, not its numbers on one device).
    pub(crate) fn trajectory_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::invalid("recipe", e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            for k in ["out_dir", "threads", "device", "recompute", "checkpoint_every", "eval_every", "max_steps"] {
                o.remove(k);
            }
        }
        Ok(v)
    }

    /// A 64-bit FNV-1a hash of [`TrainConfig::trajectory_json`], as 16 hex digits; checkpoints carry it.
    pub(crate) fn hash(&self) -> Result<String> {
        let s = self.trajectory_json()?.to_string();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in s.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(format!("{h:016x}"))
    }
}

fn first_line(s: &str) -> String {
    s.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" ")
}
