//! Exports: merged timm weights loaded into a method-less model give the trained model's logits
//! (SNELLA, LoRA, full fine-tuning, linear probe); the sparse delta round-trips through its file and,
//! applied to the pre-trained backbone, reproduces the merged weights; failed writes leave nothing behind.
mod common;
use common::*;

use snella::model::load::{adapt_to_config, read_checkpoint};
use snella::model::{Model, Recompute};
use snella::peft::Method;
use snella::train::data::Dataset;
use snella::train::export::{
    apply_sparse_delta, export_merged, merged_weights, read_sparse_delta, sparse_delta, write_sparse_delta,
};
use snella::train::trainer::Trainer;
use snella::{Backend, Error};

/// A short training run of `method` (5 steps at lr 3e-2) so that every trainable tensor has moved.
fn trained(dir: &Path, weights: &Path, data: &Path, method: &str) -> Trainer {
    trained_at(dir, weights, data, method, 0.3)
}

/// As [`trained`], with the initial (SNELL: fixed) ratio of zeroed entries `sparsity`.
fn trained_at(dir: &Path, weights: &Path, data: &Path, method: &str, sparsity: f64) -> Trainer {
    let mut cfg = recipe(weights, data, &dir.join(format!("run-{method}")), method, 1);
    cfg.sparsity = sparsity;
    cfg.lr = 3e-2;
    cfg.warmup_lr = 3e-2;
    cfg.max_steps = Some(5);
    let mut t = Trainer::new(cfg).unwrap();
    t.run(false).unwrap();
    t
}

/// Logits of `model` on a batch.
fn logits(model: &mut Model, b: &snella::train::loader::Batch) -> Vec<f32> {
    model.set_batch(&b.images, &b.labels).unwrap();
    model.forward().unwrap();
    model.logits().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale.max(1e-30)
}

fn round_trip(method: &str) {
    let (dir, weights, data) = fixture(48, 16);
    let mut t = trained(dir.path(), &weights, &data, method);
    let path = dir.path().join(format!("{method}-merged.safetensors"));
    export_merged(&t.model, &path).unwrap();
    let exported = read_checkpoint(&path).unwrap();
    let merged = merged_weights(&t.model).unwrap();
    assert_eq!(exported.tensors, merged, "the file holds exactly the merged weights");
    assert_eq!(exported.tensors.keys().len(), t.model.config().param_shapes().len());
    // The update is really in there: the first qkv weight moved (branch methods and full fine-tuning).
    let base = read_checkpoint(&weights).unwrap();
    let moved = |n: &str| exported.tensors[n].1 != base.tensors[n].1;
    assert_eq!(moved("blocks.0.attn.qkv.weight"), method != "linear", "{method}");
    assert!(moved("head.weight"));

    // A method-less model with the exported weights computes the trained model's logits.
    let mut plain = Model::new(Backend::Cpu, t.model.config(), Method::Linear, 8, Recompute::Attention).unwrap();
    for (name, (_, v)) in &exported.tensors {
        plain.set_param(name, v).unwrap();
    }
    let batch = t.test_loader.make_batch(0, &(0..8).collect::<Vec<_>>()).unwrap();
    let want = logits(&mut t.model, &batch);
    let got = logits(&mut plain, &batch);
    let rel = max_rel(&want, &got);
    println!("{method}: max relative logit difference {rel:e}");
    assert!(rel <= 1e-5, "{method}: logits differ by {rel:e} (relative)");
}

#[test]
fn merged_export_round_trip_snella() {
    round_trip("snella8");
}

#[test]
fn merged_export_round_trip_lora() {
    round_trip("lora4");
}

#[test]
fn merged_export_round_trip_full() {
    round_trip("full");
}

#[test]
fn merged_export_round_trip_linear_probe_and_mixk() {
    round_trip("linear");
    round_trip("mixk8");
}

/// `sparsity` < 0.5 stores the sparse blocks whole in the file, > 0.5 as (index, value) pairs.
fn delta_round_trip(method: &str, exact: bool, sparsity: f64) {
    let (dir, weights, data) = fixture(48, 16);
    let t = trained_at(dir.path(), &weights, &data, method, sparsity);
    let delta = sparse_delta(&t.model).unwrap();
    let p = dir.path().join("delta.safetensors");
    write_sparse_delta(&p, &delta).unwrap();
    let back = read_sparse_delta(&p).unwrap();
    assert_eq!(back, delta, "file round trip");
    assert_eq!(back.branches.len(), t.model.branch_names().len());
    assert!(
        back.dense.contains_key("head.weight")
            && back.dense.contains_key("head.bias")
            && back.dense.contains_key("cls_token")
    );

    // Pre-trained backbone + delta == merged export.
    let (mut base, _) = adapt_to_config(read_checkpoint(&weights).unwrap(), t.model.config(), 0).unwrap();
    apply_sparse_delta(&mut base, &back).unwrap();
    let merged = merged_weights(&t.model).unwrap();
    for (name, (shape, want)) in &merged {
        let (s, got) = &base.tensors[name];
        assert_eq!(s, shape, "{name}");
        if exact {
            assert!(got == want, "{method}: {name} differs after applying the delta");
        } else {
            let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-6, "{method}: {name} differs by {d}");
        }
    }
    // The file is compact for the sparse methods: only the kept entries.
    if method.starts_with("snell") {
        let total: usize = back.branches.iter().map(|b| b.n_in * b.n_out).sum();
        let kept: usize = back.branches.iter().map(|b| b.kept).sum();
        assert!(back.nnz() <= kept && kept < total, "{} stored, {kept} kept of {total}", back.nnz());
        assert!(
            back.branches.iter().all(|b| b.kept as f64 <= (1.0 - sparsity) * (b.n_in * b.n_out) as f64 + 1.0),
            "initial ratio {sparsity}"
        );
        // Sparse blocks take 8 bytes per kept entry, dense ones 4 per entry: the file is the smaller one.
        let size = std::fs::metadata(&p).unwrap().len() as usize;
        let head: usize = back.dense.values().map(|t| 4 * t.1.len()).sum();
        let want: usize = back.branches.iter().map(|b| (8 * b.values.len()).min(4 * b.n_in * b.n_out)).sum();
        assert!(size >= want + head && size < want + head + 64 * 1024, "{size} bytes, {want} + {head} of data");
    }
    // A delta for another shape is refused without touching the weights.
    let (mut other, _) = adapt_to_config(read_checkpoint(&weights).unwrap(), t.model.config(), 0).unwrap();
    let before = other.clone();
    let mut bad = back.clone();
    bad.branches[0].n_in += 1;
    let e = apply_sparse_delta(&mut other, &bad).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    assert_eq!(other, before);
}

#[test]
fn sparse_delta_round_trip_snella() {
    delta_round_trip("snella8", true, 0.3);
}

#[test]
fn sparse_delta_round_trip_snell_and_lora() {
    delta_round_trip("snell8", true, 0.8);
    delta_round_trip("lora4", false, 0.0);
}

#[test]
fn sparse_delta_of_full_fine_tuning_is_refused() {
    let (dir, weights, data) = fixture(16, 8);
    let t = Trainer::new(recipe(&weights, &data, &dir.path().join("o"), "full", 1)).unwrap();
    match sparse_delta(&t.model).unwrap_err() {
        Error::Invalid { option, msg } => assert!(option == "export" && msg.contains("merged"), "{msg}"),
        e => panic!("{e}"),
    }
    // A linear probe's delta is just the head and cls token.
    let t = Trainer::new(recipe(&weights, &data, &dir.path().join("o2"), "linear", 1)).unwrap();
    let d = sparse_delta(&t.model).unwrap();
    assert!(d.branches.is_empty());
    assert_eq!(d.dense.keys().cloned().collect::<Vec<_>>(), vec!["cls_token", "head.bias", "head.weight"]);
}

#[test]
fn failed_export_writes_leave_nothing_behind() {
    let (dir, weights, data) = fixture(16, 8);
    let t = Trainer::new(recipe(&weights, &data, &dir.path().join("o"), "snella8", 1)).unwrap();
    let e = export_merged(&t.model, &dir.path().join("no/such/dir/m.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    let target = dir.path().join("a-dir");
    std::fs::create_dir(&target).unwrap();
    assert!(export_merged(&t.model, &target).is_err());
    let delta = sparse_delta(&t.model).unwrap();
    assert!(matches!(write_sparse_delta(&target, &delta).unwrap_err(), Error::Io { .. }));
    assert!(matches!(write_sparse_delta(&dir.path().join("no/d.safetensors"), &delta).unwrap_err(), Error::Io { .. }));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(target.is_dir() && std::fs::read_dir(&target).unwrap().next().is_none());
    // Both exports of a run in one call.
    let out = dir.path().join("exports");
    std::fs::create_dir(&out).unwrap();
    let written = snella::train::export::export_all(&t.model, &out).unwrap();
    assert_eq!(written, vec![out.join("merged.safetensors"), out.join("delta.safetensors")]);
    assert_eq!(read_sparse_delta(&written[1]).unwrap(), delta);
}

/// Exports a finished run and checks the round trip on its real model:
/// `SNELLA_RECIPE=recipes/x.toml SNELLA_CHECKPOINT=runs/x/checkpoint.safetensors [SNELLA_EXPORT=dir]
/// cargo test --release --test export export_run -- --ignored --nocapture`. Writes `merged.safetensors`
/// and `delta.safetensors` into `SNELLA_EXPORT` (default: the checkpoint's folder) and prints the largest
/// relative logit difference between the trained model and a method-less model loading the merged file.
#[test]
#[ignore]
fn export_run() {
    let (Ok(recipe_path), Ok(ck)) = (std::env::var("SNELLA_RECIPE"), std::env::var("SNELLA_CHECKPOINT")) else {
        eprintln!("set SNELLA_RECIPE and SNELLA_CHECKPOINT");
        return;
    };
    let mut cfg = TrainConfig::load(Path::new(&recipe_path)).unwrap();
    let ck = PathBuf::from(ck);
    let out = std::env::var("SNELLA_EXPORT").map(PathBuf::from).unwrap_or_else(|_| ck.parent().unwrap().to_path_buf());
    cfg.out_dir = std::env::temp_dir().join(format!("snella-export-{}", std::process::id()));
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.resume_from(&ck).unwrap();
    let written = snella::train::export::export_all(&t.model, &out).unwrap();
    for p in &written {
        eprintln!("wrote {} ({} bytes)", p.display(), std::fs::metadata(p).unwrap().len());
    }
    let exported = read_checkpoint(&written[0]).unwrap();
    let mut plain =
        Model::new(Backend::Cpu, t.model.config(), Method::Linear, cfg.batch, Recompute::Attention).unwrap();
    plain.load_backbone(&exported).unwrap();
    let n = cfg.batch.min(t.test_loader.dataset().len());
    let batch = t.test_loader.make_batch(0, &(0..n).collect::<Vec<_>>()).unwrap();
    let want = logits(&mut t.model, &batch);
    let got = logits(&mut plain, &batch);
    let rel = max_rel(&want, &got);
    eprintln!("max relative logit difference {rel:e}");
    assert!(rel <= 1e-5);
    let _ = std::fs::remove_dir_all(&cfg.out_dir);
}
