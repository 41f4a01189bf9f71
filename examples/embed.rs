//! What a program embedding snella writes: memory plans before anything is allocated; DINOv2-S/14 fine-tuned
//! with SNELLA-8 and the allocator (by steps) on batches the program builds itself; evaluation, and the
//! trainable set saved and reloaded; merged weights exported and reloaded; a step timed.
//!   cargo run --release --example embed
//! The backbone is `assets/dinov2_vits14.safetensors` (scripts/fetch-assets.sh) when it is there, else a
//! random backbone of the same shape written to a temporary file (the calls are the same, the accuracy is
//! not). The README's library example is the part between the `README` markers, verbatim, and
//! `tests/embedding.rs` runs this file.
use std::path::{Path, PathBuf};

use snella::model::load::write_safetensors;
use snella::model::{plan, Model, Recompute, ViTConfig};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::Method;
use snella::report::speed::StepTimer;
use snella::train::augment::Transform;
use snella::train::export::export_all;
use snella::train::trainer::random_backbone;
use snella::{mib, Backend, Device, Error, Result};

/// Batches of 8 of the program's own images: class c (of 4) lights quadrant c of a noisy 28x28 image, which
/// the VTAB pipeline resizes to 56 px (4x4 patches of 14) and normalises.
fn batches(n: usize, seed: u64) -> Result<Vec<(Vec<f32>, Vec<i32>)>> {
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 * 0.2
    };
    (0..n)
        .map(|k| {
            let labels: Vec<i32> = (0..8).map(|i| ((i + k) % 4) as i32).collect();
            let mut images = Vec::new();
            for &c in &labels {
                let lit = |j: usize| ((j / 28) % 28 / 14) * 2 + (j % 28) / 14 == c as usize;
                let img: Vec<f32> = (0..3 * 28 * 28).map(|j| if lit(j) { 0.7 } else { 0.1 } + noise()).collect();
                images.extend(Transform::DirectResize { size: 56 }.preprocess(&img, 28, 28, 0)?);
            }
            Ok((images, labels))
        })
        .collect()
}

/// The fetched DINOv2-S/14, or a random backbone of its shape in `dir`.
fn backbone(dir: &Path) -> Result<PathBuf> {
    let asset = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/dinov2_vits14.safetensors");
    if asset.exists() {
        println!("backbone: {}", asset.display());
        return Ok(asset);
    }
    let path = dir.join("dinov2_vits14_random.safetensors");
    println!("backbone: random, DINOv2-S/14's shape (assets/ not fetched: run scripts/fetch-assets.sh)");
    write_safetensors(&path, &random_backbone(&ViTConfig::by_name("dinov2_s14", 1000)?, 0))?;
    Ok(path)
}

pub fn main() -> Result<()> {
    // Memory plans, sized before anything is allocated: ViT-B/16 and a custom width.
    let custom = ViTConfig { embed_dim: 384, num_heads: 6, mlp_hidden: 1536, ..ViTConfig::default() };
    for (name, cfg) in [("ViT-B/16", ViTConfig::default()), ("ViT-S/16 (custom)", custom)] {
        let p = plan(&cfg, &Method::snella(8, 0.5), 32, Recompute::Block)?;
        println!("{name}, SNELLA-8, batch 32, recompute block: {:.0} MiB planned", mib(p.total_bytes()));
    }
    let dir = std::env::temp_dir().join(format!("snella-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let weights = backbone(&dir)?;
    let (train, test) = (batches(12, 1)?, batches(4, 2)?);

    // README:begin
    let backend = Backend::new(Device::Cpu)?; // Device::auto() takes a GPU when there is one
    let build = |weights: &Path, method: Method| {
        Model::builder(weights, method) // a file or a Hugging Face Hub id
            .classes(4)
            .image_size(56)
            .batch(8)
            .recompute(Recompute::Block)
            .backend(backend.clone()) // models built on clones share one device context
            .build()
    };
    // DINOv2-S/14: heads looked up (6), position table resized as its family does, branches initialised.
    let (mut model, notes) = build(&weights, Method::snella(8, 0.0))?;
    notes.iter().for_each(|n| println!("{n}"));

    // Fine-tune on the program's own batches, the allocator scheduled by steps.
    let alloc = Allocator::new(&model, AllocatorConfig { target_ratio: 0.5, ..AllocatorConfig::by_steps(12, 4) })?;
    for (step, (images, labels)) in train.iter().enumerate() {
        if let Some(r) = alloc.begin(&mut model, step)? {
            println!("step {step}: reallocated, {:.2} of the branch entries kept", r.kept_fraction);
        }
        model.set_batch(images, labels)?;
        let loss = model.forward()?;
        model.backward()?;
        model.adamw_step(1e-3, 1e-4)?;
        alloc.update(&model)?;
        println!("step {step}: loss {loss:.4}");
    }
    let e = model.evaluate(test.iter().map(|(images, labels)| (images, labels)))?;
    println!("test: loss {:.4}, top-1 {:.1}% of {} images", e.loss, 100.0 * e.accuracy, e.images);

    // The trainable set (megabytes, not the backbone), saved and loaded into a fresh model.
    let logits = model.predict(&test[0].0)?;
    let trainable = dir.join("trainable.safetensors");
    model.save_trainable(&trainable)?;
    let (mut reloaded, _) = build(&weights, Method::snella(8, 0.0))?;
    reloaded.load_trainable(&trainable)?;
    assert_eq!(reloaded.predict(&test[0].0)?, logits, "the reloaded model computes other logits");

    // Merged weights W0 + ΔW (and the sparse delta), exported; they load as a plain backbone.
    let exported = export_all(&model, &dir)?;
    let (mut merged, _) = build(&exported[0], Method::Linear)?;
    let merged_logits = merged.predict(&test[0].0)?;
    let diff = merged_logits.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff <= 1e-4, "the merged export's logits differ by {diff}");
    println!("reloaded: same logits; merged export: logits within {diff:.1e}");

    // One step timed: device time on a GPU, wall-clock on the CPU.
    let timer = StepTimer::start(&model)?;
    model.set_batch(&train[0].0, &train[0].1)?;
    model.forward()?;
    model.backward()?;
    model.adamw_step(1e-3, 1e-4)?;
    println!("one step of 8 images: {:.0} ms", timer.stop(&model)?.as_secs_f64() * 1e3);
    // README:end
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
}
