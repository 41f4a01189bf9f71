//! The whole life of a fine-tune as an embedding program drives it, through the public API only (no CLI,
//! no Trainer): load a backbone file, build a SNELLA model, train on the caller's own batches, save the
//! trainable set, load it into a fresh model, export merged weights and the sparse delta, reload each
//! export into a plain model and evaluate it. Every reload must reproduce the trained model's logits.
use snella::model::load::{adapt_to_config, read_checkpoint, write_safetensors};
use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::train::checkpoint::{load_checkpoint, save_checkpoint, TrainState};
use snella::train::export::{apply_sparse_delta, export_all, read_sparse_delta};
use snella::train::trainer::random_backbone;
use snella::Backend;

const B: usize = 6;

fn cfg() -> ViTConfig {
    ViTConfig {
        img_size: (16, 16),
        patch_size: 8,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_hidden: 64,
        ..ViTConfig::by_name("tiny", 4).unwrap()
    }
}

/// The caller's data: class c brightens quadrants 0..=c of a noisy 16×16 image (patch 8: one patch each;
/// a random backbone's cls token sees the patches nearly as a sum, so the classes differ in count).
fn batches(n: usize, seed: u64) -> Vec<(Vec<f32>, Vec<i32>)> {
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
    };
    (0..n)
        .map(|k| {
            let labels: Vec<i32> = (0..B).map(|i| ((i + k) % 4) as i32).collect();
            let mut images = Vec::with_capacity(B * 3 * 256);
            for &c in &labels {
                for _ch in 0..3 {
                    for y in 0..16 {
                        for x in 0..16 {
                            let q = (y / 8) * 2 + x / 8;
                            images.push(if q <= c as usize { 1.0 } else { -0.5 } + noise());
                        }
                    }
                }
            }
            (images, labels)
        })
        .collect()
}

fn logits(model: &mut Model, data: &[(Vec<f32>, Vec<i32>)]) -> (Vec<f32>, f64) {
    let (mut all, mut right, mut n) = (Vec::new(), 0, 0);
    for (x, y) in data {
        model.set_batch(x, y).unwrap();
        model.forward().unwrap();
        let l = model.logits().unwrap();
        for (row, &label) in l.chunks(4).zip(y) {
            let arg = (0..4).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            right += (arg == label as usize) as usize;
            n += 1;
        }
        all.extend(l);
    }
    (all, right as f64 / n as f64)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn fine_tune_save_load_export_reload_evaluate() {
    let dir = std::env::temp_dir().join(format!("snella-api-cycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = cfg();

    // A backbone file, read back as any user's checkpoint would be.
    let backbone = dir.join("backbone.safetensors");
    write_safetensors(&backbone, &random_backbone(&cfg, 3)).unwrap();
    let (weights, notes) = adapt_to_config(read_checkpoint(&backbone).unwrap(), &cfg, 0).unwrap();
    assert!(notes.is_empty(), "{notes:?}");

    let method = Method::parse("snella8", 0.5).unwrap();
    let build = |method: Method| {
        let m = Model::new(Backend::Cpu, &cfg, method, B, Recompute::Attention).unwrap();
        m.load_backbone(&weights).unwrap();
        m
    };
    let mut model = build(method);
    model.init_branches(1).unwrap();

    // Fine-tune on the caller's batches.
    let train = batches(8, 11);
    let test = batches(3, 99);
    let mut first = None;
    let mut last = 0.0;
    for _epoch in 0..6 {
        for (x, y) in &train {
            model.set_batch(x, y).unwrap();
            last = model.forward().unwrap();
            first.get_or_insert(last);
            model.backward().unwrap();
            model.adamw_step(2e-2, 0.0).unwrap();
        }
    }
    assert!(last < 0.8 * first.unwrap(), "loss did not fall: {} -> {last}", first.unwrap());
    let (want, acc) = logits(&mut model, &test);
    // Inference without labels gives the same logits.
    let predicted: Vec<f32> = test.iter().flat_map(|(x, _)| model.predict(x).unwrap()).collect();
    assert_eq!(predicted, want, "predict differs from forward + logits");

    // Save the trainable set; load it into a fresh model of the same backbone.
    let ckpt = dir.join("run.safetensors");
    save_checkpoint(&ckpt, &model, &TrainState::default(), None).unwrap();
    let mut resumed = build(method);
    load_checkpoint(&ckpt, &mut resumed, None).unwrap();
    assert_eq!(resumed.step_count(), model.step_count());
    let (got, acc_resumed) = logits(&mut resumed, &test);
    assert_eq!(got, want, "logits after save/load differ");
    assert_eq!(acc_resumed, acc);

    // Export; the merged weights load into a plain model (linear probe = the backbone alone).
    let written = export_all(&resumed, &dir).unwrap();
    assert_eq!(written.len(), 2, "{written:?}");
    let merged = read_checkpoint(&written[0]).unwrap();
    let mut plain = Model::new(Backend::Cpu, &cfg, Method::Linear, B, Recompute::Attention).unwrap();
    plain.load_backbone(&merged).unwrap();
    let (got, acc_merged) = logits(&mut plain, &test);
    let d = max_diff(&got, &want);
    assert!(d <= 1e-4, "merged export: logits differ by {d}");
    assert_eq!(acc_merged, acc);

    // The sparse delta on top of the original backbone gives the same weights.
    let mut rebuilt = read_checkpoint(&backbone).unwrap();
    apply_sparse_delta(&mut rebuilt, &read_sparse_delta(&written[1]).unwrap()).unwrap();
    let mut plain2 = Model::new(Backend::Cpu, &cfg, Method::Linear, B, Recompute::Attention).unwrap();
    plain2.load_backbone(&rebuilt).unwrap();
    let (got2, _) = logits(&mut plain2, &test);
    let d2 = max_diff(&got2, &want);
    assert!(d2 <= 1e-4, "backbone + sparse delta: logits differ by {d2}");

    std::fs::remove_dir_all(&dir).unwrap();
}
