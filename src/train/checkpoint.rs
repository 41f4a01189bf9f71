//! Training checkpoints: the trainable set only (values, AdamW moments), the SNELLA allocator's EMAs, the
//! per-layer sparsity, the step counters and the loader position — megabytes, never the frozen backbone.
//!
//! Format: one safetensors file. Tensors (all F32):
//!  * `param.<name>`, `adamw.m.<name>`, `adamw.v.<name>` for every trainable parameter `<name>`;
//!  * `alloc.ipt.<branch>.In_Qs`, `alloc.unc.<branch>.In_Qs`, `alloc.ipt.<branch>.Out_Qs`,
//!    `alloc.unc.<branch>.Out_Qs` for every branch with allocator state.
//!
//! The safetensors `__metadata__` holds one key, `snella_checkpoint`, a JSON [`CheckpointMeta`]: format
//! version, method name, model configuration, the training configuration and its hash, the AdamW step
//! count, the per-branch sparsity (f32, exact), the [`TrainState`] (epoch, batches done in it, running
//! sums) and an FNV-1a checksum of the tensor bytes (so a flipped byte is detected, not only truncation).
//!
//! Resume is exact: the data order and augmentation depend only on `(seed, epoch, index)`, so restoring
//! this state and skipping the batches already done reproduces the uninterrupted run bit for bit.
//!
//! Files are written atomically ([`write_atomic`]): to a temporary file in the same folder, synced, then
//! renamed over the target; on any error the temporary is removed and the target is untouched.
//!
//! # The outputs of a run follow its checkpoint
//!
//! An atomic rename makes one file whole; it does not make two files agree. A run writes several (the
//! checkpoint, `metrics.jsonl`, the exports), and a kill can fall between any two writes. So the checkpoint
//! is the one record of what a run has done, and every other output of the run is brought back to it:
//!
//! 1. **Written before the checkpoint that counts it.** The metrics line of epoch `e` is appended and synced
//!    before the checkpoint whose `state.epoch` is `e + 1` is renamed into place; exports are written only
//!    after the final checkpoint, which no later session changes, and a fresh run writes its first checkpoint
//!    before it clears what an earlier run left. So after a kill at any instant an output holds at least what
//!    the last checkpoint counts; it may hold more (a line or a torn line of a state the checkpoint has not
//!    reached, a temporary, what an earlier run left), never less.
//! 2. **Carried by the checkpoint.** [`TrainState::metrics`] holds the `metrics.jsonl` lines of the epochs
//!    done, byte for byte (each stamped with its `epoch` and `step`). The exports need no record: a run
//!    whose checkpoint is not final has none.
//! 3. **Restored at the start of every session.** Before its first step, `Trainer::run` (fresh or resumed)
//!    removes the temporaries of killed writers, rewrites `metrics.jsonl` to exactly [`TrainState::metrics`]
//!    (no duplicate and no missing line, whatever the kill left), and removes the exports unless the run is
//!    complete. A fresh run starts from an empty record, so it also clears what an earlier run left there.
//!
//! **Derived outputs: the pictures** (`curves.{png,svg}`, `allocation.{png,svg}`, `train/pictures.rs`) are drawn
//! from [`TrainState::metrics`] only, the lines the checkpoint counts: each file atomically, *after* the
//! checkpoint of an evaluated epoch, and again at the start of every session (removed first, so a fresh run
//! also clears an earlier run's). So a picture never shows an epoch its checkpoint does not count; a kill
//! between a checkpoint and its pictures leaves them one evaluation behind until the next session, or
//! `snella plot`, redraws them from `metrics.jsonl`. A picture that cannot be drawn is a note, not an error
//! (`Trainer::pictures_failed`): the checkpoint is already on disk when pictures are drawn, and they can be
//! redrawn at any time, so stopping a run for one would lose work and protect nothing.
//!
//! An output added later follows the same three steps: written before the checkpoint that counts it (or only
//! once the run is complete), carried by the checkpoint (or empty until the run is complete), and restored in
//! `Trainer::run`. `tests/crash.rs` checks the rule by killing the `snella` binary at random instants.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::safetensors::{f32_values, serialize, File, RawTensor};
use crate::model::{Model, ViTConfig};
use crate::train::recipe::TrainConfig;

// Checkpoints are written with the crate's one atomic writer.
pub use crate::io::write_atomic;

/// Format version written into [`CheckpointMeta::version`].
pub(crate) const CHECKPOINT_VERSION: u32 = 1;
/// The `__metadata__` key holding the JSON metadata.
pub(crate) const META_KEY: &str = "snella_checkpoint";

/// Where a run stands: enough to continue it exactly.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// The epoch in progress (0-based), or the next one to start when `step_in_epoch == 0`.
    pub epoch: usize,
    /// Batches of `epoch` already trained on (the loader skips them on resume).
    pub step_in_epoch: usize,
    /// Optimizer steps over the whole run.
    pub global_step: u64,
    /// Running sums of the epoch in progress: Σ (batch mean loss × batch size), correct top-1, images seen.
    pub train_loss_sum: f64,
    /// Correct top-1 predictions of the epoch in progress.
    pub train_correct: u64,
    /// Training images of the epoch in progress.
    pub train_seen: u64,
    /// Best test top-1 accuracy so far (fraction in [0, 1]) and its epoch.
    pub best_acc: Option<f64>,
    /// The epoch of `best_acc` (0-based).
    pub best_epoch: Option<usize>,
    /// Test loss and accuracy of the last evaluation.
    pub last_loss: Option<f64>,
    /// Test top-1 accuracy of the last evaluation (fraction).
    pub last_acc: Option<f64>,
    /// Wall-clock seconds spent training so far (all sessions).
    pub elapsed_s: f64,
    /// The `metrics.jsonl` lines of the epochs done (`epoch` of them), without their newlines: what the run's
    /// metrics file holds at this state (see the module's rule). Absent in checkpoints of older builds.
    #[serde(default)]
    pub metrics: Vec<String>,
}

/// The JSON metadata of a checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    /// Always `"snella-checkpoint"`.
    pub format: String,
    /// Format version of the writer (this build writes and reads 1).
    pub version: u32,
    /// `Method::name()` of the model that wrote it (e.g. `snella32`).
    pub method: String,
    /// The model configuration.
    pub model: ViTConfig,
    /// The training configuration (absent when written without one).
    pub config: Option<TrainConfig>,
    /// FNV-1a hash (16 hex digits) of the trajectory-relevant fields of `config`.
    pub config_hash: Option<String>,
    /// AdamW step counter ([`Model::step_count`]).
    pub adam_step: u64,
    /// Per-branch ratio of zeroed entries ([`Model::sparsity`]), module order.
    pub sparsity: Vec<f32>,
    /// Where the run stood.
    pub state: TrainState,
    /// FNV-1a 64 of the bytes after the safetensors header, 16 hex digits.
    pub checksum: String,
}

/// 64-bit FNV-1a over `bytes`, as 16 hex digits.
pub(crate) fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every tensor a checkpoint of `model` holds: name → (device tensor, shape).
fn checkpoint_tensors(model: &Model) -> Vec<(String, crate::runtime::Tensor, Vec<usize>)> {
    let mut out = Vec::new();
    let shape_of = |t: crate::runtime::Tensor| model.plan().spec(t).shape.clone();
    for (name, p) in model.trainable_params() {
        // Cannot fail: model/plan.rs gives every trainable parameter its AdamW m and v.
        out.push((format!("param.{name}"), p.value, shape_of(p.value)));
        out.push((format!("adamw.m.{name}"), p.m.expect("trainable parameters have AdamW m"), shape_of(p.value)));
        out.push((format!("adamw.v.{name}"), p.v.expect("trainable parameters have AdamW v"), shape_of(p.value)));
    }
    let tracked = model.allocator_factors().unwrap_or_default();
    for (p, factors) in model.branch_names().iter().zip(tracked) {
        for (leaf, f) in ["In_Qs", "Out_Qs"].iter().zip(factors) {
            out.push((format!("alloc.ipt.{p}.{leaf}"), f.ipt, shape_of(f.ipt)));
            out.push((format!("alloc.unc.{p}.{leaf}"), f.unc, shape_of(f.unc)));
        }
    }
    out
}

/// Writes a checkpoint of `model` (trainable set, AdamW state, allocator EMAs, sparsity, step count) and
/// `state` to `path`, atomically (see [`write_atomic`]). `config` (optional) is stored with its hash so a
/// resume can refuse another recipe.
///
/// # Errors
/// `Invalid { option: "checkpoint" }` for a trainable value that is NaN or infinite (nothing is written, so
/// the file on disk is always a good state); `Invalid` naming a field of `config` that cannot be stored;
/// `Io` naming the path when it cannot be written (missing folder, read-only location...).
pub fn save_checkpoint(path: &Path, model: &Model, state: &TrainState, config: Option<&TrainConfig>) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, t, shape) in checkpoint_tensors(model) {
        let data = model.rt.download(t)?;
        if let Some(pname) = name.strip_prefix("param.") {
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(
                    "checkpoint",
                    format!(
                        "{} holds a non-finite value ({}) at index {i}; not writing {}",
                        pname,
                        data[i],
                        path.display()
                    ),
                ));
            }
        }
        tensors.insert(name, RawTensor::f32(shape, &data).into_owned());
    }
    // The checksum covers the data section, which depends only on the tensors, so serialise twice: once to
    // learn the data bytes (the header does not influence them), once with the checksum in the metadata.
    let mut meta = CheckpointMeta {
        format: "snella-checkpoint".into(),
        version: CHECKPOINT_VERSION,
        method: model.method().name(),
        model: model.config().clone(),
        config: config.cloned(),
        config_hash: config.map(|c| c.hash()).transpose()?,
        adam_step: model.step_count(),
        sparsity: model.sparsity().to_vec(),
        state: state.clone(),
        checksum: String::new(),
    };
    let mut data = Vec::new();
    for t in tensors.values() {
        data.extend_from_slice(t.bytes());
    }
    meta.checksum = fnv1a64(&data);
    drop(data);
    let json = serde_json::to_string(&meta).map_err(|e| Error::invalid("checkpoint", e.to_string()))?;
    let bytes = serialize(&tensors, HashMap::from([(META_KEY.to_string(), json)]), path)?;
    write_atomic(path, &bytes)
}

/// Reads only the metadata of a checkpoint (and verifies the file is complete and its checksum matches).
///
/// # Errors
/// `Error::Io` (unreadable), `Error::Format` (not a checkpoint, truncated, corrupt), naming the file.
pub fn read_checkpoint_meta(path: &Path) -> Result<CheckpointMeta> {
    parse_meta(path, &File::read(path)?)
}

fn parse_meta(path: &Path, file: &File) -> Result<CheckpointMeta> {
    let json = file.metadata(META_KEY).ok_or_else(|| {
        Error::format(path, "is a safetensors file but not a snella checkpoint (no 'snella_checkpoint' metadata)")
    })?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| Error::format(path, format!("corrupt checkpoint metadata: {e}")))?;
    if meta.format != "snella-checkpoint" || meta.version != CHECKPOINT_VERSION {
        return Err(Error::format(
            path,
            format!(
                "checkpoint format '{}' version {} (this build reads version {CHECKPOINT_VERSION})",
                meta.format, meta.version
            ),
        ));
    }
    let sum = fnv1a64(file.data());
    if sum != meta.checksum {
        return Err(Error::format(
            path,
            format!("corrupt checkpoint: data checksum {sum} does not match the recorded {}", meta.checksum),
        ));
    }
    Ok(meta)
}

/// Loads a checkpoint into `model`: every trainable value, AdamW moment, allocator EMA, the AdamW step
/// count and the per-branch sparsity. Returns the metadata (with the [`TrainState`] to continue from).
///
/// With `config`, the checkpoint must have been written with the same trajectory-relevant recipe
/// (every field except where and how fast it runs); a difference is `Invalid { option: "checkpoint" }` naming
/// the fields.
///
/// # Errors
/// All naming the file: `Error::Io` (unreadable), `Error::Format` (truncated, corrupt, not a checkpoint, a
/// sparsity outside [0, 1]), `Invalid { option: "checkpoint" }` (another method, model configuration or
/// recipe, naming the differences), `MissingTensor` / `UnexpectedTensors` / `ShapeMismatch`. Every check runs
/// before the first upload, so on error the model is unchanged (a failing device copy aside).
pub fn load_checkpoint(path: &Path, model: &mut Model, config: Option<&TrainConfig>) -> Result<CheckpointMeta> {
    let ck = File::read(path)?;
    let meta = parse_meta(path, &ck)?;
    let file = path.display().to_string();
    let ours = model.method().name();
    if meta.method != ours {
        return Err(Error::invalid(
            "checkpoint",
            format!("{file} was written by method {} but this model trains {ours}", meta.method),
        ));
    }
    if &meta.model != model.config() {
        let a = serde_json::to_value(&meta.model).unwrap_or_default();
        let b = serde_json::to_value(model.config()).unwrap_or_default();
        return Err(Error::invalid(
            "checkpoint",
            format!("{file} is for another model configuration (differs in: {})", diff_fields(&a, &b)),
        ));
    }
    if let (Some(cfg), Some(saved)) = (config, &meta.config) {
        if cfg.hash()? != meta.config_hash.clone().unwrap_or_default() {
            let d = diff_fields(&saved.trajectory_json()?, &cfg.trajectory_json()?);
            if !d.is_empty() {
                return Err(Error::invalid(
                    "checkpoint",
                    format!("{file} was written by another recipe (differs in: {d}); resume with the same settings"),
                ));
            }
        }
    }
    if meta.sparsity.len() != model.sparsity().len() {
        return Err(Error::format(
            path,
            format!("{} sparsity entries for {} branches", meta.sparsity.len(), model.sparsity().len()),
        ));
    }
    if let Some(bad) = meta.sparsity.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        return Err(Error::format(path, format!("sparsity {bad} is outside [0, 1]")));
    }
    let st = ck.tensors()?;
    let want = checkpoint_tensors(model);
    let mut data = Vec::with_capacity(want.len());
    for (name, t, shape) in &want {
        let v = st.tensor(name).map_err(|_| Error::MissingTensor { file: file.clone(), name: name.clone() })?;
        if v.shape() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                file: file.clone(),
                name: name.clone(),
                got: v.shape().to_vec(),
                want: shape.clone(),
            });
        }
        data.push((*t, f32_values(path, name, &v)?));
    }
    let known: std::collections::HashSet<&str> = want.iter().map(|(n, _, _)| n.as_str()).collect();
    let extra: Vec<String> = st.names().into_iter().filter(|n| !known.contains(n.as_str())).cloned().collect();
    if !extra.is_empty() {
        return Err(Error::UnexpectedTensors { file, names: extra });
    }
    for (t, d) in data {
        model.rt.upload(t, &d)?;
    }
    let trainable: Vec<String> = model.trainable_params().map(|(n, _)| n.to_string()).collect();
    for name in &trainable {
        model.note_param_set(name);
    }
    model.set_step_count(meta.adam_step);
    model.sparsity_mut().copy_from_slice(&meta.sparsity);
    Ok(meta)
}

impl Model {
    /// Saves what fine-tuning changed: the trainable set with its AdamW moments, the allocator's EMAs, the
    /// per-branch sparsity and the step count, in the checkpoint format of this module (megabytes, never the
    /// frozen backbone), atomically. [`Model::load_trainable`] reads it back into a model of the same
    /// configuration and method; `snella eval --checkpoint` reads it too.
    ///
    /// # Errors
    /// As [`save_checkpoint`]: a trainable value that is NaN or infinite (nothing is written), a path that
    /// cannot be written.
    pub fn save_trainable(&self, path: &Path) -> Result<()> {
        save_checkpoint(path, self, &TrainState::default(), None)
    }

    /// Loads a trainable set written by [`Model::save_trainable`] (or a training run's checkpoint) into this
    /// model, whose backbone must be loaded already (the file does not hold it); it also counts as
    /// initialising the branches. Returns the file's metadata.
    ///
    /// # Errors
    /// As [`load_checkpoint`] without a recipe: an unreadable, corrupt or foreign file, another method or model
    /// configuration, naming the file; on error the model is unchanged.
    pub fn load_trainable(&mut self, path: &Path) -> Result<CheckpointMeta> {
        load_checkpoint(path, self, None)
    }
}

/// Names of the top-level fields whose values differ between two JSON objects (comma-separated).
fn diff_fields(a: &serde_json::Value, b: &serde_json::Value) -> String {
    let empty = serde_json::Map::new();
    let (ao, bo) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = ao.keys().chain(bo.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| ao.get(*k) != bo.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "absent".into());
            format!("{k}: {} vs {}", show(ao.get(k)), show(bo.get(k)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checkpoint file of a run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The conventional checkpoint file of a run folder: `<out_dir>/checkpoint.safetensors`.
pub fn checkpoint_path(out_dir: &Path) -> PathBuf {
    out_dir.join(CHECKPOINT_FILE)
}
