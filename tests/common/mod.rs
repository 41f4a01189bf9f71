//! Test helpers shared by the integration tests: a small random DINOv2-like backbone and synthetic IDX data
//! in a temp folder (train, checkpoint, export, cli_train), and the tiny LayerScale model with deterministic
//! weights that tests/methods.rs and tests/precision.rs step, and `fails`, the check that a mistake is an error
//! naming its fault (tests/bad_input.rs, tests/embedding.rs).
#![allow(dead_code)] // each test binary uses its own subset
pub use std::path::{Path, PathBuf};

pub use snella::model::load::write_safetensors;
use snella::model::Model;
pub use snella::model::ViTConfig;
pub use snella::train::recipe::{DataFormat, TrainConfig};
pub use snella::train::trainer::random_backbone;

/// The `tiny` ViT (32 px, patch 8, width 64, depth 2) with LayerScale, 10 classes.
pub fn tiny_layer_scale() -> ViTConfig {
    ViTConfig { layer_scale: true, ..ViTConfig::by_name("tiny", 10).unwrap() }
}

/// Deterministic small weights for every parameter: LayerNorm scales and the branches' α, γ at 1, β at 0,
/// everything else in ±0.05; GPS masks as `Model::init_method` draws them.
pub fn deterministic_params(model: &Model) {
    model.init_method(0).unwrap(); // GPS's masks (the loop below sets every parameter, branches included)
    for (i, name) in model.param_names().iter().enumerate() {
        let n = model.param_len(name).unwrap();
        let ones = name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name == "norm.weight"
            || name.ends_with(".alpha")
            || (name.ends_with(".gamma") && name.starts_with("branch."));
        let v: Vec<f32> = if ones {
            vec![1.0; n]
        } else if name.ends_with(".beta") {
            vec![0.0; n]
        } else {
            (0..n).map(|j| 0.05 * (((j * 7919 + i * 104729) % 2001) as f32 / 1000.0 - 1.0)).collect()
        };
        model.set_param(name, &v).unwrap();
    }
}

/// A small DINOv2-like configuration (LayerScale, patch 8 on 16 px: 4 patches + cls).
pub fn small_cfg() -> ViTConfig {
    ViTConfig {
        img_size: (16, 16),
        patch_size: 8,
        in_chans: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_hidden: 64,
        num_classes: 10,
        layer_scale: true,
        eps: 1e-6,
    }
}

/// Writes IDX files (train: `n_train`, test: `n_test` 28×28 images of 10 classes): class c lights the
/// 14×14 quadrants given by the bits of c + 1 (one patch each at 16 px), plus seeded noise.
pub fn write_idx(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 12345u64;
    let mut rnd = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let mut img = Vec::new();
        img.extend_from_slice(&0x0803u32.to_be_bytes());
        for d in [n as u32, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        let mut lab = Vec::new();
        lab.extend_from_slice(&0x0801u32.to_be_bytes());
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        for i in 0..n {
            let c = i % 10;
            lab.push(c as u8);
            for y in 0..28 {
                for x in 0..28 {
                    let on = (c + 1) >> ((y / 14) * 2 + x / 14) & 1 == 1;
                    let v = if on { 200 + rnd() % 56 } else { rnd() % 60 };
                    img.push(v as u8);
                }
            }
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

/// A temp folder with `weights.safetensors` (random small backbone, timm names) and `data/` (IDX).
pub fn fixture(n_train: usize, n_test: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.safetensors");
    write_safetensors(&weights, &random_backbone(&small_cfg(), 7)).unwrap();
    let data = dir.path().join("data");
    write_idx(&data, n_train, n_test);
    (dir, weights, data)
}

/// A recipe for the small model on the fixture: `method`, lr 1e-2 without warm-up, batch 8.
pub fn recipe(weights: &Path, data: &Path, out: &Path, method: &str, epochs: usize) -> TrainConfig {
    TrainConfig {
        model: "infer".into(),
        weights: Some(weights.to_path_buf()),
        num_heads: Some(2),
        image_size: 16,
        method: method.into(),
        sparsity: 0.3,
        target_ratio: 0.6,
        lr: 1e-2,
        weight_decay: 1e-4,
        epochs,
        warmup_epochs: 0,
        warmup_lr: 1e-2,
        min_lr: 1e-5,
        batch: 8,
        seed: 3,
        device: "cpu".into(),
        data: data.to_path_buf(),
        data_format: DataFormat::Idx,
        train_transform: "vtab".into(),
        eval_transform: "vtab".into(),
        out_dir: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

/// The error of `r`, whose message must contain every one of `names`.
#[track_caller]
pub fn fails<T>(r: snella::Result<T>, names: &[&str]) -> String {
    let Err(e) = r else { panic!("the mistake was accepted (expected an error naming {names:?})") };
    let msg = e.to_string();
    for n in names {
        assert!(msg.contains(n), "the message does not name '{n}': {msg}");
    }
    msg
}
