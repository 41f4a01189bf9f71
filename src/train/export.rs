//! Exports of a fine-tuned model.
//!
//! * [`merged_weights`] / [`export_merged`]: the plain backbone with every branch folded in,
//!   `W = W0 + ΔW`, in timm names — loadable by any ViT (here: a `Method::Linear` model gives the same
//!   logits as the trained model). Kernel branches contribute `M_sᵀ` (SNELL/SNELLA: the sparsified
//!   `M·|M|` at the model's current per-layer ratios; MixK/KLoRA: the dense `M`), LoRA `B·A`; q, k and v go
//!   into rows `[0, D)`, `[D, 2D)`, `[2D, 3D)` of `attn.qkv.weight`. Full fine-tuning and GPS export their
//!   trained weights; head, cls token and everything else are the model's current values.
//!   The merged weights are built on the model's device by the same ops, in the same order, as the
//!   training forward builds them, so they are bit-identical to what the model computes with.
//! * [`sparse_delta`] / [`write_sparse_delta`] / [`read_sparse_delta`] / [`apply_sparse_delta`]: the compact
//!   update: per branch the non-zero entries of its update in `(out, in)` weight layout as flat indices
//!   (u32) and values (f32) (in the file: the whole block instead when more than half of it is non-zero), plus the trained dense tensors (head, cls token). Applying it to the
//!   pre-trained backbone (adapted to the same configuration) reproduces the merged weights (bit for bit for
//!   the kernel methods, whose update is added once in f32 either way).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::safetensors::{f32_values, fills, serialize, u32_values, write_safetensors, File, RawTensor};
use crate::io::write_atomic;
use crate::model::load::{TensorMap, Weights};
use crate::model::{Model, ViTConfig};

/// The `__metadata__` key of a sparse-delta file.
pub(crate) const DELTA_META_KEY: &str = "snella_sparse_delta";

/// The model's weights with every branch merged in, in timm names and `cfg.param_shapes()` shapes
/// (exactly the tensors a `Method::Linear` / `Method::Full` model of the same configuration has).
/// Memory: one host copy of the backbone.
///
/// # Errors
/// Device transfer failures only.
pub fn merged_weights(model: &Model) -> Result<TensorMap> {
    let mut merged: HashMap<String, Vec<f32>> = model.merged_linear_weights()?.into_iter().collect();
    let mut out = TensorMap::new();
    for (name, shape) in model.config().param_shapes() {
        let data = match merged.remove(&name) {
            Some(d) => d,
            None => model.get_param(&name)?,
        };
        out.insert(name, (shape, data));
    }
    Ok(out)
}

/// Writes [`merged_weights`] as timm-format safetensors (F32), atomically (`load::write_safetensors`).
///
/// # Errors
/// `Error::Io` naming the path when it cannot be written (no partial file is left); device failures.
pub fn export_merged(model: &Model, path: &Path) -> Result<()> {
    write_safetensors(path, &merged_weights(model)?)
}

/// Per-branch sparsity report: `(branch prefix, ratio s, kept entries |M| > t, total entries)`, module
/// order. Dense branches (LoRA, MixK, KLoRA) report s = 0 and all entries kept. Computes every M once.
///
/// # Errors
/// Device failures only.
pub fn kept_stats(model: &Model) -> Result<Vec<(String, f32, usize, usize)>> {
    let mut out = Vec::with_capacity(model.sparsity().len());
    model.for_each_branch_update(|u| {
        out.push((u.prefix.to_string(), u.sparsity, u.kept()?, u.n_in * u.n_out));
        Ok(())
    })?;
    Ok(out)
}

/// The update of one branch, as kept entries of its `(n_out, n_in)` block of the target weight.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaBranch {
    /// Branch prefix, e.g. `branch.blocks.3.attn.q`.
    pub prefix: String,
    /// The weight it updates, e.g. `blocks.3.attn.qkv.weight`.
    pub target: String,
    /// First row of `target` covered by this branch (q: 0, k: D, v: 2D; others 0).
    pub row0: usize,
    /// Rows of the block (the Linear's output features adapted by this branch).
    pub n_out: usize,
    /// Columns of the block (the Linear's input features).
    pub n_in: usize,
    /// Entries with |M| > t (sparse kernel methods) or all entries (dense branches).
    pub kept: usize,
    /// Flat indices `o·n_in + i` into the `(n_out, n_in)` block, ascending, of the non-zero update entries.
    pub indices: Vec<u32>,
    /// The update values at `indices` (`M_s[i, o]` for kernel branches, `(B·A)[o, i]` for LoRA).
    pub values: Vec<f32>,
}

/// A compact fine-tuning result: sparse branch updates plus the trained dense tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDelta {
    /// `Method::name()` of the model it came from.
    pub method: String,
    /// Configuration of that model.
    pub model: ViTConfig,
    /// One entry per branch, module order.
    pub branches: Vec<DeltaBranch>,
    /// Trained tensors stored whole (head.weight, head.bias, cls_token), timm names.
    pub dense: TensorMap,
}

impl SparseDelta {
    /// Stored update entries over all branches.
    pub fn nnz(&self) -> usize {
        self.branches.iter().map(|b| b.values.len()).sum()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeltaMetaBranch {
    prefix: String,
    target: String,
    row0: usize,
    n_out: usize,
    n_in: usize,
    kept: usize,
    nnz: usize,
    /// Stored as all `n_out·n_in` values in `(out, in)` order, no indices (when that is smaller).
    #[serde(default)]
    dense: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeltaMeta {
    format: String,
    version: u32,
    method: String,
    model: ViTConfig,
    branches: Vec<DeltaMetaBranch>,
    dense: Vec<String>,
}

/// Extracts the sparse delta of a branch method (SNELL, SNELLA, MixK, KLoRA, LoRA) or of a linear probe
/// (no branches: head and cls token only).
///
/// # Errors
/// `Invalid { option: "export" }` for full fine-tuning and GPS, whose update is the whole backbone (export
/// merged weights instead); device failures.
pub fn sparse_delta(model: &Model) -> Result<SparseDelta> {
    if model.method().trains_backbone() {
        return Err(Error::invalid(
            "export",
            format!(
                "method {} trains the whole backbone: a sparse delta would be the full model; export merged weights",
                model.method().name()
            ),
        ));
    }
    let mut branches = Vec::new();
    model.for_each_branch_update(|u| {
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        for (j, x) in u.delta()?.into_iter().enumerate() {
            if x != 0.0 {
                indices.push(j as u32);
                values.push(x);
            }
        }
        branches.push(DeltaBranch {
            prefix: u.prefix.to_string(),
            target: u.target.to_string(),
            row0: u.row0,
            n_out: u.n_out,
            n_in: u.n_in,
            kept: u.kept()?,
            indices,
            values,
        });
        Ok(())
    })?;
    let mut dense = TensorMap::new();
    let shapes: HashMap<String, Vec<usize>> = model.config().param_shapes().into_iter().collect();
    for name in model.trainable_names() {
        if let Some(shape) = shapes.get(&name) {
            dense.insert(name.clone(), (shape.clone(), model.get_param(&name)?));
        }
    }
    Ok(SparseDelta { method: model.method().name(), model: model.config().clone(), branches, dense })
}

/// Writes a sparse delta as safetensors, atomically: per branch either `<prefix>.indices` (U32) and
/// `<prefix>.values` (F32) of its non-zero entries, or — when more than half of the block is non-zero, so
/// that (index, value) pairs would take more room than the block itself — the whole `(n_out, n_in)` block as
/// `<prefix>.values` (zeros included, `dense: true` in the metadata); the dense tensors under their timm names, and a JSON description
/// (method, model configuration, per branch target/row0/shape/kept/nnz) under `__metadata__`
/// `snella_sparse_delta`.
///
/// # Errors
/// `Invalid { option: "export" }` for a branch whose indices and values differ in number or leave its
/// block, or a dense tensor whose values do not fill its shape; `Error::Io` naming the path (no partial
/// file is left).
pub fn write_sparse_delta(path: &Path, delta: &SparseDelta) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut meta_br = Vec::new();
    for b in &delta.branches {
        if b.indices.len() != b.values.len() {
            return Err(Error::invalid(
                "export",
                format!("{}: {} indices for {} values", b.prefix, b.indices.len(), b.values.len()),
            ));
        }
        let total = b.n_out.checked_mul(b.n_in).ok_or_else(|| {
            Error::invalid("export", format!("{}: a {}x{} block is too large", b.prefix, b.n_out, b.n_in))
        })?;
        if let Some(&bad) = b.indices.iter().find(|&&i| i as usize >= total) {
            return Err(Error::invalid(
                "export",
                format!("{}: index {bad} outside its {}x{} block", b.prefix, b.n_out, b.n_in),
            ));
        }
        // 8 bytes per stored entry as (index, value), 4 per entry of the block when dense: the smaller one.
        let dense = 2 * b.values.len() > total;
        if dense {
            let mut full = vec![0.0f32; total];
            for (&i, &v) in b.indices.iter().zip(&b.values) {
                full[i as usize] = v;
            }
            tensors.insert(format!("{}.values", b.prefix), RawTensor::f32(vec![b.n_out, b.n_in], &full).into_owned());
        } else {
            tensors.insert(format!("{}.indices", b.prefix), RawTensor::u32(vec![b.indices.len()], &b.indices));
            tensors.insert(format!("{}.values", b.prefix), RawTensor::f32(vec![b.values.len()], &b.values));
        }
        meta_br.push(DeltaMetaBranch {
            prefix: b.prefix.clone(),
            target: b.target.clone(),
            row0: b.row0,
            n_out: b.n_out,
            n_in: b.n_in,
            kept: b.kept,
            nnz: b.values.len(),
            dense,
        });
    }
    for (name, (shape, data)) in &delta.dense {
        if !fills(shape, data.len()) {
            return Err(Error::invalid("export", format!("'{name}' has {} values for shape {shape:?}", data.len())));
        }
        tensors.insert(name.clone(), RawTensor::f32(shape.clone(), data));
    }
    let meta = DeltaMeta {
        format: "snella-sparse-delta".into(),
        version: 1,
        method: delta.method.clone(),
        model: delta.model.clone(),
        branches: meta_br,
        dense: delta.dense.keys().cloned().collect(),
    };
    let json = serde_json::to_string(&meta).map_err(|e| Error::invalid("export", e.to_string()))?;
    let bytes = serialize(&tensors, HashMap::from([(DELTA_META_KEY.to_string(), json)]), path)?;
    write_atomic(path, &bytes)
}

/// Reads a sparse delta written by [`write_sparse_delta`].
///
/// # Errors
/// `Error::Io`, `Error::Format` (truncated, corrupt, not a sparse delta, inconsistent sizes),
/// `MissingTensor`, all naming the file.
pub fn read_sparse_delta(path: &Path) -> Result<SparseDelta> {
    let file = File::read(path)?;
    let json = file
        .metadata(DELTA_META_KEY)
        .ok_or_else(|| Error::format(path, "is a safetensors file but not a snella sparse delta (no metadata)"))?;
    let meta: DeltaMeta =
        serde_json::from_str(json).map_err(|e| Error::format(path, format!("corrupt sparse-delta metadata: {e}")))?;
    let st = file.tensors()?;
    let shown = path.display().to_string();
    let get =
        |name: &str| st.tensor(name).map_err(|_| Error::MissingTensor { file: shown.clone(), name: name.to_string() });
    let mut branches = Vec::new();
    for b in meta.branches {
        let values_name = format!("{}.values", b.prefix);
        let total = b
            .n_out
            .checked_mul(b.n_in)
            .ok_or_else(|| Error::format(path, format!("{}: a {}x{} block is too large", b.prefix, b.n_out, b.n_in)))?;
        let (indices, values) = if b.dense {
            let full = f32_values(path, &values_name, &get(&values_name)?)?;
            if full.len() != total {
                return Err(Error::format(
                    path,
                    format!("{}: {} dense values for a {}x{} block", b.prefix, full.len(), b.n_out, b.n_in),
                ));
            }
            let (mut indices, mut values) = (Vec::new(), Vec::new());
            for (j, &x) in full.iter().enumerate() {
                if x != 0.0 {
                    indices.push(j as u32);
                    values.push(x);
                }
            }
            if values.len() != b.nnz {
                return Err(Error::format(
                    path,
                    format!("{}: {} non-zero values, metadata says {}", b.prefix, values.len(), b.nnz),
                ));
            }
            (indices, values)
        } else {
            let indices_name = format!("{}.indices", b.prefix);
            let indices = u32_values(path, &indices_name, &get(&indices_name)?)?;
            let values = f32_values(path, &values_name, &get(&values_name)?)?;
            if indices.len() != b.nnz || values.len() != b.nnz {
                return Err(Error::format(
                    path,
                    format!(
                        "{}: {} indices and {} values, metadata says {}",
                        b.prefix,
                        indices.len(),
                        values.len(),
                        b.nnz
                    ),
                ));
            }
            if let Some(&bad) = indices.iter().find(|&&i| i as usize >= total) {
                return Err(Error::format(
                    path,
                    format!("{}: index {bad} outside its {}x{} block", b.prefix, b.n_out, b.n_in),
                ));
            }
            (indices, values)
        };
        branches.push(DeltaBranch {
            prefix: b.prefix,
            target: b.target,
            row0: b.row0,
            n_out: b.n_out,
            n_in: b.n_in,
            kept: b.kept,
            indices,
            values,
        });
    }
    let mut dense = TensorMap::new();
    for name in meta.dense {
        let v = get(&name)?;
        dense.insert(name.clone(), (v.shape().to_vec(), f32_values(path, &name, &v)?));
    }
    Ok(SparseDelta { method: meta.method, model: meta.model, branches, dense })
}

/// Applies a sparse delta to backbone weights in timm names (the pre-trained backbone adapted to the
/// delta's configuration, e.g. by `load::adapt_to_config`): adds every branch update into its target rows
/// and replaces the dense tensors (head, cls token).
///
/// # Errors
/// `MissingTensor` (a target weight is absent), `Invalid { option: "delta" }` (a target of the wrong
/// shape for the branch's rows, indices and values of different lengths or outside the block, a tensor
/// whose values do not fill its shape), with nothing changed in `weights` when any check fails.
pub fn apply_sparse_delta(weights: &mut Weights, delta: &SparseDelta) -> Result<()> {
    let file = weights.source.display().to_string();
    for b in &delta.branches {
        let (shape, data) = weights
            .tensors
            .get(&b.target)
            .ok_or_else(|| Error::MissingTensor { file: file.clone(), name: b.target.clone() })?;
        if !fills(shape, data.len()) {
            return Err(Error::invalid(
                "delta",
                format!("{file}: '{}' has {} values for shape {shape:?}", b.target, data.len()),
            ));
        }
        let block = b.n_out.checked_mul(b.n_in);
        if b.indices.len() != b.values.len() || block.is_none_or(|n| b.indices.iter().any(|&i| i as usize >= n)) {
            return Err(Error::invalid(
                "delta",
                format!(
                    "{}: {} indices and {} values for a {}x{} block (indices must lie inside it)",
                    b.prefix,
                    b.indices.len(),
                    b.values.len(),
                    b.n_out,
                    b.n_in
                ),
            ));
        }
        if shape.len() != 2 || shape[1] != b.n_in || b.row0.checked_add(b.n_out).is_none_or(|end| end > shape[0]) {
            return Err(Error::invalid(
                "delta",
                format!(
                    "{} updates rows {}..{} of {} columns of {}, which has shape {shape:?}",
                    b.prefix,
                    b.row0,
                    b.row0.saturating_add(b.n_out),
                    b.n_in,
                    b.target
                ),
            ));
        }
    }
    for (name, (shape, data)) in &delta.dense {
        if !fills(shape, data.len()) {
            return Err(Error::invalid("delta", format!("'{name}' has {} values for shape {shape:?}", data.len())));
        }
    }
    for b in &delta.branches {
        // Cannot fail: the loop above returned an error for every branch whose target is absent.
        let (_, data) = weights.tensors.get_mut(&b.target).expect("checked above");
        let base = b.row0 * b.n_in;
        for (&i, &v) in b.indices.iter().zip(&b.values) {
            data[base + i as usize] += v;
        }
    }
    for (name, t) in &delta.dense {
        weights.tensors.insert(name.clone(), t.clone());
    }
    Ok(())
}

/// The files [`export_all`] writes: merged weights, and the sparse delta (branch methods and the linear probe).
pub const EXPORT_FILES: [&str; 2] = ["merged.safetensors", "delta.safetensors"];

/// Writes both exports of a run into `dir`: `merged.safetensors` (timm names) and, for branch methods and
/// the linear probe, `delta.safetensors`. Returns the paths written.
///
/// # Errors
/// `Io` naming a file that cannot be written (the folder must exist); device failures.
pub fn export_all(model: &Model, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let [merged, delta] = EXPORT_FILES;
    let merged = dir.join(merged);
    export_merged(model, &merged)?;
    out.push(merged);
    if !model.method().trains_backbone() {
        let p = dir.join(delta);
        write_sparse_delta(&p, &sparse_delta(model)?)?;
        out.push(p);
    }
    Ok(out)
}
