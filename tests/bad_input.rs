//! Bad input through the public API: every case is an `Err` whose message names the thing at fault (the file,
//! the option, the tensor), never a panic. Small and fast: tiny models on the CPU, temp folders.
mod common;
use common::*;

use std::collections::BTreeMap;

use snella::model::load::{adapt_to_config, infer_config, read_checkpoint, TensorMap, Weights};
use snella::model::posembed::{resize_pos_embed, PosResize};
use snella::model::{Model, Recompute};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::{KernelMethod, Method};
use snella::report::{memory, speed};
use snella::train::augment::Transform;
use snella::train::checkpoint::{load_checkpoint, read_checkpoint_meta, save_checkpoint, write_atomic, TrainState};
use snella::train::data::{decode_image, Dataset, Example, Idx, ImageFolder};
use snella::train::export::{apply_sparse_delta, read_sparse_delta, write_sparse_delta, DeltaBranch, SparseDelta};
use snella::train::loader::Loader;
use snella::train::trainer::{evaluate, Trainer};
use snella::{Backend, GemmPrecision, KernelKind, Result};

fn tiny() -> ViTConfig {
    ViTConfig::by_name("tiny", 4).unwrap()
}

/// A model ready to run: a random backbone loaded, the branches initialised.
fn cpu_model(cfg: &ViTConfig, method: Method, batch: usize) -> Model {
    let m = Model::new(Backend::Cpu, cfg, method, batch, Recompute::Attention).unwrap();
    m.load_backbone(&Weights { tensors: random_backbone(cfg, 0), source: "random".into() }).unwrap();
    m.init_method(0).unwrap();
    m
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn model_configs() {
    fails(ViTConfig::by_name("vit_x", 10), &["model", "vit_x"]);
    for bad in [
        ViTConfig { img_size: (0, 0), ..tiny() },
        ViTConfig { img_size: (30, 32), ..tiny() },
        ViTConfig { patch_size: 0, ..tiny() },
        ViTConfig { num_heads: 0, ..tiny() },
        ViTConfig { num_heads: 3, ..tiny() },
        ViTConfig { embed_dim: 0, ..tiny() },
        ViTConfig { num_classes: 0, ..tiny() },
        ViTConfig { eps: f32::NAN, ..tiny() },
    ] {
        // The size accessors of an invalid configuration do not panic either.
        let _ = (bad.grid(), bad.head_dim(), bad.tokens(), bad.param_shapes());
        fails(bad.validate(), &["model config"]);
        fails(Model::new(Backend::Cpu, &bad, Method::Linear, 1, Recompute::Attention), &["model config"]);
    }
}

#[test]
fn position_tables() {
    fails(resize_pos_embed(&[0.0; 9], 2, (2, 2), (3, 3), PosResize::Torch), &["pos_embed", "9 values"]);
    fails(resize_pos_embed(&[0.0; 2], 2, (0, 0), (3, 3), PosResize::Torch), &["pos_embed"]);
    fails(resize_pos_embed(&[0.0; 10], 2, (2, 2), (0, 3), PosResize::TorchAntialias), &["pos_embed"]);
}

#[test]
fn checkpoint_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.safetensors");
    fails(read_checkpoint(&missing), &[&shown(&missing)]);

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not a safetensors file").unwrap();
    fails(read_checkpoint(&junk), &[&shown(&junk)]);

    let truncated = dir.path().join("truncated.safetensors");
    write_safetensors(&truncated, &random_backbone(&small_cfg(), 1)).unwrap();
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(read_checkpoint(&truncated), &[&shown(&truncated), "truncated"]);

    let npz = dir.path().join("corrupt.npz");
    std::fs::write(&npz, b"PK\x03\x04 and then nothing of a zip").unwrap();
    fails(read_checkpoint(&npz), &[&shown(&npz)]);

    let pickle = dir.path().join("model.pth");
    std::fs::write(&pickle, b"\x80\x02").unwrap();
    fails(read_checkpoint(&pickle), &[&shown(&pickle), "safetensors"]);

    // Tensors whose values do not fill their shapes, at write and at adapt time.
    let mut t = TensorMap::new();
    t.insert("cls_token".into(), (vec![1, 1, 64], vec![0.0; 3]));
    fails(write_safetensors(&dir.path().join("w.safetensors"), &t), &["tensor", "cls_token"]);
    let w = Weights { tensors: t, source: "short.safetensors".into() };
    fails(adapt_to_config(w, &tiny(), 0), &["short.safetensors", "cls_token"]);
}

#[test]
fn config_inference_from_odd_shapes() {
    let mut t: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    t.insert("patch_embed.proj.weight".into(), (vec![8, 3, 4, 4], vec![0.0; 8 * 3 * 16]));
    t.insert("blocks.0.attn.qkv.weight".into(), (vec![24, 8], vec![0.0; 24 * 8]));
    t.insert("blocks.0.mlp.fc1.weight".into(), (vec![], vec![0.0]));
    let w = Weights { tensors: t.clone(), source: "odd.safetensors".into() };
    fails(infer_config(&w, 2, (16, 16)), &["odd.safetensors", "blocks.0.mlp.fc1.weight"]);
    // A scalar head is no head: 0 classes, no panic.
    t.insert("blocks.0.mlp.fc1.weight".into(), (vec![16, 8], vec![0.0; 16 * 8]));
    t.insert("head.weight".into(), (vec![], vec![0.0]));
    let w = Weights { tensors: t, source: "odd.safetensors".into() };
    assert_eq!(infer_config(&w, 2, (16, 16)).unwrap().num_classes, 0);
    fails(infer_config(&w, 0, (16, 16)), &["model config", "num_heads"]);
    fails(infer_config(&w, 2, (0, 16)), &["model config", "img_size"]);
}

#[test]
fn methods() {
    fails(Method::parse("snella7", 0.5), &["method", "even"]);
    fails(Method::parse("adapter", 0.5), &["method", "adapter"]);
    fails(Method::parse("snella8", 1.5), &["method", "sparsity"]);
    fails(Method::parse("snell8", f32::NAN), &["method", "sparsity"]);
    fails(Method::snella(0, 0.5).validate(), &["method", "rank"]);
    fails(Method::snell(600, 0.5).validate(), &["method", "rank"]);
    fails(Method::Lora { r: 0 }.validate(), &["method", "rank"]);
    fails(Method::Gps { density: 2.0 }.validate(), &["method", "density"]);
    let k = KernelMethod {
        kernel: KernelKind::Rbf,
        r: 8,
        mixture: true,
        sparse: true,
        sparsity: 0.5,
        allocator: true,
        dropout: 1.0,
        drop_path: 0.0,
    };
    fails(Method::Kernel(k).validate(), &["method", "dropout"]);
    Method::snella(8, 0.5).validate().unwrap();
}

#[test]
fn allocators() {
    let cfg = tiny();
    let lora = cpu_model(&cfg, Method::Lora { r: 4 }, 1);
    fails(Allocator::new(&lora, AllocatorConfig::default()), &["allocator", "lora4"]);
    let mut model = cpu_model(&cfg, Method::snella(8, 0.5), 1);
    for (name, bad) in [
        ("target_ratio", AllocatorConfig { target_ratio: 1.5, ..Default::default() }),
        ("beta1", AllocatorConfig { beta1: 1.0, ..Default::default() }),
        ("beta2", AllocatorConfig { beta2: f64::NAN, ..Default::default() }),
        ("allocator", AllocatorConfig { total_epochs: 0, ..Default::default() }),
    ] {
        fails(Allocator::new(&model, bad), &[name]);
    }
    let alloc = Allocator::new(&model, AllocatorConfig::default()).unwrap();
    fails(alloc.reallocate(&mut model, f64::NAN), &["allocator", "budget"]);
    // Another model than the one it was built for.
    let mut other = cpu_model(&ViTConfig { depth: 1, ..cfg }, Method::snella(8, 0.5), 1);
    fails(alloc.reallocate(&mut other, 100.0), &["allocator", "branches"]);
    fails(alloc.update(&other), &["allocator"]);
    fails(alloc.scores(&other), &["allocator"]);
    let (budget, _) = alloc.schedule(usize::MAX); // no overflow
    assert!(budget.is_finite());
}

#[test]
fn reports() {
    let rc = Recompute::Attention;
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    fails(memory::memory_rows(&names(&["tiny"]), &names(&["snella8"]), 0, 0.5, 10, rc), &["batch"]);
    fails(memory::memory_rows(&names(&["tiny"]), &names(&["snella8"]), 2, 0.5, 0, rc), &["model config"]);
    fails(memory::memory_rows(&names(&["tiny"]), &names(&["snella8"]), 2, 2.0, 10, rc), &["method", "sparsity"]);
    fails(memory::memory_rows(&names(&["vit_q"]), &names(&["lora8"]), 2, 0.5, 10, rc), &["model", "vit_q"]);
    fails(memory::memory_rows_at(&names(&["tiny"]), &names(&["lora8"]), 2, 0.5, 10, rc, Some(0)), &["model config"]);
    fails(memory::memory_rows_at(&names(&["tiny"]), &names(&["lora8"]), 2, 0.5, 10, rc, Some(30)), &["model config"]);
    let mut row = memory::memory_rows(&names(&["tiny"]), &names(&["lora8"]), 2, 0.5, 10, rc).unwrap().remove(0);
    row.resolution = 31;
    fails(memory::measure(&row, Backend::Cpu, 1, 0.5, 10), &["model config"]);
    fails(memory::measure(&row, Backend::Cpu, 1, 0.5, 0), &["model config"]);
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("missing").join("table.csv");
    fails(memory::write_atomic(&nowhere, "x"), &[&shown(dir.path())]);
    let bench =
        |batch, steps| speed::step_speed("tiny", "lora8", batch, rc, Backend::Cpu, GemmPrecision::Fp32, 0, steps);
    fails(bench(0, 1), &["batch"]);
    fails(bench(1, 0), &["steps"]);
}

/// A dataset whose examples do not hold the pixels their size promises.
struct Broken;
impl Dataset for Broken {
    fn len(&self) -> usize {
        2
    }
    fn num_classes(&self) -> usize {
        1
    }
    fn class_names(&self) -> &[String] {
        &[]
    }
    fn get(&self, i: usize) -> Result<Example> {
        Ok(Example { image: vec![0.5; 5], height: 2, width: 2 + i, label: 0 })
    }
}

#[test]
fn data_sources_and_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("idx");
    write_idx(&idx, 4, 2);
    let (images, labels) = (idx.join("train-images-idx3-ubyte"), idx.join("train-labels-idx1-ubyte"));
    fails(Idx::open(&images, &labels, 0), &["num_classes"]);
    // Labels 0..3 with only 2 classes.
    fails(Idx::open(&images, &labels, 2), &[&shown(&labels), "label 2"]);
    let raw = std::fs::read(&images).unwrap();
    let cut = dir.path().join("cut-images");
    std::fs::write(&cut, &raw[..raw.len() - 10]).unwrap();
    fails(Idx::open(&cut, &labels, 10), &[&shown(&cut), "truncated"]);
    fails(Idx::open(&labels, &labels, 10), &[&shown(&labels), "magic"]);
    let ok = Idx::open(&images, &labels, 10).unwrap();
    fails(ok.with_class_names(vec!["a".into()]), &["class names"]);

    let missing = dir.path().join("no-such-folder");
    fails(ImageFolder::open(&missing), &[&shown(&missing)]);
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(folder.join("cat")).unwrap();
    let bad_jpeg = folder.join("cat").join("a.jpg");
    std::fs::write(&bad_jpeg, [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 1, 2]).unwrap();
    fails(decode_image(&bad_jpeg), &[&shown(&bad_jpeg)]);
    let ds = ImageFolder::open(&folder).unwrap();
    fails(ds.get(0), &[&shown(&bad_jpeg)]);
    fails(ds.get(7), &["dataset index", "7"]);

    let t = Transform::DirectResize { size: 8 };
    fails(Loader::new(&ds, t, 0, false, 0, false), &["batch size"]);
    let loader = Loader::new(Broken, t, 2, false, 0, false).unwrap();
    fails(loader.make_batch(0, &[0, 1]), &["dataset", "item 0", "3x2x2"]);
    fails(loader.make_batch(0, &[5]), &["dataset"]);

    fails(Transform::parse("fancy", 8), &["transform", "fancy"]);
    fails(Transform::parse("vtab", 0), &["transform size"]);
    fails(Transform::parse("vtab", usize::MAX / 64), &["transform size"]);
    let ex = Example { image: vec![0.5; 3 * 4 * 4], height: 4, width: 4, label: 0 };
    fails(Transform::TrainFgvc { size: 0 }.apply(&ex, &mut rand::thread_rng()), &["transform size"]);
    fails(
        Transform::EvalCenterCrop { size: usize::MAX / 100 }.apply(&ex, &mut rand::thread_rng()),
        &["transform size"],
    );
    let empty = Example { image: vec![], height: 0, width: 0, label: 0 };
    fails(Transform::EvalCenterCrop { size: 8 }.apply(&empty, &mut rand::thread_rng()), &["image"]);
}

#[test]
fn recipes() {
    fails(TrainConfig::from_toml("bogus_key = 1\n"), &["recipe", "bogus_key"]);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("recipe.toml");
    fails(TrainConfig::load(&missing), &[&shown(&missing)]);
    std::fs::write(&missing, "lr = \"fast\"\n").unwrap();
    fails(TrainConfig::load(&missing), &[&shown(&missing), "lr"]);

    let base = TrainConfig::default();
    for (key, value) in [
        ("lr", "nan"),
        ("lr", "0"),
        ("batch", "0"),
        ("epochs", "0"),
        ("sparsity", "1.5"),
        ("beta1", "1"),
        ("rank", "1000"),
        ("image_size", "0"),
        ("image_size", "100000"),
        ("drop_path", "1"),
        ("eval_every", "0"),
        ("gemm", "fp8"),
        ("device", "tpu"),
        ("no_such_option", "1"),
    ] {
        let mut c = base.clone();
        fails(c.apply_overrides(&[(key, value)]), &[key]);
        assert_eq!(c, base, "a failed override leaves the recipe unchanged");
    }
    // Values with no TOML form are refused by name, not a panic in the serialiser.
    let big = TrainConfig { seed: u64::MAX, ..base.clone() };
    fails(big.validate(), &["seed"]);
    fails(big.to_toml(), &["seed"]);
    fails(big.clone().apply_overrides(&[("lr", "1e-4")]), &["seed"]);
    let steps = TrainConfig { max_steps: Some(u64::MAX), ..base.clone() };
    fails(steps.to_toml(), &["max_steps"]);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = TrainConfig { data: std::ffi::OsStr::from_bytes(b"data\xff").into(), ..base.clone() };
        fails(odd.validate(), &["data", "UTF-8"]);
        fails(odd.to_toml(), &["data"]);
    }
    let mut no_data = base.clone();
    no_data.data = dir.path().join("nothing-here");
    fails(no_data.validate_paths(), &["data", &shown(&no_data.data)]);
}

#[test]
fn training_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = cpu_model(&tiny(), Method::snella(8, 0.5), 1);
    model.init_branches(0).unwrap();
    let ck = dir.path().join("ck.safetensors");
    save_checkpoint(&ck, &model, &TrainState::default(), None).unwrap();
    let bytes = std::fs::read(&ck).unwrap();

    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    fails(read_checkpoint_meta(&cut), &[&shown(&cut)]);
    fails(load_checkpoint(&cut, &mut model, None), &[&shown(&cut)]);

    let plain = dir.path().join("plain.safetensors");
    write_safetensors(&plain, &random_backbone(&small_cfg(), 1)).unwrap();
    fails(read_checkpoint_meta(&plain), &[&shown(&plain), "not a snella checkpoint"]);

    // A sparsity the metadata claims (not covered by the data checksum) outside [0, 1].
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta_text = header["__metadata__"]["snella_checkpoint"].as_str().unwrap().to_string();
    let mut meta: serde_json::Value = serde_json::from_str(&meta_text).unwrap();
    meta["sparsity"][0] = serde_json::json!(7.0);
    header["__metadata__"]["snella_checkpoint"] = serde_json::Value::String(meta.to_string());
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut tampered = (h.len() as u64).to_le_bytes().to_vec();
    tampered.extend_from_slice(&h);
    tampered.extend_from_slice(&bytes[8 + n..]);
    let bad = dir.path().join("tampered.safetensors");
    std::fs::write(&bad, tampered).unwrap();
    fails(load_checkpoint(&bad, &mut model, None), &[&shown(&bad), "sparsity 7"]);
    assert!(model.sparsity().iter().all(|s| (0.0..=1.0).contains(s)), "nothing was loaded");

    fails(write_atomic(Path::new("/"), b"x"), &["output path"]);
    let nowhere = dir.path().join("missing").join("ck.safetensors");
    fails(save_checkpoint(&nowhere, &model, &TrainState::default(), None), &[&shown(&nowhere)]);
}

fn delta(branch: DeltaBranch) -> SparseDelta {
    SparseDelta { method: "snella8".into(), model: tiny(), branches: vec![branch], dense: TensorMap::new() }
}

#[test]
fn sparse_deltas() {
    let branch = DeltaBranch {
        prefix: "branch.blocks.0.attn.q".into(),
        target: "w".into(),
        row0: 0,
        n_out: 2,
        n_in: 2,
        kept: 1,
        indices: vec![1],
        values: vec![0.5],
    };
    let weights = || Weights {
        tensors: TensorMap::from([("w".to_string(), (vec![4, 2], vec![0.0; 8]))]),
        source: "base.safetensors".into(),
    };
    let mut w = weights();
    apply_sparse_delta(&mut w, &delta(branch.clone())).unwrap();
    assert_eq!(w.tensors["w"].1[1], 0.5);

    let bad = [
        (DeltaBranch { indices: vec![4], ..branch.clone() }, "branch.blocks.0.attn.q"),
        (DeltaBranch { indices: vec![0, 1], ..branch.clone() }, "branch.blocks.0.attn.q"),
        (DeltaBranch { row0: 3, ..branch.clone() }, "branch.blocks.0.attn.q"),
        (DeltaBranch { row0: usize::MAX, ..branch.clone() }, "branch.blocks.0.attn.q"),
        (DeltaBranch { n_out: usize::MAX, n_in: 2, ..branch.clone() }, "branch.blocks.0.attn.q"),
        (DeltaBranch { target: "nope".into(), ..branch.clone() }, "nope"),
    ];
    for (b, name) in bad {
        let mut w = weights();
        fails(apply_sparse_delta(&mut w, &delta(b)), &[name]);
        assert_eq!(w, weights(), "nothing changed");
    }
    let mut short = weights();
    short.tensors.get_mut("w").unwrap().1.truncate(3);
    fails(apply_sparse_delta(&mut short, &delta(branch.clone())), &["delta", "base.safetensors", "'w'"]);
    let mut d = delta(branch.clone());
    d.dense.insert("head.bias".into(), (vec![4], vec![0.0; 2]));
    fails(apply_sparse_delta(&mut weights(), &d), &["delta", "head.bias"]);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("delta.safetensors");
    fails(write_sparse_delta(&p, &delta(DeltaBranch { indices: vec![9], ..branch.clone() })), &["export", "index 9"]);
    fails(write_sparse_delta(&p, &d), &["export", "head.bias"]);
    assert!(!p.exists());
    write_sparse_delta(&p, &delta(branch)).unwrap();
    assert_eq!(read_sparse_delta(&p).unwrap().nnz(), 1);
    let plain = dir.path().join("plain.safetensors");
    write_safetensors(&plain, &random_backbone(&small_cfg(), 1)).unwrap();
    fails(read_sparse_delta(&plain), &[&shown(&plain), "not a snella sparse delta"]);
    let full = cpu_model(&tiny(), Method::Full, 1);
    fails(snella::train::export::sparse_delta(&full), &["export", "full"]);
}

#[test]
fn trainer_and_evaluation() {
    let (dir, weights, data) = fixture(8, 4);
    let mut cfg = recipe(&weights, &data, &dir.path().join("out"), "linear", 1);
    cfg.data = dir.path().join("no-data");
    fails(Trainer::new(cfg.clone()), &["data", &shown(&cfg.data)]);
    cfg.data = data.clone();
    cfg.weights = Some(dir.path().join("no-weights.safetensors"));
    fails(Trainer::new(cfg.clone()), &["weights"]);
    cfg.weights = Some(weights.clone());

    let mut t = Trainer::new(cfg).unwrap();
    // The fields are public: a run checks them again.
    t.config.batch = 0;
    fails(t.run(false), &["batch"]);
    t.config.batch = 8;
    t.config.lr = f64::NAN;
    fails(t.run(false), &["lr"]);
    // A loader with bigger batches than the model was planned for.
    let big = Loader::new(Broken, Transform::DirectResize { size: 16 }, 16, false, 0, false).unwrap();
    fails(evaluate(&mut t.model, &big), &["dataset"]);
    let idx = Idx::open_standard(&data, false).unwrap();
    let wide = Loader::new(idx, Transform::DirectResize { size: 16 }, 16, false, 0, false).unwrap();
    let mut small = cpu_model(&small_cfg(), Method::Linear, 2);
    fails(evaluate(&mut small, &wide), &["batch"]);
}

#[test]
fn models() {
    let cfg = tiny();
    fails(Model::new(Backend::Cpu, &cfg, Method::snella(0, 0.5), 2, Recompute::Attention), &["method", "rank"]);
    fails(Model::new(Backend::Cpu, &cfg, Method::Lora { r: 0 }, 2, Recompute::Attention), &["method", "rank"]);
    fails(Model::new(Backend::Cpu, &cfg, Method::snella(8, 0.5), 0, Recompute::Attention), &["batch"]);
    // Sizes no machine can hold: refused before anything is allocated.
    let huge = Model::new(Backend::Cpu, &cfg, Method::snella(8, 0.5), usize::MAX / 2, Recompute::Attention);
    fails(huge, &["batch", "2^48"]);
    let vit_h = ViTConfig::by_name("vit_h14", 100).unwrap();
    fails(Model::new(Backend::Cpu, &vit_h, Method::Full, 1 << 16, Recompute::None), &["memory plan needs"]);
    let wide = ViTConfig { img_size: (1 << 20, 1 << 20), ..cfg.clone() };
    fails(Model::new(Backend::Cpu, &wide, Method::Linear, 1, Recompute::Attention), &["img_size"]);
    let mut m = cpu_model(&cfg, Method::snella(8, 0.5), 2);
    fails(m.set_param("no.such.weight", &[0.0]), &["no.such.weight"]);
    fails(m.set_param("head.bias", &[0.0; 3]), &["head.bias"]);
    fails(m.get_param("nope"), &["nope"]);
    fails(m.get_grad("blocks.0.attn.qkv.weight"), &["blocks.0.attn.qkv.weight", "frozen"]);
    fails(m.param_len("nope"), &["nope"]);
    fails(m.read_tensor("nope"), &["nope"]);
    fails(m.read_tensor("input.labels"), &["input.labels"]); // i32, not f32
    fails(m.set_gps_mask("head.weight", &[1]), &["head.weight", "GPS"]);
    fails(m.set_sparsity(&[0.5]), &["sparsity"]);
    fails(m.set_sparsity(&vec![1.5; m.branch_names().len()]), &["sparsity"]);
    fails(m.set_block_drop_path(1.0), &["drop-path"]);
    // The step cycle out of order.
    fails(m.forward(), &["batch", "set_batch"]);
    let per = 3 * 32 * 32;
    fails(m.set_batch(&vec![0.0; 3 * per], &[0, 1, 2]), &["batch"]);
    fails(m.set_batch(&vec![0.0; per], &[0, 1]), &["batch"]);
    fails(m.set_batch(&vec![0.0; 2 * per], &[0, 4]), &["label 4"]);
    fails(m.set_batch(&[], &[]), &["batch"]);
    fails(m.predict(&[]), &["images"]);
    fails(m.predict(&vec![0.0; per + 1]), &["images"]);
    fails(m.predict(&vec![0.0; 3 * per]), &["3 images", "batch 2"]);
    m.set_batch(&vec![0.0; 2 * per], &[0, 1]).unwrap();
    fails(m.backward(), &["backward", "forward"]);
    m.forward().unwrap();
    m.backward().unwrap();
    fails(m.adamw_step(f64::NAN, 0.0), &["learning rate"]);
    fails(m.adamw_step(1e-3, -1.0), &["weight decay"]);
    m.adamw_step(1e-3, 0.0).unwrap();
    let mut gps = cpu_model(&cfg, Method::Gps { density: 0.5 }, 1);
    let name = gps.gps_mask_names()[0].clone();
    fails(gps.set_gps_mask(&name, &[1, 0]), &["gps mask", &name]);
    gps.set_training(false);
}
