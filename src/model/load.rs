//! Checkpoint loaders: timm safetensors, Hugging Face `ViTModel` / `Dinov2Model` safetensors and the Google
//! `.npz` releases (`ViT-B_16.npz`, ...), all mapped to timm names (see [`ViTConfig::param_shapes`]), checked
//! against a configuration and adapted to it (position table resized, head re-initialised), and a
//! safetensors writer for export.
//!
//! Pickled PyTorch files (`.pth`, `.bin`, `.pt`) are not read: convert them once with
//! `safetensors.torch.save_file(torch.load(path, map_location="cpu"), out)` (taking `["model"]` or
//! `["state_dict"]` first where the file wraps the weights).
use crate::error::{Error, Result};
use crate::io::read_up_to;
use crate::io::safetensors::{self, fills};
use crate::model::config::ViTConfig;
use crate::model::posembed::{resize_pos_embed, PosResize};
use crate::rng::trunc_normal;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

// The writer of this format lives with the other safetensors code.
pub use crate::io::safetensors::write_safetensors;

/// Tensors by name: (shape, fp32 values in row-major order).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A backbone in timm names, fp32, row-major, each with its shape.
#[derive(Clone, PartialEq)]
pub struct Weights {
    /// Tensors by timm name: (shape, row-major f32 values).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// The file they were read from (named in errors).
    pub source: PathBuf,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: BTreeMap<&str, &[usize]> = self.tensors.iter().map(|(k, v)| (k.as_str(), v.0.as_slice())).collect();
        f.debug_struct("Weights").field("source", &self.source).field("tensors", &shapes).finish()
    }
}

impl Weights {
    /// Shape and values of a tensor, if present.
    pub fn get(&self, name: &str) -> Option<&(Vec<usize>, Vec<f32>)> {
        self.tensors.get(name)
    }
    /// Number of scalars over all tensors.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|t| t.1.len()).sum()
    }
    fn file(&self) -> String {
        self.source.display().to_string()
    }
}

/// The checkpoint layouts [`read_checkpoint`] understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// safetensors with timm `VisionTransformer` names (also timm's DINOv2 models).
    Timm,
    /// safetensors of Hugging Face `ViTModel` / `ViTForImageClassification` (names optionally prefixed `vit.`).
    HfVit,
    /// safetensors of Hugging Face `Dinov2Model` (names optionally prefixed `dinov2.`).
    HfDinov2,
    /// The original Google release: a zip of `.npy` arrays with flax names (`ViT-B_16.npz`).
    GoogleNpz,
}

// ---------------------------------------------------------------------------------------------------------
// Format detection
// ---------------------------------------------------------------------------------------------------------

/// Detects the format from the file extension and tensor names.
///
/// `.npz` (or any zip) is [`Format::GoogleNpz`]; otherwise the safetensors header is read (not the data) and
/// the names decide: `embeddings.*`/`encoder.layer.*` is Hugging Face (DINOv2 when the layers use `norm1`,
/// `mlp.fc1` or `layer_scale1`, ViT when they use `layernorm_before`), `blocks.*`/`cls_token`/`patch_embed.*`
/// is timm. Pickled PyTorch files are refused with a conversion hint.
///
/// # Errors
/// `Io` when the file cannot be read; `Format` (naming the file) for pickles, a bad safetensors header or
/// tensor names of no known layout.
pub fn detect(path: &Path) -> Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    if let Some("pth" | "pt" | "bin" | "ckpt" | "tar" | "pkl") = ext.as_deref() {
        return Err(Error::format(
            path,
            "pickled PyTorch checkpoints are not read; convert to safetensors first, e.g. \
             safetensors.torch.save_file(torch.load(path, map_location='cpu'), 'model.safetensors')",
        ));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut f, &mut magic).map_err(|e| Error::io(path, e))?;
    let is_zip = got == 4 && (&magic == b"PK\x03\x04" || &magic == b"PK\x05\x06");
    if ext.as_deref() == Some("npz") || is_zip {
        if !is_zip {
            return Err(Error::format(path, "not a .npz file (no zip signature)"));
        }
        return Ok(Format::GoogleNpz);
    }
    let names = safetensors::header_names(path)?;
    classify_names(&names).ok_or_else(|| {
        let first: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
        Error::format(
            path,
            format!(
                "cannot tell the checkpoint layout (timm, Hugging Face ViT or DINOv2) from its tensor names {first:?}"
            ),
        )
    })
}

fn strip_hf_prefix(n: &str) -> &str {
    n.strip_prefix("vit.").or_else(|| n.strip_prefix("dinov2.")).unwrap_or(n)
}

fn classify_names(names: &[String]) -> Option<Format> {
    let hf = names
        .iter()
        .map(|n| strip_hf_prefix(n))
        .any(|n| n.starts_with("embeddings.") || n.starts_with("encoder.layer."));
    if hf {
        let layer_has =
            |s: &str| names.iter().any(|n| strip_hf_prefix(n).starts_with("encoder.layer.") && n.contains(s));
        if layer_has(".layernorm_before.") || layer_has(".intermediate.dense.") {
            return Some(Format::HfVit);
        }
        if layer_has(".norm1.")
            || layer_has(".mlp.fc1.")
            || layer_has(".layer_scale1.")
            || names.iter().any(|n| n.starts_with("dinov2."))
        {
            return Some(Format::HfDinov2);
        }
        return Some(Format::HfVit);
    }
    let timm = names.iter().any(|n| n.starts_with("blocks.") || n == "cls_token" || n.starts_with("patch_embed."));
    timm.then_some(Format::Timm)
}

// ---------------------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------------------

/// Reads a checkpoint in any supported format and maps it to timm names (fused qkv rows `[q; k; v]`, etc.).
/// `path` may also be a Hugging Face Hub id (`facebook/dinov2-small`, `hf-hub:timm/<name>`), read from the local
/// cache ([`super::hub`]).
///
/// Names that have no timm counterpart are kept under their name in the file, so that
/// [`adapt_to_config`] can list them. Register tokens (`reg_token`, HF `embeddings.register_tokens`) are an
/// error: ViTs with registers are not supported.
///
/// # Errors
/// `Io` (unreadable), `Format` (truncated or corrupt file, unsupported dtype, register tokens, two tensors
/// mapping to one name), `MissingTensor` / `ShapeMismatch` (an incomplete q/k/v triple), all naming the file;
/// `Invalid { option: "weights" }` for a Hub id that the cache does not hold.
pub fn read_checkpoint(path: &Path) -> Result<Weights> {
    // A Hugging Face Hub id (`facebook/dinov2-small`) reads that repository's cached model.safetensors.
    let resolved = super::hub::resolve_weights(path)?;
    let path = resolved.as_path();
    let tensors = match detect(path)? {
        Format::GoogleNpz => map_npz(read_npz(path)?, path)?,
        Format::Timm => read_safetensors(path)?,
        Format::HfVit => map_hf(read_safetensors(path)?, path, false)?,
        Format::HfDinov2 => map_hf(read_safetensors(path)?, path, true)?,
    };
    let w = Weights { tensors, source: path.to_path_buf() };
    check_no_registers(&w)?;
    Ok(w)
}

fn check_no_registers(w: &Weights) -> Result<()> {
    if let Some((shape, _)) = w.tensors.get("reg_token") {
        let n = shape.get(1).copied().unwrap_or(0);
        return Err(Error::format(
            &w.source,
            format!(
                "holds {n} register tokens ('reg_token', shape {shape:?}): ViTs with registers \
                 (e.g. vit_small_patch14_reg4_dinov2) are not supported"
            ),
        ));
    }
    Ok(())
}

fn read_safetensors(path: &Path) -> Result<TensorMap> {
    let file = safetensors::File::read(path)?;
    let mut out = TensorMap::new();
    for (name, view) in file.tensors()?.tensors() {
        let data = safetensors::float_values(path, &name, &view)?;
        let shape = view.shape().to_vec();
        if !fills(&shape, data.len()) {
            return Err(Error::format(path, format!("tensor '{name}': {} values for shape {shape:?}", data.len())));
        }
        out.insert(name, (shape, data));
    }
    Ok(out)
}

/// The arrays of a `.npz` (zip of `.npy`), named without the `.npy` suffix.
fn read_npz(path: &Path) -> Result<TensorMap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| Error::format(path, format!("not a valid .npz (zip) file (truncated or corrupt?): {e}")))?;
    let mut out = TensorMap::new();
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| Error::format(path, format!("cannot read zip member #{i} (truncated or corrupt?): {e}")))?;
        if member.is_dir() {
            continue;
        }
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|e| Error::format(path, format!("cannot read member '{name}' (truncated or corrupt?): {e}")))?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let t = parse_npy(&bytes).map_err(|msg| Error::format(path, format!("array '{name}': {msg}")))?;
        out.insert(key, t);
    }
    Ok(out)
}

/// Parses one `.npy` (versions 1–3) of a float dtype into (shape, f32 values in C order).
fn parse_npy(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = b.get(start..start + hlen).ok_or("truncated .npy header")?;
    let header = String::from_utf8_lossy(header);
    let value_after = |key: &str| -> std::result::Result<&str, String> {
        let k1 = format!("'{key}'");
        let k2 = format!("\"{key}\"");
        let pos = header.find(&k1).map(|p| p + k1.len()).or_else(|| header.find(&k2).map(|p| p + k2.len()));
        let rest = &header[pos.ok_or_else(|| format!("header {header:?} has no '{key}'"))?..];
        Ok(rest.trim_start().strip_prefix(':').ok_or_else(|| format!("malformed header {header:?}"))?.trim_start())
    };
    let descr = {
        let v = value_after("descr")?;
        let q = v
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .ok_or_else(|| format!("malformed descr in {header:?}"))?;
        let end = v[1..].find(q).ok_or_else(|| format!("malformed descr in {header:?}"))?;
        v[1..1 + end].to_string()
    };
    let fortran = value_after("fortran_order")?;
    if fortran.starts_with("True") {
        return Err("fortran_order=True arrays are not supported (save in C order)".into());
    } else if !fortran.starts_with("False") {
        return Err(format!("malformed fortran_order in {header:?}"));
    }
    let shape: Vec<usize> = {
        let v = value_after("shape")?;
        let inner = v
            .strip_prefix('(')
            .and_then(|v| v.split(')').next())
            .ok_or_else(|| format!("malformed shape in {header:?}"))?;
        inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("malformed shape in {header:?}")))
            .collect::<std::result::Result<_, _>>()?
    };
    let (little, kind) = match descr.as_bytes().first() {
        Some(b'<' | b'|' | b'=') => (cfg!(target_endian = "little") || descr.starts_with('<'), &descr[1..]),
        Some(b'>') => (false, &descr[1..]),
        _ => (true, descr.as_str()),
    };
    let n: usize = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let data = &b[start + hlen..];
    let size = match kind {
        "f2" => 2,
        "f4" => 4,
        "f8" => 8,
        _ => return Err(format!("dtype '{descr}' is not supported (float16/32/64 only)")),
    };
    if n.checked_mul(size) != Some(data.len()) {
        return Err(format!("{} data bytes for shape {shape:?} of '{descr}' (truncated?)", data.len()));
    }
    // The `try_into().unwrap()`s cannot fail: chunks_exact(4) and chunks_exact(8) give slices of that length.
    let vals: Vec<f32> = match (size, little) {
        (2, true) => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        (2, false) => data.chunks_exact(2).map(|c| half::f16::from_be_bytes([c[0], c[1]]).to_f32()).collect(),
        (4, true) => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        (4, false) => data.chunks_exact(4).map(|c| f32::from_be_bytes(c.try_into().unwrap())).collect(),
        (_, true) => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        (_, false) => data.chunks_exact(8).map(|c| f64::from_be_bytes(c.try_into().unwrap()) as f32).collect(),
    };
    Ok((shape, vals))
}

// ---------------------------------------------------------------------------------------------------------
// Name maps
// ---------------------------------------------------------------------------------------------------------

type Tensor = (Vec<usize>, Vec<f32>);

/// Moves tensors from a raw map to timm names; what is left keeps its name in the file.
struct Mapper<'a> {
    raw: TensorMap,
    out: TensorMap,
    path: &'a Path,
}

impl<'a> Mapper<'a> {
    fn new(raw: TensorMap, path: &'a Path) -> Self {
        Mapper { raw, out: TensorMap::new(), path }
    }
    fn take(&mut self, name: &str) -> Option<Tensor> {
        self.raw.remove(name)
    }
    fn put(&mut self, name: String, t: Tensor, from: &str) -> Result<()> {
        if self.out.contains_key(&name) {
            return Err(Error::format(self.path, format!("two tensors map to '{name}' (the second is '{from}')")));
        }
        self.out.insert(name, t);
        Ok(())
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        if let Some(t) = self.take(from) {
            self.put(to.to_string(), t, from)?;
        }
        Ok(())
    }
    /// Like `rename` with a transform of the tensor.
    fn convert(
        &mut self,
        from: &str,
        to: &str,
        f: impl FnOnce(Tensor) -> std::result::Result<Tensor, String>,
    ) -> Result<()> {
        if let Some(t) = self.take(from) {
            let t = f(t).map_err(|m| Error::format(self.path, format!("tensor '{from}': {m}")))?;
            self.put(to.to_string(), t, from)?;
        }
        Ok(())
    }
    /// Fuses three (out, in) Linear weights or three biases into timm's rows [q;k;v].
    /// All three absent: nothing (the fused name is reported missing later). Some absent: an error naming it.
    fn fuse(
        &mut self,
        names: [String; 3],
        to: String,
        prep: impl Fn(Tensor) -> std::result::Result<Tensor, String>,
    ) -> Result<()> {
        let present: Vec<bool> = names.iter().map(|n| self.raw.contains_key(n)).collect();
        if present.iter().all(|p| !p) {
            return Ok(());
        }
        if let Some(i) = present.iter().position(|p| !p) {
            return Err(Error::MissingTensor { file: self.path.display().to_string(), name: names[i].clone() });
        }
        let mut parts = Vec::with_capacity(3);
        for n in &names {
            // Cannot fail: `present` said every one of `names` is there, and none was taken since.
            let t = self.take(n).expect("checked present");
            parts.push(prep(t).map_err(|m| Error::format(self.path, format!("tensor '{n}': {m}")))?);
        }
        for (n, p) in names.iter().zip(&parts).skip(1) {
            if p.0 != parts[0].0 {
                return Err(Error::ShapeMismatch {
                    file: self.path.display().to_string(),
                    name: n.clone(),
                    got: p.0.clone(),
                    want: parts[0].0.clone(),
                });
            }
        }
        let mut shape = parts[0].0.clone();
        if shape.is_empty() {
            return Err(Error::format(self.path, format!("tensor '{}' is a scalar", names[0])));
        }
        shape[0] *= 3;
        let data: Vec<f32> = parts.into_iter().flat_map(|p| p.1).collect();
        self.put(to, (shape, data), &names[0])
    }
    fn finish(mut self) -> TensorMap {
        let rest = std::mem::take(&mut self.raw);
        for (k, v) in rest {
            // A leftover cannot clash with a timm name it was not mapped to unless the file mixes layouts;
            // keep the mapped one and let the leftover be reported under a distinct name.
            let key = if self.out.contains_key(&k) { format!("{k} (unmapped duplicate)") } else { k };
            self.out.insert(key, v);
        }
        self.out
    }
}

/// Block indices `i` of names `{prefix}{i}.…` / `{prefix}{i}/…`.
fn block_indices<'n>(names: impl Iterator<Item = &'n String>, prefix: &str) -> BTreeSet<usize> {
    names
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|r| r.split(['.', '/']).next()?.parse::<usize>().ok())
        .collect()
}

/// Hugging Face `ViTModel` / `Dinov2Model` names → timm names.
fn map_hf(raw: TensorMap, path: &Path, dinov2: bool) -> Result<TensorMap> {
    // Strip the task-model prefix (`vit.` / `dinov2.`) where present; `classifier.*` has none.
    let mut stripped = TensorMap::new();
    for (k, v) in raw {
        let s = strip_hf_prefix(&k).to_string();
        if stripped.insert(s.clone(), v).is_some() {
            return Err(Error::format(path, format!("tensor '{s}' appears both with and without a model prefix")));
        }
    }
    let layers = block_indices(stripped.keys(), "encoder.layer.");
    let mut m = Mapper::new(stripped, path);
    m.rename("embeddings.cls_token", "cls_token")?;
    m.rename("embeddings.position_embeddings", "pos_embed")?;
    m.rename("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")?;
    m.rename("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")?;
    m.rename("embeddings.mask_token", "mask_token")?;
    m.rename("embeddings.register_tokens", "reg_token")?;
    for i in layers {
        let l = format!("encoder.layer.{i}.");
        let b = format!("blocks.{i}.");
        for p in ["weight", "bias"] {
            let qkv = ["query", "key", "value"].map(|x| format!("{l}attention.attention.{x}.{p}"));
            m.fuse(qkv, format!("{b}attn.qkv.{p}"), Ok)?;
            m.rename(&format!("{l}attention.output.dense.{p}"), &format!("{b}attn.proj.{p}"))?;
            if dinov2 {
                m.rename(&format!("{l}norm1.{p}"), &format!("{b}norm1.{p}"))?;
                m.rename(&format!("{l}norm2.{p}"), &format!("{b}norm2.{p}"))?;
                m.rename(&format!("{l}mlp.fc1.{p}"), &format!("{b}mlp.fc1.{p}"))?;
                m.rename(&format!("{l}mlp.fc2.{p}"), &format!("{b}mlp.fc2.{p}"))?;
            } else {
                m.rename(&format!("{l}layernorm_before.{p}"), &format!("{b}norm1.{p}"))?;
                m.rename(&format!("{l}layernorm_after.{p}"), &format!("{b}norm2.{p}"))?;
                m.rename(&format!("{l}intermediate.dense.{p}"), &format!("{b}mlp.fc1.{p}"))?;
                m.rename(&format!("{l}output.dense.{p}"), &format!("{b}mlp.fc2.{p}"))?;
            }
        }
        if dinov2 {
            m.rename(&format!("{l}layer_scale1.lambda1"), &format!("{b}ls1.gamma"))?;
            m.rename(&format!("{l}layer_scale2.lambda1"), &format!("{b}ls2.gamma"))?;
        }
    }
    for p in ["weight", "bias"] {
        m.rename(&format!("layernorm.{p}"), &format!("norm.{p}"))?;
        m.rename(&format!("classifier.{p}"), &format!("head.{p}"))?;
        m.rename(&format!("pooler.dense.{p}"), &format!("pooler.dense.{p}"))?;
    }
    Ok(m.finish())
}

/// (rows, cols) → (cols, rows), row-major.
fn transpose2(rows: usize, cols: usize, data: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// A flax Dense kernel `(in, …out)` → a torch Linear weight `(prod(out), in)`.
fn kernel_in_first(t: Tensor) -> std::result::Result<Tensor, String> {
    if t.0.len() < 2 {
        return Err(format!("kernel has shape {:?}, expected at least 2 dims (in, out…)", t.0));
    }
    let rows = t.0[0];
    let cols: usize = t.0[1..].iter().product();
    Ok((vec![cols, rows], transpose2(rows, cols, &t.1)))
}

/// A flax kernel `(…in, out)` (attention `out/kernel` is `(H, hd, D)`) → a torch Linear weight `(out, prod(in))`.
fn kernel_out_last(t: Tensor) -> std::result::Result<Tensor, String> {
    if t.0.len() < 2 {
        return Err(format!("kernel has shape {:?}, expected at least 2 dims (…in, out)", t.0));
    }
    let cols = *t.0.last().unwrap(); // cannot fail: at least 2 dims, checked above
    let rows: usize = t.0[..t.0.len() - 1].iter().product();
    Ok((vec![cols, rows], transpose2(rows, cols, &t.1)))
}

fn flatten(t: Tensor) -> std::result::Result<Tensor, String> {
    Ok((vec![t.1.len()], t.1))
}

/// A conv kernel HWIO `(P, P, C, D)` → OIHW `(D, C, P, P)`.
fn hwio_to_oihw(t: Tensor) -> std::result::Result<Tensor, String> {
    let [h, w, i, o] = t.0[..] else {
        return Err(format!("conv kernel has shape {:?}, expected 4 dims (H, W, in, out)", t.0));
    };
    let mut out = vec![0f32; t.1.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..i {
                for d in 0..o {
                    out[((d * i + c) * h + y) * w + x] = t.1[((y * w + x) * i + c) * o + d];
                }
            }
        }
    }
    Ok((vec![o, i, h, w], out))
}

/// Google ViT `.npz` (flax names) → timm names, as timm's `_load_weights` maps them.
fn map_npz(raw: TensorMap, path: &Path) -> Result<TensorMap> {
    let prefix = if raw.contains_key("opt/target/embedding/kernel") { "opt/target/" } else { "" };
    let raw: TensorMap = if prefix.is_empty() {
        raw
    } else {
        raw.into_iter().map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v)).collect()
    };
    let blocks = block_indices(raw.keys(), "Transformer/encoderblock_");
    let mut m = Mapper::new(raw, path);
    m.rename("cls", "cls_token")?;
    m.convert("embedding/kernel", "patch_embed.proj.weight", hwio_to_oihw)?;
    m.rename("embedding/bias", "patch_embed.proj.bias")?;
    m.rename("Transformer/posembed_input/pos_embedding", "pos_embed")?;
    for i in blocks {
        let p = format!("Transformer/encoderblock_{i}/");
        let b = format!("blocks.{i}.");
        // The original release numbers sub-modules 0..3 across kinds; big_vision numbers each kind from 0.
        let (ln1, mha, ln2, mlp) = if m.raw.contains_key(&format!("{p}MultiHeadDotProductAttention_0/query/kernel")) {
            ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
        } else {
            ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        };
        m.rename(&format!("{p}{ln1}/scale"), &format!("{b}norm1.weight"))?;
        m.rename(&format!("{p}{ln1}/bias"), &format!("{b}norm1.bias"))?;
        let a = format!("{p}{mha}/");
        m.fuse(
            ["query", "key", "value"].map(|x| format!("{a}{x}/kernel")),
            format!("{b}attn.qkv.weight"),
            kernel_in_first,
        )?;
        m.fuse(["query", "key", "value"].map(|x| format!("{a}{x}/bias")), format!("{b}attn.qkv.bias"), flatten)?;
        m.convert(&format!("{a}out/kernel"), &format!("{b}attn.proj.weight"), kernel_out_last)?;
        m.rename(&format!("{a}out/bias"), &format!("{b}attn.proj.bias"))?;
        m.rename(&format!("{p}{ln2}/scale"), &format!("{b}norm2.weight"))?;
        m.rename(&format!("{p}{ln2}/bias"), &format!("{b}norm2.bias"))?;
        for (dense, fc) in [("Dense_0", "fc1"), ("Dense_1", "fc2")] {
            m.convert(&format!("{p}{mlp}/{dense}/kernel"), &format!("{b}mlp.{fc}.weight"), kernel_out_last)?;
            m.rename(&format!("{p}{mlp}/{dense}/bias"), &format!("{b}mlp.{fc}.bias"))?;
        }
    }
    m.rename("Transformer/encoder_norm/scale", "norm.weight")?;
    m.rename("Transformer/encoder_norm/bias", "norm.bias")?;
    m.convert("head/kernel", "head.weight", kernel_out_last)?;
    m.rename("head/bias", "head.bias")?;
    m.convert("pre_logits/kernel", "pre_logits.fc.weight", kernel_out_last)?;
    m.rename("pre_logits/bias", "pre_logits.fc.bias")?;
    Ok(m.finish())
}

// ---------------------------------------------------------------------------------------------------------
// Adapting to a configuration
// ---------------------------------------------------------------------------------------------------------

/// Why a tensor the model does not use may be dropped, or None if it may not.
fn ignorable(name: &str) -> Option<&'static str> {
    if name == "mask_token" {
        Some("the mask token of masked-image pre-training (HF `embeddings.mask_token`) is unused")
    } else if name.starts_with("pre_logits.") {
        Some("the pre-logits representation layer is dropped, as the official code does (no representation_size)")
    } else if name.starts_with("fc_norm.") {
        Some("fc_norm belongs to average pooling; this model pools the cls token through `norm`")
    } else if name.starts_with("pooler.") {
        Some("the Hugging Face pooler is unused (the head reads the normed cls token)")
    } else if name.starts_with("opt/") {
        Some("non-parameter entries of the .npz (optimizer state) are unused")
    } else {
        None
    }
}

/// Checks and adapts `w` to `cfg`, resizing a position table of another grid with
/// [`PosResize::Torch`] (timm 0.5.4's `resize_pos_embed`); see [`adapt_to_config_with`].
///
/// # Errors
/// As [`adapt_to_config_with`].
pub fn adapt_to_config(w: Weights, cfg: &ViTConfig, seed: u64) -> Result<(Weights, Vec<String>)> {
    adapt_to_config_with(w, cfg, seed, PosResize::Torch)
}

/// Checks and adapts `w` to `cfg`: every tensor of `cfg.param_shapes()` must be present with the exact
/// shape, except:
///  - a `pos_embed` `(1, 1+g*g, D)` of another (square) grid is resized to `cfg.grid()` with `mode`, the cls row
///    kept (timm and DINOv2 assume square source grids too);
///  - a head whose shape differs (another class count, or another input width such as HF DINOv2's classifier on
///    `[cls; mean patch]`), or an absent head, is re-initialised as timm does: weight ~ N(0, 0.02²) truncated to
///    [-2, 2], bias 0, drawn from `seed`; a note says so;
///  - tensors the model does not use are an error `UnexpectedTensors` listing them, except the known ignorable
///    ones (HF mask token and pooler, Google's `pre_logits`, `fc_norm`), which are dropped with a note.
///
/// The result holds exactly the tensors of `cfg.param_shapes()`, and notes saying what was changed.
///
/// # Errors
/// An invalid `cfg` (`Invalid`); a tensor whose values do not fill its shape or register tokens (`Format`);
/// a missing tensor (`MissingTensor` naming file and tensor); a wrong shape (`ShapeMismatch` with both
/// shapes); tensors the model does not use (`UnexpectedTensors`).
pub fn adapt_to_config_with(w: Weights, cfg: &ViTConfig, seed: u64, mode: PosResize) -> Result<(Weights, Vec<String>)> {
    cfg.validate()?;
    check_no_registers(&w)?;
    for (name, (shape, data)) in &w.tensors {
        if !fills(shape, data.len()) {
            return Err(Error::format(
                &w.source,
                format!("tensor '{name}': {} values for shape {shape:?}", data.len()),
            ));
        }
    }
    let file = w.file();
    let source = w.source;
    let mut t = w.tensors;
    let mut notes = Vec::new();
    let d = cfg.embed_dim;
    let mismatch = |name: &str, got: &[usize], want: &[usize]| Error::ShapeMismatch {
        file: file.clone(),
        name: name.to_string(),
        got: got.to_vec(),
        want: want.to_vec(),
    };

    // Position table of another grid.
    let want_pos = vec![1, cfg.tokens(), d];
    if let Some((shape, data)) = t.get("pos_embed") {
        if *shape != want_pos {
            let g = match shape[..] {
                [1, n1, dd] if dd == d && n1 >= 2 => {
                    let n = n1 - 1;
                    let g = (n as f64).sqrt().round() as usize;
                    (g * g == n).then_some(g)
                }
                _ => None,
            };
            let Some(g) = g else {
                return Err(mismatch("pos_embed", shape, &want_pos));
            };
            let to = cfg.grid();
            let resized = resize_pos_embed(data, d, (g, g), to, mode)?;
            notes.push(format!(
                "pos_embed resized from a {g}x{g} to a {}x{} grid ({}); cls row kept",
                to.0,
                to.1,
                mode.name()
            ));
            t.insert("pos_embed".into(), (want_pos.clone(), resized));
        }
    }

    // Head.
    let (want_hw, want_hb) = (vec![cfg.num_classes, d], vec![cfg.num_classes]);
    match (t.remove("head.weight"), t.remove("head.bias")) {
        (Some(hw), hb) if hw.0 == want_hw => match hb {
            Some(hb) if hb.0 == want_hb => {
                t.insert("head.weight".into(), hw);
                t.insert("head.bias".into(), hb);
            }
            Some(hb) => return Err(mismatch("head.bias", &hb.0, &want_hb)),
            None => return Err(Error::MissingTensor { file, name: "head.bias".into() }),
        },
        (None, Some(_)) => return Err(Error::MissingTensor { file, name: "head.weight".into() }),
        (old, _) => {
            let why = match old {
                Some(hw) => format!("the checkpoint's head has shape {:?}, the model needs {:?}", hw.0, want_hw),
                None => "the checkpoint has no head".to_string(),
            };
            notes.push(format!(
                "head re-initialised for {} classes ({why}): weight ~ trunc_normal(std 0.02, [-2, 2]), bias 0, seed {seed}",
                cfg.num_classes
            ));
            t.insert(
                "head.weight".into(),
                (want_hw.clone(), {
                    use rand::SeedableRng;
                    trunc_normal(
                        &mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_1E55_0F4E_AD00),
                        want_hw.iter().product(),
                        0.02,
                    )
                }),
            );
            t.insert("head.bias".into(), (want_hb.clone(), vec![0.0; cfg.num_classes]));
        }
    }

    // Presence and shapes.
    let shapes = cfg.param_shapes();
    let mut out = TensorMap::new();
    for (name, want) in &shapes {
        let Some(v) = t.remove(name) else {
            return Err(Error::MissingTensor { file, name: name.clone() });
        };
        if v.0 != *want {
            return Err(mismatch(name, &v.0, want));
        }
        out.insert(name.clone(), v);
    }

    // Leftovers.
    let mut dropped: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for name in t.into_keys() {
        match ignorable(&name) {
            Some(why) => dropped.entry(why).or_default().push(name),
            None => unexpected.push(name),
        }
    }
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedTensors { file, names: unexpected });
    }
    for (why, names) in dropped {
        notes.push(format!("dropped {}: {why}", names.join(", ")));
    }
    Ok((Weights { tensors: out, source }, notes))
}

// ---------------------------------------------------------------------------------------------------------
// Configuration inference
// ---------------------------------------------------------------------------------------------------------

/// Infers a ViTConfig from weights in timm names: depth (count of `blocks.{i}`), width (`cls_token`), patch size
/// and input channels (`patch_embed.proj.weight`), MLP width (`blocks.0.mlp.fc1.weight`), LayerScale
/// (`blocks.0.ls1.gamma`), classes (rows of `head.weight`, or 0 when the checkpoint has no head: set your own
/// before use). Heads come from `num_heads` since checkpoints do not store them, the image size from
/// `img_size` (the position table is resized to its grid by [`adapt_to_config`]). LayerNorm eps is timm's 1e-6.
///
/// # Errors
/// `MissingTensor` (no patch embedding, blocks or fc1), `Format` (a patch embedding or fc1 weight of the
/// wrong rank, non-square patches), `Invalid` (the inferred sizes with `num_heads` and `img_size` do not
/// form a valid configuration).
pub fn infer_config(w: &Weights, num_heads: usize, img_size: (usize, usize)) -> Result<ViTConfig> {
    let file = w.file();
    let get = |name: &str| {
        w.tensors
            .get(name)
            .map(|t| t.0.clone())
            .ok_or_else(|| Error::MissingTensor { file: file.clone(), name: name.into() })
    };
    let pe = get("patch_embed.proj.weight")?;
    let [d, c, p, p2] = pe[..] else {
        return Err(Error::format(
            &w.source,
            format!("patch_embed.proj.weight has shape {pe:?}, expected (D, C, P, P)"),
        ));
    };
    if p != p2 {
        return Err(Error::format(&w.source, format!("non-square patches {p}x{p2} are not supported")));
    }
    let depth = block_indices(w.tensors.keys(), "blocks.").len();
    if depth == 0 {
        return Err(Error::MissingTensor { file, name: "blocks.0.attn.qkv.weight".into() });
    }
    for i in 0..depth {
        get(&format!("blocks.{i}.attn.qkv.weight"))?;
    }
    let fc1 = get("blocks.0.mlp.fc1.weight")?;
    let [mlp_hidden, _] = fc1[..] else {
        return Err(Error::format(
            &w.source,
            format!("blocks.0.mlp.fc1.weight has shape {fc1:?}, expected (hidden, D)"),
        ));
    };
    let layer_scale = w.tensors.contains_key("blocks.0.ls1.gamma");
    let num_classes = w.tensors.get("head.weight").and_then(|t| t.0.first().copied()).unwrap_or(0);
    let cfg = ViTConfig {
        img_size,
        patch_size: p,
        in_chans: c,
        embed_dim: d,
        depth,
        num_heads,
        mlp_hidden,
        num_classes,
        layer_scale,
        eps: 1e-6,
    };
    // validate() also wants classes > 0; check the rest with a stand-in.
    ViTConfig { num_classes: num_classes.max(1), ..cfg.clone() }.validate()?;
    Ok(cfg)
}
