//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz) and of their replay on stable
//! (`tests/fuzz_corpus.rs`): one function per reader of outside input, each taking raw bytes and driving the
//! same functions the command line uses. An `Err` is a correct answer to a bad input; a panic, an abort or a
//! hang is a bug. Not a stable API.
//!
//! The readers take paths, as the command line gives them, so the bytes go through a file of this process's
//! own folder under the system's temporary directory ([`cleanup`] removes it).
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::golden::GoldenCase;
use crate::model::load::{adapt_to_config, infer_config, read_checkpoint, write_safetensors, Weights};
use crate::model::{Model, Recompute, ViTConfig};
use crate::peft::Method;
use crate::rng::SplitMix64;
use crate::runtime::{Backend, Device};
use crate::train::augment::Transform;
use crate::train::checkpoint::{load_checkpoint, read_checkpoint_meta, save_checkpoint, TrainState};
use crate::train::data::{decode_image, Dataset, Example, Idx};
use crate::train::export::{apply_sparse_delta, read_sparse_delta, sparse_delta, write_sparse_delta};
use crate::train::recipe::TrainConfig;
use crate::train::trainer::random_backbone;

/// The fuzz targets, by name (the binaries of `fuzz/fuzz_targets/`).
pub const TARGETS: [&str; 9] =
    ["weights", "npz", "checkpoint", "idx", "image", "recipe", "overrides", "sparse_delta", "golden"];

/// Runs the fuzz target `target` on `data`.
///
/// # Errors
/// The reader's error for a bad input; `Invalid { option: "fuzz target" }` for an unknown target.
pub fn run(target: &str, data: &[u8]) -> Result<()> {
    match target {
        "weights" => weights(data),
        "npz" => npz(data),
        "checkpoint" => checkpoint(data),
        "idx" => idx(data),
        "image" => image(data),
        "recipe" => recipe(data),
        "overrides" => overrides(data),
        "sparse_delta" => delta(data),
        "golden" => golden(data),
        _ => Err(Error::invalid("fuzz target", format!("unknown target '{target}' (one of {TARGETS:?})"))),
    }
}

/// This thread's folder for the inputs written as files: one per thread, so tests that run targets in
/// parallel (and clean up after themselves) never remove each other's files.
fn folder() -> Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static DIR: PathBuf = std::env::temp_dir().join(format!(
            "snella-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
    }
    let dir = DIR.with(|d| d.clone());
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Removes this thread's folder of inputs.
pub fn cleanup() {
    if let Ok(dir) = folder() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `data` as the file `name` of this thread's folder.
fn file(name: &str, data: &[u8]) -> Result<PathBuf> {
    let p = folder()?.join(name);
    std::fs::write(&p, data).map_err(|e| Error::io(&p, e))?;
    Ok(p)
}

/// The model the checkpoint and sparse-delta inputs are read into: 8×8 images of one 8-pixel patch, width 8,
/// one block, SNELLA with rank 2 (so branches, allocator state and sparsity are all there), 2 classes.
fn small_config() -> ViTConfig {
    let tiny = ViTConfig::by_name("tiny", 2).unwrap_or_else(|_| unreachable!("'tiny' is a known configuration"));
    ViTConfig { img_size: (8, 8), embed_dim: 8, depth: 1, num_heads: 1, mlp_hidden: 8, ..tiny }
}

fn small_model() -> Result<Model> {
    let model = Model::new(Backend::new(Device::Cpu)?, &small_config(), Method::snella(2, 0.5), 1, Recompute::None)?;
    let w = random_backbone(&small_config(), 0);
    model.load_backbone(&Weights { tensors: w, source: PathBuf::from("<fuzz>") })?;
    model.init_branches(0)?;
    Ok(model)
}

thread_local! {
    /// Built once per thread: a checkpoint that fails to load leaves it unchanged, one that loads replaces
    /// its values, and either way the next input sees a valid model.
    static MODEL: RefCell<Option<Model>> = const { RefCell::new(None) };
}

fn with_model<T>(f: impl FnOnce(&mut Model) -> Result<T>) -> Result<T> {
    MODEL.with(|m| {
        let mut m = m.borrow_mut();
        if m.is_none() {
            *m = Some(small_model()?);
        }
        match m.as_mut() {
            Some(model) => f(model),
            None => Err(Error::invalid("fuzz target", "no model")),
        }
    })
}

/// Backbone weights in any supported layout (the extension is chosen by the first byte), mapped to timm names,
/// their configuration inferred and the weights adapted to it, as `snella train` does with `weights`.
pub fn weights(data: &[u8]) -> Result<()> {
    let (ext, body) = match data.split_first() {
        Some((b, rest)) => (["safetensors", "npz", "pth", "bin"][(*b & 3) as usize], rest),
        None => ("safetensors", data),
    };
    read_weights(&file(&format!("weights.{ext}"), body)?)
}

/// Google `.npz` releases (a zip of `.npy` arrays), as [`weights`] reads them.
pub fn npz(data: &[u8]) -> Result<()> {
    read_weights(&file("weights.npz", data)?)
}

fn read_weights(path: &Path) -> Result<()> {
    let w = read_checkpoint(path)?;
    let cfg = infer_config(&w, 1, (8, 8))?;
    // Inputs of a few kilobytes describe small models; a large inferred one would only measure the allocator.
    if cfg.num_params() <= 1 << 20 {
        adapt_to_config(w, &ViTConfig { num_classes: cfg.num_classes.max(1), ..cfg }, 0)?;
    }
    Ok(())
}

/// Training checkpoints: the metadata, then the whole file into the small model, as `--resume` and `eval` do.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let path = file("checkpoint.safetensors", data)?;
    read_checkpoint_meta(&path)?;
    with_model(|m| load_checkpoint(&path, m, None)).map(|_| ())
}

/// IDX images and labels (the first two bytes give the length of the images file, the rest is the labels
/// file), decoded and put through the VTAB pipeline, as a training run reads Fashion-MNIST.
pub fn idx(data: &[u8]) -> Result<()> {
    let (n, rest) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => (0, data),
    };
    let (images, labels) = rest.split_at(n.min(rest.len()));
    let d = Idx::open(&file("images-idx3-ubyte", images)?, &file("labels-idx1-ubyte", labels)?, 10)?;
    for i in 0..d.len().min(4) {
        pipeline(&d.get(i)?)?;
    }
    Ok(())
}

/// A JPEG or PNG image (the first byte chooses the file's extension; the content decides the format), decoded
/// and put through every pipeline, as an image folder is read.
pub fn image(data: &[u8]) -> Result<()> {
    let (ext, body) = match data.split_first() {
        Some((b, rest)) => (if b & 1 == 0 { "png" } else { "jpg" }, rest),
        None => ("png", data),
    };
    let (image, height, width) = decode_image(&file(&format!("image.{ext}"), body)?)?;
    pipeline(&Example { image, height, width, label: 0 })
}

/// Every pipeline at 8 pixels, with a fixed seed.
fn pipeline(ex: &Example) -> Result<()> {
    for name in ["fgvc", "vtab", "eval"] {
        Transform::parse(name, 8)?.apply(ex, &mut SplitMix64::new(0))?;
    }
    Ok(())
}

/// A recipe file, as `snella train RECIPE` reads it, and what a run derives from it.
pub fn recipe(data: &[u8]) -> Result<()> {
    let cfg = TrainConfig::load(&file("recipe.toml", data)?)?;
    derived(&cfg)
}

/// `--set KEY=VALUE` overrides, one per line, applied to the default recipe as `snella train --set` does.
pub fn overrides(data: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &str)> = text.lines().map(|l| l.split_once('=').unwrap_or((l, ""))).collect();
    let mut cfg = TrainConfig::default();
    cfg.apply_overrides(&pairs)?;
    derived(&cfg)
}

fn derived(cfg: &TrainConfig) -> Result<()> {
    cfg.method()?;
    cfg.memory()?;
    cfg.gemm()?;
    cfg.train_transform()?;
    cfg.eval_transform()?;
    cfg.hash()?;
    TrainConfig::from_toml(&cfg.to_toml()?)?;
    Ok(())
}

/// Sparse deltas, read and applied to the small model's backbone.
pub fn delta(data: &[u8]) -> Result<()> {
    let d = read_sparse_delta(&file("delta.safetensors", data)?)?;
    let mut w = Weights { tensors: random_backbone(&small_config(), 0), source: PathBuf::from("<fuzz>") };
    apply_sparse_delta(&mut w, &d)
}

/// A golden case: the manifest (its length in the first four bytes, little-endian) and the tensors (the rest),
/// read as `snella selftest` and the parity tests read them, and the model built when it is small.
pub fn golden(data: &[u8]) -> Result<()> {
    let (n, rest) = match data {
        [a, b, c, d, rest @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, rest),
        _ => (0, data),
    };
    let (json, tensors) = rest.split_at(n.min(rest.len()));
    file("case.json", json)?;
    file("case.safetensors", tensors)?;
    let case = GoldenCase::load(&folder()?, "case")?;
    let cfg = case.vit_config();
    case.method()?;
    for name in case.trainable() {
        case.atol(&name);
        case.noise_ranges(&name);
    }
    if cfg.validate().is_ok() && cfg.num_params() <= 1 << 16 && case.labels.len() <= 16 {
        case.build_model(Backend::new(Device::Cpu)?, Recompute::None)?;
    }
    Ok(())
}

/// Valid inputs of every target, as `(target, name, bytes)`: the starting corpus of the fuzzers (written by
/// `tests/fuzz_corpus.rs`), and a check that each target accepts good input.
///
/// # Errors
/// A failure to build the small model or to write its files.
pub fn seeds() -> Result<Vec<(&'static str, String, Vec<u8>)>> {
    let mut out = Vec::new();
    let dir = folder()?.join("seeds");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let model = small_model()?;

    let w = dir.join("w.safetensors");
    write_safetensors(&w, &random_backbone(&small_config(), 1))?;
    out.push(("weights", "timm".to_string(), [&[0u8][..], &read(&w)?].concat()));
    let npz = npz_bytes(&google_arrays())?;
    out.push(("weights", "npz".to_string(), [&[1u8][..], &npz].concat()));
    out.push(("npz", "google".to_string(), npz));

    let ck = dir.join("ck.safetensors");
    save_checkpoint(
        &ck,
        &model,
        &TrainState { epoch: 1, metrics: vec!["{\"epoch\":0}".into()], ..Default::default() },
        None,
    )?;
    out.push(("checkpoint", "small".to_string(), read(&ck)?));

    let (images, labels) = idx_bytes(3, 4, 5);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &images).map_err(|e| Error::io(&dir, e))?;
    let gz = gz.finish().map_err(|e| Error::io(&dir, e))?;
    for (name, im) in [("plain", images), ("gzip", gz)] {
        out.push(("idx", name.to_string(), [&(im.len() as u16).to_le_bytes()[..], &im, &labels].concat()));
    }

    let img = image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([(x * 40) as u8, (y * 50) as u8, 128]));
    for (tag, format) in [(0u8, image::ImageFormat::Png), (1, image::ImageFormat::Jpeg)] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, format).map_err(|e| Error::invalid("seed image", e.to_string()))?;
        out.push(("image", format!("{format:?}").to_lowercase(), [&[tag][..], bytes.get_ref()].concat()));
    }

    let cfg = TrainConfig { method: "snella8".into(), lr: 5e-4, train_subset: Some(100), ..TrainConfig::default() };
    out.push(("recipe", "default".to_string(), TrainConfig::default().to_toml()?.into_bytes()));
    out.push(("recipe", "snella8".to_string(), cfg.to_toml()?.into_bytes()));
    let sets = "lr=1e-3\nmethod=lora8\nrank=4\ntrain_subset=none\nkernel=rbf\nimage_size=112\ndevice=cpu\n";
    out.push(("overrides", "some".to_string(), sets.as_bytes().to_vec()));

    let delta = dir.join("delta.safetensors");
    write_sparse_delta(&delta, &sparse_delta(&model)?)?;
    out.push(("sparse_delta", "small".to_string(), read(&delta)?));

    let (json, tensors) = golden_case(&model)?;
    out.push(("golden", "small".to_string(), [&(json.len() as u32).to_le_bytes()[..], &json, &tensors].concat()));
    Ok(out)
}

/// IDX files of `n` images of `h`×`w` pixels and their labels.
fn idx_bytes(n: u32, h: u32, w: u32) -> (Vec<u8>, Vec<u8>) {
    let mut images: Vec<u8> = [0x803u32, n, h, w].iter().flat_map(|v| v.to_be_bytes()).collect();
    images.extend((0..n * h * w).map(|i| (i * 37 % 256) as u8));
    let mut labels: Vec<u8> = [0x801u32, n].iter().flat_map(|v| v.to_be_bytes()).collect();
    labels.extend((0..n).map(|i| (i % 10) as u8));
    (images, labels)
}

/// The arrays of a Google ViT release of the small configuration (flax names and layouts).
fn google_arrays() -> Vec<(String, Vec<usize>)> {
    let b = "Transformer/encoderblock_0/";
    let mut v = vec![
        ("cls".to_string(), vec![1, 1, 8]),
        ("embedding/kernel".into(), vec![8, 8, 3, 8]),
        ("embedding/bias".into(), vec![8]),
        ("Transformer/posembed_input/pos_embedding".into(), vec![1, 2, 8]),
        ("Transformer/encoder_norm/scale".into(), vec![8]),
        ("Transformer/encoder_norm/bias".into(), vec![8]),
        ("head/kernel".into(), vec![8, 2]),
        ("head/bias".into(), vec![2]),
        (format!("{b}MultiHeadDotProductAttention_1/out/kernel"), vec![1, 8, 8]),
        (format!("{b}MultiHeadDotProductAttention_1/out/bias"), vec![8]),
    ];
    for x in ["query", "key", "value"] {
        v.push((format!("{b}MultiHeadDotProductAttention_1/{x}/kernel"), vec![8, 1, 8]));
        v.push((format!("{b}MultiHeadDotProductAttention_1/{x}/bias"), vec![1, 8]));
    }
    for ln in ["LayerNorm_0", "LayerNorm_2"] {
        v.push((format!("{b}{ln}/scale"), vec![8]));
        v.push((format!("{b}{ln}/bias"), vec![8]));
    }
    for dense in ["Dense_0", "Dense_1"] {
        v.push((format!("{b}MlpBlock_3/{dense}/kernel"), vec![8, 8]));
        v.push((format!("{b}MlpBlock_3/{dense}/bias"), vec![8]));
    }
    v
}

/// A `.npz` of little-endian f32 arrays of the given shapes.
fn npz_bytes(arrays: &[(String, Vec<usize>)]) -> Result<Vec<u8>> {
    let err = |e: zip::result::ZipError| Error::invalid("seed npz", e.to_string());
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, shape) in arrays {
        zip.start_file(format!("{name}.npy"), zip::write::SimpleFileOptions::default()).map_err(err)?;
        let dims: Vec<String> = shape.iter().map(|d| format!("{d},")).collect();
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}\n", dims.join(" "));
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        npy.extend((header.len() as u16).to_le_bytes());
        npy.extend(header.as_bytes());
        let n: usize = shape.iter().product();
        npy.extend((0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()));
        std::io::Write::write_all(&mut zip, &npy).map_err(|e| Error::invalid("seed npz", e.to_string()))?;
    }
    Ok(zip.finish().map_err(err)?.into_inner())
}

/// A golden case of the small model: its manifest and its tensors (parameters, a batch of one image).
fn golden_case(model: &Model) -> Result<(Vec<u8>, Vec<u8>)> {
    let cfg = small_config();
    let trainable = model.trainable_names();
    let manifest = serde_json::json!({
        "vit": cfg,
        "method": {"kind": "snella", "r": 2, "sparsity_per_branch": model.branch_names().iter()
            .map(|b| (b.clone(), serde_json::json!(0.5))).collect::<serde_json::Map<_, _>>()},
        "trainable": trainable,
        "suggested_atol": {"loss": 1e-5},
        "noise_grad_elements": {trainable[0].clone(): {"flat_ranges": [[0, 2]]}},
    });
    let mut values: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for name in model.param_names() {
        let key = if trainable.contains(&name) { format!("param.{name}") } else { format!("frozen.{name}") };
        let v = model.get_param(&name)?;
        values.insert(key, (vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    values.insert(
        "input.images".into(),
        (vec![1, 3, 8, 8], (0..192).flat_map(|i| (i as f32 / 192.0).to_le_bytes()).collect()),
    );
    let labels: Vec<u8> = 1i64.to_le_bytes().to_vec();
    let mut views = Vec::new();
    for (name, (shape, bytes)) in &values {
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
        views.push((name.as_str(), v.map_err(|e| Error::invalid("seed golden", format!("{e:?}")))?));
    }
    let l = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &labels);
    views.push(("input.labels", l.map_err(|e| Error::invalid("seed golden", format!("{e:?}")))?));
    let tensors = safetensors::serialize(views, &None::<HashMap<String, String>>)
        .map_err(|e| Error::invalid("seed golden", format!("{e:?}")))?;
    let json = serde_json::to_vec(&manifest).map_err(|e| Error::invalid("seed golden", e.to_string()))?;
    Ok((json, tensors))
}
