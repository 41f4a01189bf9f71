//! Checkpoints: exact resume (killed mid-epoch and at an epoch boundary, SNELLA with its allocator and
//! LoRA), size (the trainable set only), clear errors for corrupt/truncated files, another method or
//! another recipe, and atomic writes that leave nothing behind when they fail.
mod common;
use common::*;

use std::collections::BTreeMap;

use snella::train::checkpoint::{load_checkpoint, read_checkpoint_meta, save_checkpoint, write_atomic, TrainState};
use snella::train::trainer::Trainer;
use snella::Error;

/// (adam step, sparsity bits, epoch, global step) of a checkpoint.
type MetaBits = (u64, Vec<u32>, usize, u64);

/// Every tensor of a checkpoint file as raw bytes, plus its [`MetaBits`].
fn checkpoint_bits(p: &Path) -> (BTreeMap<String, Vec<u8>>, MetaBits) {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
    let m = read_checkpoint_meta(p).unwrap();
    (t, (m.adam_step, m.sparsity.iter().map(|s| s.to_bits()).collect(), m.state.epoch, m.state.global_step))
}

/// 2 epochs of 8 steps straight, then the same run killed after `kill` steps (checkpoints every `every`
/// steps) and resumed from its last checkpoint: the final checkpoints must be bit-identical.
fn resume_is_exact(method: &str, scenarios: &[(u64, u64, usize, usize)]) {
    let (dir, weights, data) = fixture(64, 16);
    let mut cfg = recipe(&weights, &data, &dir.path().join("straight"), method, 2);
    cfg.train_transform = "fgvc".into(); // random crops, flips and jitter: the augmentation RNG must resume too
    cfg.sparsity = 0.2;
    cfg.target_ratio = 0.7;
    let mut a = Trainer::new(cfg.clone()).unwrap();
    let sa = a.run(false).unwrap();
    assert_eq!(sa.steps, 16);
    let (want, want_meta) = checkpoint_bits(&a.checkpoint_path());
    assert!(want.keys().any(|k| k.starts_with("alloc.")) == method.starts_with("snella"));
    for &(kill, every, want_epoch, want_step_in_epoch) in scenarios {
        let out = dir.path().join(format!("killed-{kill}-{every}"));
        let mut c = cfg.clone();
        c.out_dir = out.clone();
        c.checkpoint_every = every;
        c.max_steps = Some(kill);
        let mut b = Trainer::new(c.clone()).unwrap();
        let sb = b.run(false).unwrap();
        assert!(!sb.completed && sb.steps == kill);
        drop(b);
        // A fresh process: rebuild from the recipe, restore the last checkpoint, finish.
        c.max_steps = None;
        let mut r = Trainer::new(c).unwrap();
        r.resume_from(&out.join("checkpoint.safetensors")).unwrap();
        assert_eq!(
            (r.state.epoch, r.state.step_in_epoch),
            (want_epoch, want_step_in_epoch),
            "kill {kill} every {every}"
        );
        let sr = r.run(false).unwrap();
        assert!(sr.completed && sr.steps == 16);
        let (got, got_meta) = checkpoint_bits(&r.checkpoint_path());
        assert_eq!(got_meta, want_meta, "{method}: kill {kill} every {every}");
        assert_eq!(got.len(), want.len());
        for (k, v) in &want {
            assert!(got[k] == *v, "{method}: kill {kill} every {every}: tensor {k} differs after resume");
        }
        assert_eq!(sr.best_test_acc, sa.best_test_acc);
        // metrics.jsonl has one line per epoch, without duplicates from the killed session.
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2, "{lines}");
    }
}

#[test]
fn resume_is_exact_snella_with_allocator() {
    // (kill after step, checkpoint every, resumed epoch, resumed batch):
    //  mid-epoch 1 (checkpoint at step 12 = epoch 1 batch 4), mid-epoch 0, and an epoch boundary.
    resume_is_exact("snella8", &[(14, 4, 1, 4), (6, 5, 0, 5), (11, 0, 1, 0)]);
}

#[test]
fn resume_is_exact_lora() {
    resume_is_exact("lora4", &[(13, 3, 1, 4), (9, 0, 1, 0)]);
}

#[test]
fn checkpoint_holds_only_the_trainable_set() {
    let (dir, weights, data) = fixture(16, 8);
    let t = Trainer::new(recipe(&weights, &data, &dir.path().join("o"), "snella8", 1)).unwrap();
    let p = dir.path().join("c.safetensors");
    save_checkpoint(&p, &t.model, &TrainState::default(), None).unwrap();
    let (tensors, _) = checkpoint_bits(&p);
    let trainable: usize = t.model.trainable_names().iter().map(|n| t.model.param_len(n).unwrap()).sum();
    let emas: usize = tensors.iter().filter(|(k, _)| k.starts_with("alloc.")).map(|(_, v)| v.len() / 4).sum::<usize>();
    let stored: usize = tensors.values().map(|v| v.len()).sum();
    assert_eq!(stored, 4 * (3 * trainable + emas), "values + m + v + allocator EMAs");
    assert!(tensors.keys().all(|k| k.starts_with("param.") || k.starts_with("adamw.") || k.starts_with("alloc.")));
    assert!(!tensors.contains_key("param.blocks.0.attn.qkv.weight") && tensors.contains_key("param.head.weight"));
    // Only the data and a header: nothing of the frozen backbone.
    let size = std::fs::metadata(&p).unwrap().len() as usize;
    assert!(size < stored + 64 * 1024, "{size} bytes for {stored} bytes of tensors");
    // A linear probe's checkpoint is a few KB, far below the backbone.
    let lin = Trainer::new(recipe(&weights, &data, &dir.path().join("o3"), "linear", 1)).unwrap();
    let pl = dir.path().join("l.safetensors");
    save_checkpoint(&pl, &lin.model, &TrainState::default(), None).unwrap();
    let lsize = std::fs::metadata(&pl).unwrap().len() as usize;
    let backbone = lin.model.config().num_params() * 4;
    assert!(lsize < 3 * 4 * (10 * 32 + 10 + 32) + 16 * 1024 && lsize * 10 < backbone, "{lsize} vs backbone {backbone}");
    // And it round-trips.
    let mut t2 = Trainer::new(recipe(&weights, &data, &dir.path().join("o2"), "snella8", 1)).unwrap();
    let meta = load_checkpoint(&p, &mut t2.model, None).unwrap();
    assert_eq!(meta.method, "snella8");
}

fn saved(dir: &Path, method: &str) -> (PathBuf, TrainConfig) {
    let (weights, data) = (dir.join("weights.safetensors"), dir.join("data"));
    let cfg = recipe(&weights, &data, &dir.join(format!("out-{method}")), method, 1);
    let t = Trainer::new(cfg.clone()).unwrap();
    let p = dir.join(format!("{method}.safetensors"));
    save_checkpoint(&p, &t.model, &TrainState::default(), Some(&cfg)).unwrap();
    (p, cfg)
}

#[test]
fn corrupt_and_truncated_checkpoints_are_refused() {
    let (dir, _, _) = fixture(16, 8);
    let (p, cfg) = saved(dir.path(), "snella8");
    let bytes = std::fs::read(&p).unwrap();
    let mut t = Trainer::new(cfg).unwrap();
    let bad = dir.path().join("bad.safetensors");
    // Truncated.
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_checkpoint(&bad, &mut t.model, None).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("truncated or corrupt"), "{e}");
    assert!(e.to_string().contains("bad.safetensors"), "{e}");
    // A flipped byte in the data.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 7] ^= 0x40;
    std::fs::write(&bad, &flipped).unwrap();
    let e = load_checkpoint(&bad, &mut t.model, None).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    // Not a safetensors file at all; an empty file; a missing file.
    std::fs::write(&bad, b"hello, this is not a checkpoint").unwrap();
    assert!(matches!(load_checkpoint(&bad, &mut t.model, None).unwrap_err(), Error::Format { .. }));
    std::fs::write(&bad, b"").unwrap();
    assert!(matches!(load_checkpoint(&bad, &mut t.model, None).unwrap_err(), Error::Format { .. }));
    let e = load_checkpoint(&dir.path().join("missing.safetensors"), &mut t.model, None).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    // A safetensors file that is not a checkpoint (exported weights).
    snella::model::load::write_safetensors(&bad, &random_backbone(&small_cfg(), 1)).unwrap();
    let e = load_checkpoint(&bad, &mut t.model, None).unwrap_err();
    assert!(e.to_string().contains("not a snella checkpoint"), "{e}");
    // The good file still loads.
    load_checkpoint(&p, &mut t.model, None).unwrap();
}

#[test]
fn checkpoint_of_another_method_or_recipe_is_refused() {
    let (dir, _, _) = fixture(16, 8);
    let (p, cfg) = saved(dir.path(), "snella8");
    let mut lora_cfg = cfg.clone();
    lora_cfg.method = "lora8".into();
    let mut lora = Trainer::new(lora_cfg).unwrap();
    let e = lora.resume_from(&p).unwrap_err().to_string();
    assert!(e.contains("snella8") && e.contains("lora8"), "{e}");
    let mut c = cfg.clone();
    c.method = "snell8".into();
    let e = load_checkpoint(&p, &mut Trainer::new(c).unwrap().model, None).unwrap_err().to_string();
    assert!(e.contains("snella8") && e.contains("snell8"), "{e}");
    // Same method, another recipe: the differing fields are named.
    let mut c = cfg.clone();
    c.lr = 5e-3;
    c.target_ratio = 0.9;
    let mut t = Trainer::new(c).unwrap();
    let e = t.resume_from(&p).unwrap_err().to_string();
    assert!(e.contains("lr") && e.contains("target_ratio"), "{e}");
    // Fields that do not change the numbers (output folder, threads, checkpoint interval) may differ.
    let mut c = cfg.clone();
    c.out_dir = dir.path().join("elsewhere");
    c.checkpoint_every = 7;
    Trainer::new(c).unwrap().resume_from(&p).unwrap();
    // Another model configuration (image size).
    let mut c = cfg.clone();
    c.image_size = 24;
    let mut t = Trainer::new(c).unwrap();
    let e = load_checkpoint(&p, &mut t.model, None).unwrap_err().to_string();
    assert!(e.contains("img_size"), "{e}");
}

fn no_temp_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "left behind in {}: {left:?}", dir.display());
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let (dir, weights, data) = fixture(16, 8);
    let t = Trainer::new(recipe(&weights, &data, &dir.path().join("o"), "snella8", 1)).unwrap();
    let st = TrainState::default();
    // Into a folder that does not exist.
    let e = save_checkpoint(&dir.path().join("nope/c.safetensors"), &t.model, &st, None).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("nope"), "{e}");
    assert!(!dir.path().join("nope").exists());
    // Below a regular file (not a folder).
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(save_checkpoint(&file.join("c.safetensors"), &t.model, &st, None).unwrap_err(), Error::Io { .. }));
    // Over an existing folder: the temporary is written, the rename fails, the temporary is removed.
    let target = dir.path().join("is-a-dir");
    std::fs::create_dir(&target).unwrap();
    let e = save_checkpoint(&target, &t.model, &st, None).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(target.is_dir());
    no_temp_files(dir.path());
    // A failed write keeps the previous file intact.
    let good = dir.path().join("c.safetensors");
    save_checkpoint(&good, &t.model, &st, None).unwrap();
    let before = std::fs::read(&good).unwrap();
    write_atomic(&dir.path().join("missing-dir/c.safetensors"), b"junk").unwrap_err();
    assert_eq!(std::fs::read(&good).unwrap(), before);
    no_temp_files(dir.path());
    no_temp_files(&dir.path().join("o"));
}

/// A checkpoint of an older build counts its epochs without carrying their metrics lines: the first line of
/// each counted epoch in metrics.jsonl (by its `epoch` stamp) is kept, whatever else the file holds, and the
/// run goes on from there with one line per epoch.
#[test]
fn a_checkpoint_without_metrics_lines_keeps_the_stamped_ones() {
    let (dir, weights, data) = fixture(16, 8);
    let out = dir.path().join("old");
    let cfg = recipe(&weights, &data, &out, "lora4", 2);
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.run(false).unwrap();
    let metrics = out.join("metrics.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&metrics).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 2);
    // As an older build left it: epoch 1 not counted, the file with a duplicate, a stray line and a torn one.
    let ck = out.join("checkpoint.safetensors");
    let old = TrainState { epoch: 1, metrics: Vec::new(), ..t.state.clone() };
    save_checkpoint(&ck, &t.model, &old, Some(&cfg)).unwrap();
    let mangled = format!("{}\n{}\n{}\nnot json\n{{\"epoch\":1,", lines[0], lines[0], lines[1]);
    std::fs::write(&metrics, mangled).unwrap();
    let mut r = Trainer::new(cfg).unwrap();
    r.resume_from(&ck).unwrap();
    r.run(false).unwrap();
    let now: Vec<String> = std::fs::read_to_string(&metrics).unwrap().lines().map(String::from).collect();
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], lines[0], "the counted epoch's line is kept byte for byte");
    assert!(now[1].starts_with("{\"epoch\":1,"), "{}", now[1]);
    assert_eq!(read_checkpoint_meta(&ck).unwrap().state.metrics, now, "the checkpoint now carries its lines");
}
