//! Training: the learning-rate schedule against the golden vector, recipes (parsing, overrides,
//! validation, the shipped `recipes/*.toml`), a short run whose loss goes down, NaN detection.
//! Everything runs on a small random DINOv2-like model and synthetic IDX data in a temp folder.
mod common;
use common::*;

use snella::train::schedule::cosine_lr;
use snella::train::trainer::{EpochMetrics, Trainer};
use snella::Error;

#[test]
fn schedule_matches_golden_vector() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/snella_tiny.json");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: Vec<f64> =
        m["lr_schedule_lr1e-3_100ep"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(want.len(), 100);
    for (e, &w) in want.iter().enumerate() {
        let got = cosine_lr(e, 1e-3, 100, 10, 1e-6, 1e-5);
        assert!(got == w || ((got - w) / w).abs() <= 1e-15, "epoch {e}: {got:e} vs {w:e}");
    }
    // Exactly equal in practice (same f64 operations in the same order as the reference).
    assert!(want.iter().enumerate().all(|(e, &w)| cosine_lr(e, 1e-3, 100, 10, 1e-6, 1e-5) == w));
}

fn invalid_option(e: Error) -> String {
    match e {
        Error::Invalid { option, .. } => option,
        other => panic!("expected Error::Invalid, got {other}"),
    }
}

#[test]
fn recipe_defaults_parse_and_overrides() {
    let d = TrainConfig::default();
    assert_eq!((d.lr, d.epochs, d.warmup_epochs, d.warmup_lr, d.min_lr), (1e-3, 100, 10, 1e-6, 1e-5));
    assert_eq!((d.beta1, d.beta2, d.init_warmup, d.final_warmup, d.mask_interval), (0.85, 0.85, 0, 0, 1));
    d.validate().unwrap();

    let c =
        TrainConfig::from_toml("method = \"snella32\"\nlr = 5e-4\nbatch = 16\ntarget_ratio = 0.3\nkernel = \"rbf\"\n")
            .unwrap();
    assert_eq!((c.lr, c.batch, c.target_ratio), (5e-4, 16, 0.3));
    assert_eq!(c.method().unwrap().name(), "snella32-rbf");
    // TOML round trip.
    assert_eq!(TrainConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);

    let mut c = TrainConfig::default();
    c.apply_overrides(&[
        ("lr", "2e-3"),
        ("method", "lora"),
        ("rank", "16"),
        ("data", "/tmp/x"),
        ("train_subset", "100"),
    ])
    .unwrap();
    assert_eq!(c.lr, 2e-3);
    assert_eq!(c.method().unwrap().name(), "lora16");
    assert_eq!(c.data, PathBuf::from("/tmp/x"));
    assert_eq!(c.train_subset, Some(100));
    c.apply_overrides(&[("train_subset", "none"), ("--eval-every", "5")]).unwrap();
    assert_eq!((c.train_subset, c.eval_every), (None, 5));
    // An int where a float is expected is fine; a word where a number is expected is not.
    c.apply_overrides(&[("lr", "1")]).unwrap();
    assert_eq!(c.lr, 1.0);
    let before = c.clone();
    assert_eq!(invalid_option(c.apply_overrides(&[("lr", "fast")]).unwrap_err()), "lr");
    assert_eq!(c, before, "a failed override leaves the config unchanged");
}

#[test]
fn recipe_validation_names_the_option() {
    let cases: &[(&str, &str, &str)] = &[
        ("lr", "-1e-3", "lr"),
        ("lr", "0", "lr"),
        ("batch", "0", "batch"),
        ("sparsity", "1.5", "sparsity"),
        ("target_ratio", "-0.1", "target_ratio"),
        ("method", "adapter8", "method"),
        ("method", "snella7", "method"),
        ("rank", "7", "rank"),
        ("kernel", "cosine", "kernel"),
        ("weight_decay", "-1", "weight_decay"),
        ("epochs", "0", "epochs"),
        ("beta1", "1.0", "beta1"),
        ("mask_interval", "0", "mask_interval"),
        ("device", "tpu", "device"),
        ("recompute", "some", "recompute"),
        ("train_transform", "mixup", "train_transform"),
        ("eval_transform", "fgvc", "eval_transform"),
        ("model", "vit_x", "model"),
        ("no_such_option", "1", "no_such_option"),
    ];
    for &(k, v, want) in cases {
        let mut c = TrainConfig::default();
        let e = c.apply_overrides(&[(k, v)]).unwrap_err();
        let msg = e.to_string();
        assert_eq!(invalid_option(e), want, "{k}={v}: {msg}");
    }
    // Missing data folder and weights: checked by validate_paths (and Trainer::new).
    let mut c = TrainConfig { data: PathBuf::from("/nonexistent/snella-data"), ..TrainConfig::default() };
    c.validate().unwrap();
    let e = c.validate_paths().unwrap_err();
    assert!(e.to_string().contains("/nonexistent/snella-data"), "{e}");
    assert_eq!(invalid_option(e), "data");
    let e = Trainer::new(c.clone()).err().unwrap();
    assert_eq!(invalid_option(e), "data");
    c.weights = Some(PathBuf::from("/nonexistent/w.safetensors"));
    assert_eq!(invalid_option(c.validate_paths().unwrap_err()), "weights");
    // Unknown keys in a file are refused with the key's name.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.toml");
    std::fs::write(&p, "lr = 1e-3\nlearning_rate = 3\n").unwrap();
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
    std::fs::write(&p, "batch = 0\n").unwrap();
    assert_eq!(invalid_option(TrainConfig::load(&p).unwrap_err()), "batch");
}

#[test]
fn shipped_recipes_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let c = TrainConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            c.method().unwrap();
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} recipes in {}", dir.display());
    // Spot checks against the official per-task hyperparameters (method.md §14).
    let cub = TrainConfig::load(&dir.join("snella32-cub.toml")).unwrap();
    assert_eq!((cub.batch, cub.lr, cub.weight_decay, cub.sparsity, cub.target_ratio), (16, 1e-3, 0.05, 0.0, 0.30));
    assert_eq!(cub.method().unwrap().name(), "snella32");
    let cars = TrainConfig::load(&dir.join("mixk32-cars.toml")).unwrap();
    assert_eq!(cars.method().unwrap().name(), "mixk32");
    let dtd = TrainConfig::load(&dir.join("snell32-vtab-dtd.toml")).unwrap();
    assert_eq!((dtd.batch, dtd.lr, dtd.weight_decay, dtd.sparsity), (64, 1e-3, 0.01, 0.995));
}

fn read_metrics(p: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn short_run_loss_decreases() {
    let (dir, weights, data) = fixture(80, 40);
    let out = dir.path().join("run");
    let mut cfg = recipe(&weights, &data, &out, "snella8", 5);
    cfg.lr = 3e-2;
    cfg.warmup_lr = cfg.lr;
    let mut t = Trainer::new(cfg).unwrap();
    assert!(t.allocator.is_some());
    let s = t.run(false).unwrap();
    assert!(s.completed);
    assert_eq!((s.epochs_done, s.steps), (5, 50));
    let m = read_metrics(&out.join("metrics.jsonl"));
    assert_eq!(m.len(), 5);
    for (e, line) in m.iter().enumerate() {
        assert_eq!(line.epoch, e);
        assert!(line.test_acc.is_some() && line.train_loss.is_finite());
        assert_eq!(line.layers.len(), 12, "per-layer sparsity of 2 blocks × 6 branches");
        assert!(line.kept_total.unwrap() > 0.0 && line.kept_total.unwrap() <= 1.0);
    }
    // The allocator moved the budget towards the target (0.3 → 0.6 zeroed).
    assert!(m[4].kept_total.unwrap() < m[0].kept_total.unwrap(), "{:?} vs {:?}", m[4].kept_total, m[0].kept_total);
    assert!(m[4].train_loss < 0.8 * m[0].train_loss, "train loss {} -> {}", m[0].train_loss, m[4].train_loss);
    assert!(s.best_test_acc.unwrap() >= 0.25, "chance is 0.1: {s:?}");
    assert!(s.trainable_params > 0 && t.checkpoint_path().is_file());
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("run");
    let mut cfg = recipe(&weights, &data, &out, "lora4", 2);
    cfg.lr = 1e30;
    cfg.warmup_lr = 1e30;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    let e = t.run(false).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("NaN") && msg.contains("epoch 0") && msg.contains("last good checkpoint"), "{msg}");
    let ck = out.join("checkpoint.safetensors");
    assert!(msg.contains(&ck.display().to_string()), "{msg}");
    assert_eq!(invalid_option(e), "training");
    // The checkpoint is the good state from before the divergence, and it loads.
    let meta = snella::train::checkpoint::read_checkpoint_meta(&ck).unwrap();
    assert_eq!(meta.state.global_step, 0);
    let mut t2 = Trainer::new(cfg).unwrap();
    t2.resume_from(&ck).unwrap();
    for name in t2.model.trainable_names() {
        assert!(t2.model.get_param(&name).unwrap().iter().all(|x| x.is_finite()), "{name}");
    }
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn linear_probe_and_image_folder_run() {
    // An image folder of PNGs with train/test splits, FGVC augmentation, eval centre crop.
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.safetensors");
    write_safetensors(&weights, &random_backbone(&small_cfg(), 1)).unwrap();
    let data = dir.path().join("imgs");
    for split in ["train", "test"] {
        for (c, col) in [("red", [220u8, 20, 20]), ("blue", [20u8, 20, 220])] {
            let d = data.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..6u8 {
                image::RgbImage::from_fn(20, 24, |x, y| {
                    let n = ((x as u8).wrapping_mul(7) ^ (y as u8).wrapping_mul(13) ^ i) % 30;
                    image::Rgb([col[0].saturating_sub(n), col[1].saturating_add(n), col[2].saturating_sub(n)])
                })
                .save(d.join(format!("{i}.png")))
                .unwrap();
            }
        }
    }
    let mut cfg = recipe(&weights, &data, &dir.path().join("out"), "linear", 3);
    cfg.data_format = DataFormat::Auto;
    cfg.train_transform = "fgvc".into();
    cfg.eval_transform = "eval".into();
    cfg.batch = 4;
    let mut t = Trainer::new(cfg).unwrap();
    assert_eq!(t.model.config().num_classes, 2);
    let s = t.run(false).unwrap();
    assert!(s.completed && s.last_test_acc.is_some());
    assert_eq!(s.trainable_params, 2 * 32 + 2 + 32, "head + cls token");
}

/// Runs a recipe end to end with progress bars: `SNELLA_RECIPE=recipes/x.toml [SNELLA_SET="k=v,k=v"]
/// cargo test --release --test train run_recipe -- --ignored --nocapture` (the CPU demo of the README).
/// Prints the summary as JSON.
#[test]
#[ignore]
fn run_recipe() {
    let Ok(path) = std::env::var("SNELLA_RECIPE") else {
        eprintln!("set SNELLA_RECIPE to a recipe file");
        return;
    };
    let mut cfg = TrainConfig::load(Path::new(&path)).unwrap();
    let set = std::env::var("SNELLA_SET").unwrap_or_default();
    let pairs: Vec<(&str, &str)> =
        set.split(',').filter(|s| !s.is_empty()).map(|kv| kv.split_once('=').expect("k=v")).collect();
    cfg.apply_overrides(&pairs).unwrap();
    let mut t = Trainer::new(cfg).unwrap();
    for n in &t.notes {
        eprintln!("note: {n}");
    }
    let s = t.run(true).unwrap();
    println!("{}", serde_json::to_string_pretty(&s).unwrap());
}

/// The recipe keeps the last, partial batch of an epoch (drop_last False): a step with fewer images than
/// planned uses the first rows of every buffer.
#[test]
fn partial_last_batch_trains() {
    let (dir, weights, data) = fixture(20, 10);
    let mut t = Trainer::new(recipe(&weights, &data, &dir.path().join("o"), "snella8", 1)).unwrap();
    assert_eq!(t.train_loader.num_batches(), 3, "8 + 8 + 4");
    let s = t.run(false).unwrap();
    assert_eq!(s.steps, 3);
}

/// A recipe with `precision = "bf16"` trains like the fp32 one (frozen block weights and the kept stream in
/// bf16), and a checkpoint of one precision does not resume the other (another trajectory).
#[test]
fn bf16_storage_run() {
    let (dir, weights, data) = fixture(80, 40);
    let run = |precision: &str| {
        let out = dir.path().join(format!("run-{precision}"));
        let mut cfg = recipe(&weights, &data, &out, "snella8", 5);
        cfg.lr = 3e-2;
        cfg.warmup_lr = cfg.lr;
        cfg.precision = precision.into();
        cfg.recompute = "block".into();
        let mut t = Trainer::new(cfg).unwrap();
        assert!(t.run(false).unwrap().completed);
        (t, read_metrics(&out.join("metrics.jsonl")))
    };
    let (t16, m16) = run("bf16");
    let (mut t32, m32) = run("fp32");
    assert_eq!(t16.model.memory_options().precision, snella::model::Precision::Bf16);
    assert!(
        m16[4].train_loss < 0.8 * m16[0].train_loss,
        "bf16 train loss {} -> {}",
        m16[0].train_loss,
        m16[4].train_loss
    );
    let (a, b) = (m16[4].train_loss, m32[4].train_loss);
    assert!((a - b).abs() <= 0.1 * b, "final train loss: bf16 {a} vs fp32 {b}");
    assert!(t32.resume_from(&t16.checkpoint_path()).is_err(), "an fp32 run resumed a bf16 checkpoint");
    let mut bad = t16.config.clone();
    bad.precision = "bf17".into();
    assert!(Trainer::new(bad).is_err());
}

/// Recompute `block` trains with the fused update (the branch factors stepped inside the backward); the run
/// must be the same bits as one at `attention`, which steps after it: the same metrics, trainable values,
/// AdamW moments and allocator EMAs.
#[test]
fn a_block_run_fuses_the_update_with_the_same_bits() {
    let (dir, weights, data) = fixture(40, 16);
    let run = |recompute: &str| {
        let out = dir.path().join(format!("run-{recompute}"));
        let mut cfg = recipe(&weights, &data, &out, "snella8", 2);
        cfg.recompute = recompute.into();
        let mut t = Trainer::new(cfg).unwrap();
        assert!(t.run(false).unwrap().completed);
        (t, read_metrics(&out.join("metrics.jsonl")))
    };
    let (tb, mb) = run("block");
    let (ta, ma) = run("attention");
    assert!(tb.model.memory_options().fused_update && !ta.model.memory_options().fused_update);
    for (a, b) in ma.iter().zip(&mb) {
        assert_eq!(
            (a.train_loss, a.test_loss, a.test_acc),
            (b.train_loss, b.test_loss, b.test_acc),
            "epoch {}",
            a.epoch
        );
    }
    let state = |t: &Trainer| -> Vec<(String, Vec<f32>)> {
        let names = t
            .model
            .plan()
            .tensors()
            .iter()
            .filter(|s| matches!(s.pool, snella::Pool::Trainable | snella::Pool::Optimizer));
        names.map(|s| (s.name.clone(), t.model.read_tensor(&s.name).unwrap())).collect()
    };
    let (sa, sb) = (state(&ta), state(&tb));
    assert_eq!(sa.len(), sb.len());
    for ((n, a), (_, b)) in sa.iter().zip(&sb) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n} differs between the runs");
    }
}
