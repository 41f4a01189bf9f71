//! Reader of the golden parity cases (`<case>.safetensors` + `<case>.json`, written by the PyTorch
//! reference, and `<case>.masks.safetensors`, the masks along its trajectories), and the comparisons the
//! parity tests make. The parity tests and `snella selftest` use it; users can point `SNELLA_GOLDEN` at new
//! cases.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::safetensors::{f32_values, i64_values, File};
use crate::model::{MemoryOptions, Model, ViTConfig};
use crate::peft::Method;
use crate::runtime::Backend;

mod masks;
pub use masks::{compare_mask, MaskCheck, MaskRecord, MaskVerdict, Tie, TrajectoryMasks};

/// One golden case: the reference's inputs, parameters and outputs for a small model and method.
pub struct GoldenCase {
    /// Case name (the file stem).
    pub name: String,
    /// The `.safetensors` file (named in errors).
    pub path: PathBuf,
    /// The `.json` manifest: configuration, method, tolerances, allocator records.
    pub manifest: serde_json::Value,
    /// Every tensor of the case as f32: key -> (shape, values).
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The batch's labels (`input.labels`).
    pub labels: Vec<i32>,
}

/// The directory of golden cases: `$SNELLA_GOLDEN`, else the repository's `tests/golden` (where this crate
/// was built, or `./tests/golden` when the binary runs from a copy of the repository elsewhere).
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SNELLA_GOLDEN") {
        return PathBuf::from(dir);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/golden")
    }
}

/// The device the parity tests run their steps on: `$SNELLA_TEST_DEVICE` (`cpu`, `cuda-emu` for the emulated CUDA
/// device, `cuda`), else the CPU. The golden tolerances hold on every device.
///
/// # Errors
/// `Invalid` naming `SNELLA_TEST_DEVICE` for an unknown value.
pub fn test_device() -> Result<crate::Device> {
    let Some(v) = std::env::var_os("SNELLA_TEST_DEVICE") else { return Ok(crate::Device::Cpu) };
    let v = v.to_string_lossy();
    match v.trim() {
        "" | "cpu" => Ok(crate::Device::Cpu),
        "cuda-emu" | "emu" => Ok(crate::Device::CudaEmu),
        "cuda" | "gpu" => Ok(crate::Device::Cuda),
        _ => Err(Error::invalid("SNELLA_TEST_DEVICE", format!("unknown device {v:?} (cpu, cuda-emu, cuda)"))),
    }
}

/// A fresh backend of [`test_device`], for a test that runs steps.
///
/// # Panics
/// When `SNELLA_TEST_DEVICE` is invalid or names a device this machine cannot open: a test that was asked to
/// run on a device must not quietly run on another.
pub fn test_backend() -> crate::Backend {
    let device = test_device().unwrap_or_else(|e| panic!("{e}"));
    crate::Backend::new(device).unwrap_or_else(|e| panic!("SNELLA_TEST_DEVICE={}: {e}", device.name()))
}

/// Every case (`*.json` with a matching `*.safetensors`) in a directory, sorted by name.
///
/// # Errors
/// `Io` naming the directory when it cannot be read.
pub fn list_cases(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.path().file_name()?.to_str()?.strip_suffix(".json").map(str::to_string))
        .filter(|n| dir.join(format!("{n}.safetensors")).exists())
        .collect();
    names.sort();
    Ok(names)
}

impl GoldenCase {
    /// Reads `<dir>/<name>.json` and `<dir>/<name>.safetensors`.
    ///
    /// # Errors
    /// A missing or unreadable file, invalid JSON, or a tensor that is not f32/f64/i64.
    pub fn load(dir: &Path, name: &str) -> Result<GoldenCase> {
        let jpath = dir.join(format!("{name}.json"));
        let spath = dir.join(format!("{name}.safetensors"));
        let text = std::fs::read_to_string(&jpath).map_err(|e| Error::io(&jpath, e))?;
        let manifest: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&jpath, e.to_string()))?;
        let file = File::read(&spath)?;
        let mut tensors = HashMap::new();
        let mut labels = Vec::new();
        for (k, v) in file.tensors()?.tensors() {
            match v.dtype() {
                Dtype::F32 => {
                    let data = f32_values(&spath, &k, &v)?;
                    tensors.insert(k, (v.shape().to_vec(), data));
                }
                Dtype::I64 if k == "input.labels" => {
                    labels = i64_values(&spath, &k, &v)?.into_iter().map(|y| y as i32).collect();
                }
                d => return Err(Error::format(&spath, format!("tensor {k}: unexpected dtype {d:?}"))),
            }
        }
        Ok(GoldenCase { name: name.into(), path: spath, manifest, tensors, labels })
    }

    /// The values of a tensor of the case.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the key and the file.
    pub fn get(&self, key: &str) -> Result<&[f32]> {
        self.tensors
            .get(key)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::MissingTensor { file: self.path.display().to_string(), name: key.into() })
    }

    /// The shape of a tensor of the case, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|(s, _)| s.as_slice())
    }

    /// The model configuration of the case (missing fields read as 0, which [`Model::new`] rejects).
    pub fn vit_config(&self) -> ViTConfig {
        let v = &self.manifest["vit"];
        let u = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
        ViTConfig {
            img_size: (
                v["img_size"][0].as_u64().unwrap_or(0) as usize,
                v["img_size"][1].as_u64().unwrap_or(0) as usize,
            ),
            patch_size: u("patch_size"),
            in_chans: u("in_chans"),
            embed_dim: u("embed_dim"),
            depth: u("depth"),
            num_heads: u("num_heads"),
            mlp_hidden: u("mlp_hidden"),
            num_classes: u("num_classes"),
            layer_scale: v["layer_scale"].as_bool().unwrap_or(false),
            eps: v["eps"].as_f64().unwrap_or(1e-6) as f32,
        }
    }

    /// The method of the case as its manifest names it.
    ///
    /// # Errors
    /// An unknown method kind.
    pub fn method(&self) -> Result<Method> {
        let m = &self.manifest["method"];
        let r = m["r"].as_u64().unwrap_or(0) as usize;
        Ok(match m["kind"].as_str().unwrap_or("") {
            "full" => Method::Full,
            "none" => Method::Linear,
            "lora" => Method::Lora { r },
            "snella" => Method::snella(r, 0.0),
            "snell" => Method::snell(r, 0.0),
            "mixk" => Method::mixk(r),
            "klora" => Method::klora(r),
            k => return Err(Error::format(&self.path, format!("unknown method kind '{k}'"))),
        })
    }

    /// A model of the case on `backend`, with the case's initial parameters, per-branch ratios and batch.
    ///
    /// # Errors
    /// A bad configuration or method in the manifest, a missing tensor, or a backend error.
    pub fn build_model(&self, backend: Backend, memory: impl Into<MemoryOptions>) -> Result<Model> {
        self.build_model_with(backend, memory, self.method()?)
    }

    /// [`GoldenCase::build_model`] with another method of the same parameters (e.g. with branch dropout).
    ///
    /// # Errors
    /// As [`GoldenCase::build_model`].
    pub fn build_model_with(
        &self,
        backend: Backend,
        memory: impl Into<MemoryOptions>,
        method: Method,
    ) -> Result<Model> {
        let cfg = self.vit_config();
        let mut model = Model::new(backend, &cfg, method, self.labels.len(), memory)?;
        for name in model.param_names() {
            let p = format!("param.{name}");
            let key = if self.tensors.contains_key(&p) { p } else { format!("frozen.{name}") };
            model.set_param(&name, self.get(&key)?)?;
        }
        if let Some(sp) = self.manifest["method"]["sparsity_per_branch"].as_object() {
            for (i, prefix) in model.branch_names().iter().enumerate() {
                let s = sp.get(prefix).and_then(|v| v.as_f64());
                model.sparsity_mut()[i] =
                    s.ok_or_else(|| Error::format(&self.path, format!("no sparsity for {prefix}")))? as f32;
            }
        }
        model.set_batch(self.get("input.images")?, &self.labels)?;
        Ok(model)
    }

    /// The trainable tensor names of the manifest.
    pub fn trainable(&self) -> Vec<String> {
        self.manifest["trainable"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// The manifest's tolerance for a key: `max|x − ref| <= atol`.
    pub fn atol(&self, key: &str) -> Option<f64> {
        self.manifest["suggested_atol"][key].as_f64()
    }

    /// Flat index ranges of gradient entries that are rounding noise (exactly 0 in exact arithmetic). A range
    /// that is not a pair of non-negative integers `[start, end]` with start ≤ end is left out: that can only make a comparison stricter.
    pub fn noise_ranges(&self, param: &str) -> Vec<(usize, usize)> {
        self.manifest["noise_grad_elements"][param]["flat_ranges"]
            .as_array()
            .map(|a| {
                let range = |r: &serde_json::Value| Some((r[0].as_u64()? as usize, r[1].as_u64()? as usize));
                a.iter().filter_map(range).filter(|(start, end)| start <= end).collect()
            })
            .unwrap_or_default()
    }
}

/// Result of comparing one tensor with its golden value.
#[derive(Clone, Debug)]
pub struct Compare {
    /// The golden key compared (with a note of skipped or outlier entries).
    pub key: String,
    /// max |got − want| over the compared entries.
    pub max_abs: f64,
    /// The tolerance it must not exceed.
    pub atol: f64,
    /// max |want|, to show the relative size of the difference.
    pub ref_max: f64,
}

impl Compare {
    /// `max_abs <= atol`.
    pub fn ok(&self) -> bool {
        self.max_abs <= self.atol
    }
    /// One printable line: key, difference, tolerance, relative size, verdict.
    pub fn line(&self) -> String {
        format!(
            "{:<60} max|diff| {:.3e}  atol {:.3e}  rel {:.2e}  {}",
            self.key,
            self.max_abs,
            self.atol,
            self.max_abs / self.ref_max.max(1e-30),
            if self.ok() { "OK" } else { "NOT OK" }
        )
    }
}

/// Comparison of an AdamW trajectory output (parameters after k steps). The reference's README documents that
/// AdamW's first steps, lr·g/(|g| + eps), turn the rounding error of a gradient entry with |g| ≈ eps into a
/// change of up to about 1% of lr, for about one element in 10⁴. So: every entry within `atol` except at most
/// ⌈n/10⁴⌉ outliers, each within 1% of lr per step; the outliers are counted in the key so they show.
pub fn compare_adamw(
    key: &str,
    got: &[f32],
    want: &[f32],
    atol: f64,
    skip: &[(usize, usize)],
    lr: f64,
    steps: usize,
) -> Compare {
    if got.len() != want.len() {
        return compare(key, got, want, atol, skip);
    }
    let mut diffs: Vec<(f64, usize)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(i, _)| !skip.iter().any(|&(a, b)| *i >= a && *i < b))
        .map(|(i, (&g, &w))| ((g as f64 - w as f64).abs(), i))
        .collect();
    diffs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let allowed = got.len().div_ceil(10_000);
    let outliers: Vec<(f64, usize)> = diffs.iter().copied().take_while(|d| d.0 > atol).collect();
    let mut c = compare(key, got, want, atol, skip);
    if !outliers.is_empty() && outliers.len() <= allowed && outliers.iter().all(|d| d.0 <= 0.01 * lr * steps as f64) {
        c.key = format!(
            "{key} ({} AdamW outlier(s) <= 1% lr/step at {:?})",
            outliers.len(),
            outliers.iter().map(|d| d.1).collect::<Vec<_>>()
        );
        c.max_abs = diffs.get(outliers.len()).map(|d| d.0).unwrap_or(0.0);
    }
    c
}

/// The end of a parity test: one `FAILED` line per tensor outside its tolerance and per mask that differs from
/// the reference's beyond a tie ([`MaskCheck`]'s failures), then a panic that counts them.
///
/// # Panics
/// When a comparison is not ok or a mask failed.
pub fn assert_parity(compares: &[Compare], mask_failures: &[String]) {
    let bad: Vec<_> = compares.iter().filter(|c| !c.ok()).collect();
    for c in &bad {
        println!("FAILED {}", c.line());
    }
    for f in mask_failures {
        println!("FAILED {f}");
    }
    assert!(
        bad.is_empty() && mask_failures.is_empty(),
        "{} of {} tensors outside tolerance, {} masks differ from the reference's beyond a tie (see the FAILED lines)",
        bad.len(),
        compares.len(),
        mask_failures.len()
    );
}

/// max |got − want| over the entries not in `skip` (flat ranges); a length mismatch fails.
pub fn compare(key: &str, got: &[f32], want: &[f32], atol: f64, skip: &[(usize, usize)]) -> Compare {
    if got.len() != want.len() {
        // A length mismatch fails the comparison (infinite difference) and says so in the key.
        let key = format!("{key} (length {} vs golden {})", got.len(), want.len());
        return Compare { key, max_abs: f64::INFINITY, atol, ref_max: 0.0 };
    }
    let mut max_abs = 0f64;
    let mut ref_max = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if skip.iter().any(|&(a, b)| i >= a && i < b) {
            continue;
        }
        let d = (g as f64 - w as f64).abs();
        max_abs = if d.is_nan() { f64::INFINITY } else { max_abs.max(d) };
        ref_max = ref_max.max((w as f64).abs());
    }
    Compare { key: key.into(), max_abs, atol, ref_max }
}
