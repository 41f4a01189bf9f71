//! The command line as users run it: `snella train` a recipe with overrides, `--resume` after a stop,
//! `snella eval` and `snella export` of the checkpoint, and bad input failing with one line and no output.
mod common;
use common::*;
use std::process::{Command, Output};

fn snella(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snella")).args(args).output().expect("run the snella binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn train_resume_eval_export() {
    let (dir, weights, data) = fixture(48, 20);
    let out = dir.path().join("run");
    let path = dir.path().join("r.toml");
    std::fs::write(&path, recipe(&weights, &data, &out, "snella8", 2).to_toml().unwrap()).unwrap();
    let r = path.to_str().unwrap();
    // Stop after 4 of 12 steps (as if killed), then resume to the end.
    let first = snella(&["train", r, "--quiet", "--set", "max_steps=4"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let resumed = snella(&["train", r, "--quiet", "--resume", "--export"]);
    let stdout = text(&resumed.stdout);
    assert!(resumed.status.success(), "{}{stdout}", text(&resumed.stderr));
    assert!(text(&resumed.stderr).contains("resumed from"), "{}", text(&resumed.stderr));
    assert!(stdout.contains("\"completed\": true") && out.join("export/merged.safetensors").exists(), "{stdout}");
    let ck = out.join("checkpoint.safetensors");
    let ev = snella(&["eval", "--checkpoint", ck.to_str().unwrap()]);
    assert!(ev.status.success() && text(&ev.stdout).contains("top-1"), "{}", text(&ev.stderr));
    let ex_dir = dir.path().join("exported");
    let ex = snella(&["export", "--checkpoint", ck.to_str().unwrap(), "--out", ex_dir.to_str().unwrap()]);
    assert!(ex.status.success(), "{}", text(&ex.stderr));
    assert!(ex_dir.join("merged.safetensors").exists());
}

#[test]
fn bad_training_input_is_one_line_and_leaves_no_output() {
    let (dir, weights, data) = fixture(16, 8);
    let out = dir.path().join("never");
    let base = ["train", "--quiet", "--set"];
    let w = format!("weights={}", weights.display());
    let d = format!("data={}", data.display());
    let o = format!("out_dir={}", out.display());
    for (extra, needle) in [
        (vec!["lr=-1"], "lr"),
        (vec!["batch=0"], "batch"),
        (vec!["method=adapter"], "adapter"),
        (vec!["data=/no/such/folder"], "/no/such/folder"),
        (vec!["weights=/no/such.safetensors"], "/no/such.safetensors"),
        (vec!["device=cuda"], "CUDA"),
        (vec!["lr"], "KEY=VALUE"),
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["model=infer", "--set", "num_heads=2", "--set", "image_size=16", "--set", "data_format=idx"]);
        args.extend(["--set", &w, "--set", &d, "--set", &o]);
        for e in &extra {
            args.extend(["--set", e]);
        }
        let r = snella(&args);
        let err = text(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out.join("checkpoint.safetensors").exists(), "{extra:?} left a checkpoint");
    }
    let bad = dir.path().join("garbage.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let r = snella(&["eval", "--checkpoint", bad.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r.stderr).contains("garbage.safetensors"), "{}", text(&r.stderr));
}
