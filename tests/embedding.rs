//! What a program embedding snella writes (issue #17). `examples/embed.rs` is that program, and the README's
//! library example is its text between the `README` markers, verbatim: both are checked here, and the example
//! runs (on the fetched DINOv2-S/14 when `scripts/fetch-assets.sh` has run, else on a random backbone of its
//! shape). Then the program's mistakes: each used to run and give a wrong result silently, and now is an error
//! that names the fault and the call that fixes it. And the one-call paths that replace the boilerplate those
//! programs wrote: the builder, the allocator by steps, save/load of the trainable set, evaluation over any
//! batches, preprocessing with a seed, option names.
mod common;
use common::*;

#[allow(dead_code)] // only `main` is called here
#[path = "../examples/embed.rs"]
mod embed;

use snella::model::load::{self, identify, infer_config, PosResize, TensorMap, Weights};
use snella::model::posembed::resize_pos_embed;
use snella::model::{Model, ModelBuilder, Precision, Recompute};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::Method;
use snella::train::augment::{self, Filter, Transform};
use snella::train::recipe::DataFormat;
use snella::{Backend, Device, GemmPrecision, KernelKind};

/// The lines of `text` strictly between the line containing `begin` and the next one containing `end`.
fn between<'a>(text: &'a str, begin: &str, end: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = text.lines().collect();
    let b = lines.iter().position(|l| l.contains(begin)).unwrap_or_else(|| panic!("no line with {begin:?}"));
    let e = b + lines[b..].iter().position(|l| l.contains(end)).unwrap_or_else(|| panic!("no line with {end:?}"));
    lines[b + 1..e].to_vec()
}

#[test]
fn the_readme_library_example_is_the_embed_example_verbatim() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example = std::fs::read_to_string(format!("{root}/examples/embed.rs")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    // The example's body is indented by one level inside `main`; the README shows it without.
    let want: Vec<&str> = between(&example, "// README:begin", "// README:end")
        .into_iter()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    let section = readme.split("## As a library").nth(1).expect("README has an 'As a library' section");
    let block = section.split("```rust").nth(1).and_then(|b| b.split("```").next()).expect("a rust block in it");
    let got: Vec<&str> = block.trim_matches('\n').lines().collect();
    assert!(!want.is_empty());
    assert_eq!(got, want, "README.md's library example differs from examples/embed.rs between its markers");
}

#[test]
fn the_embed_example_runs() {
    embed::main().unwrap();
}

/// A 4-image batch for `cfg`.
fn batch(cfg: &ViTConfig) -> (Vec<f32>, Vec<i32>) {
    let per = 3 * cfg.img_size.0 * cfg.img_size.1;
    ((0..4 * per).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect(), vec![0, 1, 2, 3])
}

fn weights(cfg: &ViTConfig, source: &str) -> Weights {
    Weights { tensors: random_backbone(cfg, 7), source: source.into() }
}

/// A model on the CPU, its backbone loaded and its branches initialised by hand (the low-level path).
fn loaded(cfg: &ViTConfig, method: Method) -> Model {
    let m = Model::new(Backend::Cpu, cfg, method, 4, Recompute::Attention).unwrap();
    m.load_backbone(&weights(cfg, "w.safetensors")).unwrap();
    m.init_branches(3).unwrap();
    m
}

/// Only the shapes infer_config reads (no values): a backbone of `width`, `depth`, patch `p`, MLP `mlp`.
fn shapes(width: usize, depth: usize, p: usize, mlp: Option<usize>, layer_scale: bool) -> Weights {
    let mut t = TensorMap::new();
    t.insert("patch_embed.proj.weight".into(), (vec![width, 3, p, p], vec![]));
    for l in 0..depth {
        t.insert(format!("blocks.{l}.attn.qkv.weight"), (vec![3 * width, width], vec![]));
    }
    match mlp {
        Some(f) => t.insert("blocks.0.mlp.fc1.weight".into(), (vec![f, width], vec![])),
        None => t.insert("blocks.0.mlp.w12.weight".into(), (vec![8192, width], vec![])),
    };
    if layer_scale {
        t.insert("blocks.0.ls1.gamma".into(), (vec![width], vec![]));
    }
    Weights { tensors: t, source: "shapes.safetensors".into() }
}

#[test]
fn the_readme_head_count_for_dinov2_is_refused_and_the_right_one_looked_up() {
    // The README used to say infer_config(&weights, 12, ...): DINOv2-S/14 has 6 heads, and 12 ran, wrongly.
    let w = shapes(384, 12, 14, Some(1536), true);
    fails(infer_config(&w, 12, (224, 224)), &["num_heads", "12 heads", "DINOv2 ViT-S/14", "6 heads"]);
    assert_eq!(infer_config(&w, 0, (224, 224)).unwrap().num_heads, 6, "0 looks the count up");
    assert_eq!(infer_config(&w, 6, (224, 224)).unwrap().num_heads, 6);
    // Every family the library recognises, by width and depth.
    for (d, depth, p, ls, heads) in
        [(768, 12, 14, true, 12), (1024, 24, 14, true, 16), (768, 12, 16, false, 12), (1024, 24, 16, false, 16)]
            .into_iter()
            .chain([(1280, 32, 14, false, 16), (384, 12, 16, false, 6), (192, 12, 16, false, 3)])
    {
        let w = shapes(d, depth, p, Some(4 * d), ls);
        assert_eq!(infer_config(&w, 0, (224, 224)).unwrap().num_heads, heads, "{}", identify(&w).name);
    }
    fails(infer_config(&shapes(1536, 40, 14, None, true), 0, (224, 224)), &["SwiGLU", "ViT-g/14"]);
    // An unknown size needs its count, and a count that does not divide the width is refused.
    fails(infer_config(&shapes(32, 2, 8, Some(64), false), 0, (16, 16)), &["num_heads", "cannot look up"]);
    fails(infer_config(&shapes(32, 2, 8, Some(64), false), 3, (16, 16)), &["model config", "num_heads 3"]);
    // A named configuration and another count in a recipe; the builder with a wrong count.
    let recipe = TrainConfig { model: "dinov2_s14".into(), num_heads: Some(12), ..TrainConfig::default() };
    fails(recipe.validate(), &["num_heads", "dinov2_s14", "6 heads"]);
    let b = ModelBuilder::from_weights(w, Method::Linear).num_heads(12).image_size(224);
    fails(b.device(Device::Cpu).build(), &["num_heads", "6 heads"]);
}

#[test]
fn adamw_step_without_a_fresh_backward_is_an_error() {
    let cfg = tiny_layer_scale();
    let mut m = loaded(&cfg, Method::snella(8, 0.5));
    fails(m.adamw_step(1e-3, 0.0), &["adamw_step", "no backward has run yet", "call forward and backward"]);
    let (x, y) = batch(&cfg);
    m.set_batch(&x, &y).unwrap();
    m.forward().unwrap();
    m.backward().unwrap();
    m.adamw_step(1e-3, 0.0).unwrap();
    let head = m.get_param("head.weight").unwrap();
    fails(m.adamw_step(1e-3, 0.0), &["adamw_step", "no backward since the last step"]);
    assert_eq!(m.get_param("head.weight").unwrap(), head, "the refused step changed the weights");
    assert_eq!(m.step_count(), 1);
}

#[test]
fn a_backbone_never_loaded_is_an_error() {
    let cfg = tiny_layer_scale();
    let mut m = Model::new(Backend::Cpu, &cfg, Method::snella(8, 0.5), 4, Recompute::Attention).unwrap();
    m.init_branches(0).unwrap();
    let (x, y) = batch(&cfg);
    m.set_batch(&x, &y).unwrap();
    fails(m.forward(), &["backbone", "never loaded", "'cls_token'", "Model::load_backbone"]);
    fails(m.predict(&x), &["backbone", "Model::load_backbone"]);
    // Every backbone tensor set by hand (as the golden tests do) counts as loading it.
    for (name, (_, v)) in random_backbone(&cfg, 1) {
        m.set_param(&name, &v).unwrap();
    }
    assert!(m.forward().unwrap().is_finite());
}

#[test]
fn branches_never_initialised_are_an_error() {
    let cfg = tiny_layer_scale();
    for method in [Method::snella(8, 0.5), Method::Lora { r: 4 }] {
        let mut m = Model::new(Backend::Cpu, &cfg, method, 4, Recompute::Attention).unwrap();
        m.load_backbone(&weights(&cfg, "w.safetensors")).unwrap();
        let (x, y) = batch(&cfg);
        m.set_batch(&x, &y).unwrap();
        fails(m.forward(), &["branches", "never initialised", "branch.blocks.0.attn.q.", "Model::init_branches"]);
        m.init_branches(0).unwrap();
        m.forward().unwrap();
    }
    // GPS trains a masked part of the backbone: masks never set would leave nothing but the head to train.
    let mut gps = Model::new(Backend::Cpu, &cfg, Method::Gps { density: 0.1 }, 4, Recompute::Attention).unwrap();
    gps.load_backbone(&weights(&cfg, "w.safetensors")).unwrap();
    gps.init_branches(0).unwrap(); // no branches: the masks stay unset
    let (x, y) = batch(&cfg);
    gps.set_batch(&x, &y).unwrap();
    fails(gps.forward(), &["gps masks", "never set", "'blocks.0.attn.qkv.weight'", "Model::init_method"]);
    gps.init_method(0).unwrap();
    gps.forward().unwrap();
    // A method without branches or masks has none to initialise.
    let mut probe = Model::new(Backend::Cpu, &cfg, Method::Linear, 4, Recompute::Attention).unwrap();
    probe.load_backbone(&weights(&cfg, "w.safetensors")).unwrap();
    let (x, y) = batch(&cfg);
    probe.set_batch(&x, &y).unwrap();
    probe.forward().unwrap();
}

#[test]
fn predict_with_too_many_images_speaks_of_images() {
    let cfg = tiny_layer_scale();
    let mut m = Model::new(Backend::Cpu, &cfg, Method::Linear, 2, Recompute::Attention).unwrap();
    let msg = fails(m.predict(&batch(&cfg).0), &["images", "4 images", "batch 2"]);
    assert!(!msg.contains("label"), "{msg}");
}

#[test]
fn the_builder_makes_a_ready_model_and_resizes_the_table_as_the_family_does() {
    let dir = std::env::temp_dir().join(format!("snella-embedding-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A facebookresearch DINOv2 release: timm names, LayerScale, its mask token, a 7x7 table; the task: 4x4.
    let cfg = ViTConfig { img_size: (56, 56), ..small_cfg() };
    let mut t = random_backbone(&cfg, 5);
    t.insert("mask_token".into(), (vec![1, cfg.embed_dim], vec![0.0; cfg.embed_dim]));
    let path = dir.join("dinov2_release.safetensors");
    write_safetensors(&path, &t).unwrap();
    let w = load::read_checkpoint(&path).unwrap();
    assert_eq!(identify(&w).pos_resize, PosResize::Dinov2Offset, "{}", identify(&w).name);
    assert_eq!(load::native_image_size(&w), Some(56));
    let (mut model, notes) = Model::builder(&path, Method::snella(8, 0.5))
        .num_heads(2)
        .classes(3)
        .image_size(32)
        .batch(4)
        .precision(Precision::Fp32)
        .device(Device::Cpu)
        .build()
        .unwrap();
    assert!(notes.iter().any(|n| n.contains("facebookresearch release")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("DINOv2's +0.1")), "{notes:?}");
    let want = resize_pos_embed(&t["pos_embed"].1, cfg.embed_dim, (7, 7), (4, 4), PosResize::Dinov2Offset).unwrap();
    assert_eq!(model.get_param("pos_embed").unwrap(), want);
    assert_eq!(model.config().num_classes, 3);
    let (x, _) = batch(&model.config().clone());
    model.set_batch(&x, &[0, 1, 2, 0]).unwrap();
    model.forward().unwrap();
    model.backward().unwrap();
    model.adamw_step(1e-3, 0.0).unwrap();
    // Read from a Hugging Face Dinov2Model file, the same tensors resize as transformers does: to a size.
    let hf_file = dir.join("hf_dinov2.safetensors");
    let mut hf_names = TensorMap::new();
    hf_names.insert("embeddings.cls_token".into(), (vec![1, 1, 2], vec![0.0; 2]));
    hf_names.insert("encoder.layer.0.norm1.weight".into(), (vec![2], vec![1.0; 2]));
    write_safetensors(&hf_file, &hf_names).unwrap();
    let hf = Weights { tensors: w.tensors.clone(), source: hf_file };
    assert_eq!(load::detect(&hf.source).unwrap(), load::Format::HfDinov2);
    assert_eq!(identify(&hf).pos_resize, PosResize::Torch, "{}", identify(&hf).name);
    // A headless backbone needs the class count; an image size that is not a multiple of the patch is refused.
    t.remove("head.weight");
    t.remove("head.bias");
    let headless = Weights { tensors: t, source: "headless".into() };
    fails(ModelBuilder::from_weights(headless.clone(), Method::Linear).num_heads(2).build(), &["classes"]);
    let b = ModelBuilder::from_weights(headless, Method::Linear).num_heads(2).classes(2).image_size(30);
    fails(b.device(Device::Cpu).build(), &["model config", "multiple of patch size 8"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_allocator_runs_by_steps_with_one_call_and_reports_the_kept_fraction() {
    let cfg = tiny_layer_scale();
    let mut by_steps = loaded(&cfg, Method::snella(8, 0.0));
    let mut by_hand = loaded(&cfg, Method::snella(8, 0.0));
    let settings = AllocatorConfig { target_ratio: 0.5, ..AllocatorConfig::by_steps(6, 2) };
    let (a, b) = (Allocator::new(&by_steps, settings).unwrap(), Allocator::new(&by_hand, settings).unwrap());
    let (x, y) = batch(&cfg);
    let mut kept = Vec::new();
    for step in 0..6 {
        let r = a.begin(&mut by_steps, step).unwrap();
        // What embedders used to write: the schedule, then the reallocation.
        let (budget, due) = b.schedule(step);
        assert_eq!(r.is_some(), due, "step {step}");
        if let Some(r) = r {
            let want = b.reallocate(&mut by_hand, budget).unwrap();
            assert_eq!(r.sparsity, want.sparsity);
            let caps = total_entries(&by_steps);
            let granted: i64 = r.alloc.iter().map(|&n| n as i64).sum();
            assert_eq!(r.kept_fraction, granted as f64 / caps as f64);
            kept.push(r.kept_fraction);
        }
        for m in [&mut by_steps, &mut by_hand] {
            m.set_batch(&x, &y).unwrap();
            m.forward().unwrap();
            m.backward().unwrap();
            m.adamw_step(1e-3, 0.0).unwrap();
        }
        a.update(&by_steps).unwrap();
        b.update(&by_hand).unwrap();
    }
    assert_eq!(kept.len(), 2, "steps 2 and 4");
    assert!(kept[0] < 1.0 && kept[1] < kept[0] && kept[1] > 0.5, "{kept:?}");
    assert_eq!(by_steps.sparsity(), by_hand.sparsity());
    assert_eq!(AllocatorConfig::by_epochs(7).total_epochs, 7);
}

/// in·out over every branch of a model.
fn total_entries(m: &Model) -> usize {
    let c = m.config();
    let (d, f) = (c.embed_dim, c.mlp_hidden);
    c.depth * (4 * d * d + 2 * d * f)
}

#[test]
fn the_trainable_set_saves_and_loads_in_one_call_and_counts_as_initialised() {
    let dir = std::env::temp_dir().join(format!("snella-embedding-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = tiny_layer_scale();
    let mut m = loaded(&cfg, Method::snella(8, 0.5));
    let (x, y) = batch(&cfg);
    m.set_batch(&x, &y).unwrap();
    m.forward().unwrap();
    m.backward().unwrap();
    m.adamw_step(1e-2, 0.0).unwrap();
    let logits = m.predict(&x).unwrap();
    let path = dir.join("trainable.safetensors");
    m.save_trainable(&path).unwrap();
    // A fresh model with its backbone loaded and no init_branches: the loaded set initialises the branches.
    let mut fresh = Model::new(Backend::Cpu, &cfg, Method::snella(8, 0.5), 4, Recompute::Attention).unwrap();
    fresh.load_backbone(&weights(&cfg, "w.safetensors")).unwrap();
    fresh.load_trainable(&path).unwrap();
    assert_eq!(fresh.predict(&x).unwrap(), logits);
    assert_eq!(fresh.step_count(), 1);
    let mut other = loaded(&cfg, Method::Lora { r: 4 });
    fails(other.load_trainable(&path), &["trainable.safetensors", "snella8", "lora4"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn evaluate_takes_any_batches() {
    let cfg = tiny_layer_scale();
    let mut m = loaded(&cfg, Method::snella(8, 0.5));
    let (x, y) = batch(&cfg);
    let per = 3 * 32 * 32;
    // Two batches of different sizes, borrowed slices.
    let batches = [(&x[..3 * per], &y[..3]), (&x[3 * per..], &y[3..])];
    let e = m.evaluate(batches).unwrap();
    let logits = m.predict(&x).unwrap();
    let right = y.iter().enumerate().filter(|&(r, &label)| {
        let row = &logits[r * 10..(r + 1) * 10];
        (0..10).fold(0, |best, j| if row[j] > row[best] { j } else { best }) == label as usize
    });
    assert_eq!(e.images, 4);
    assert_eq!(e.accuracy, right.count() as f64 / 4.0);
    m.set_batch(&x, &y).unwrap();
    assert!((e.loss - m.forward().unwrap() as f64).abs() < 1e-5);
    assert!(m.is_training(), "evaluation mode is restored");
    fails(m.evaluate(Vec::<(Vec<f32>, Vec<i32>)>::new()), &["evaluation", "no batches"]);
}

#[test]
fn preprocessing_runs_on_the_callers_images_with_a_seed() {
    let (h, w) = (20, 30);
    let img: Vec<f32> = (0..3 * h * w).map(|i| (i % 97) as f32 / 96.0).collect();
    let fgvc = Transform::TrainFgvc { size: 16 };
    let a = fgvc.preprocess(&img, h, w, 1).unwrap();
    assert_eq!(a.len(), 3 * 16 * 16);
    assert_eq!(a, fgvc.preprocess(&img, h, w, 1).unwrap(), "the same seed, the same image");
    assert_ne!(a, fgvc.preprocess(&img, h, w, 2).unwrap());
    // The VTAB pipeline is resize then normalize.
    let mut want = augment::resize(&img, 3, (h, w), (16, 16), Filter::Bicubic).unwrap();
    want.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    augment::normalize(&mut want).unwrap();
    assert_eq!(Transform::DirectResize { size: 16 }.preprocess(&img, h, w, 9).unwrap(), want);
    fails(fgvc.preprocess(&img, h, w + 1, 0), &["image", "3x20x31"]);
    fails(augment::resize(&img, 3, (h, w + 1), (8, 8), Filter::Bilinear), &["image", "3x20x31"]);
    fails(augment::resize(&img, 3, (h, w), (0, 8), Filter::Bilinear), &["image"]);
    fails(augment::normalize(&mut [0.0; 4]), &["image", "3-channel"]);
}

#[test]
fn option_enums_parse_from_their_names() {
    assert_eq!("block".parse::<Recompute>().unwrap(), Recompute::Block);
    assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("tf32".parse::<GemmPrecision>().unwrap(), GemmPrecision::Tf32);
    assert_eq!("cuda-emu".parse::<Device>().unwrap(), Device::CudaEmu);
    assert_eq!("rbf".parse::<KernelKind>().unwrap(), KernelKind::Rbf);
    assert_eq!("dinov2".parse::<PosResize>().unwrap(), PosResize::Dinov2Offset);
    assert_eq!("idx".parse::<DataFormat>().unwrap(), DataFormat::Idx);
    fails("blocks".parse::<Recompute>(), &["recompute", "blocks"]);
    fails("fp16".parse::<Precision>(), &["precision", "fp16"]);
    fails("tpu".parse::<Device>(), &["device", "tpu"]);
    fails("bilinear".parse::<PosResize>(), &["pos_resize", "bilinear"]);
    assert_eq!(ViTConfig::default(), ViTConfig::by_name("vit_b16", 1000).unwrap());
}

#[test]
fn models_share_a_cloned_backend() {
    let cfg = tiny_layer_scale();
    let backends: Vec<Backend> = match snella::cuda_emu_available() {
        Ok(()) => vec![Backend::Cpu, Backend::emulated(2 << 30).unwrap()],
        Err(_) => vec![Backend::Cpu],
    };
    for backend in backends {
        let w = weights(&cfg, "w.safetensors");
        let build = |b: Backend| {
            let (m, _) = ModelBuilder::from_weights(w.clone(), Method::snella(8, 0.5))
                .num_heads(cfg.num_heads)
                .batch(4)
                .backend(b)
                .build()
                .unwrap();
            m
        };
        let (mut a, mut b) = (build(backend.clone()), build(backend));
        assert_eq!(a.device(), b.device());
        let (x, y) = batch(&cfg);
        for m in [&mut a, &mut b] {
            m.set_batch(&x, &y).unwrap();
        }
        assert_eq!(a.forward().unwrap(), b.forward().unwrap(), "{:?}", a.device());
    }
}
