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
    let resumed = snella(&["train", r, "--resume", "--export"]); // not --quiet: the notes are printed
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

/// Malformed arguments of every kind: `--set` with bad keys and values, missing files, folders where files are
/// expected (and the reverse), empty files. Each is exit code 2 and exactly one line, `snella: ...`, naming
/// what is wrong; nothing panics and nothing is written into the run folder.
#[test]
fn malformed_arguments_are_one_line_and_exit_2() {
    let (dir, weights, data) = fixture(16, 8);
    let d = dir.path();
    let out = d.join("never");
    let good = d.join("good.toml");
    std::fs::write(&good, recipe(&weights, &data, &out, "snella8", 1).to_toml().unwrap()).unwrap();
    let (empty, folder, file) = (d.join("empty"), d.join("a-folder"), d.join("a-file"));
    std::fs::write(&empty, b"").unwrap();
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(&file, b"x").unwrap();
    let empty_idx = d.join("empty-idx");
    std::fs::create_dir(&empty_idx).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        std::fs::write(empty_idx.join(f), b"").unwrap();
    }
    let empty_png = d.join("empty-png");
    for split in ["train", "test"] {
        std::fs::create_dir_all(empty_png.join(split).join("cat")).unwrap();
        std::fs::write(empty_png.join(split).join("cat/0.png"), b"").unwrap();
    }
    let p = |p: &Path| p.display().to_string();
    let g = p(&good);
    let set = |kv: String| vec!["train".to_string(), g.clone(), "--quiet".into(), "--set".into(), kv];
    let mut cases: Vec<(Vec<String>, String)> = vec![
        (set("no_such_key=1".into()), "no_such_key".into()),
        (set("=5".into()), "--set".into()),
        (set("lr".into()), "KEY=VALUE".into()),
        (set("lr=".into()), "lr".into()),
        (set("lr=fast".into()), "lr".into()),
        (set("lr=nan".into()), "lr".into()),
        (set("batch=-1".into()), "batch".into()),
        (set("batch=1e99".into()), "batch".into()),
        (set("epochs=99999999999999999999999".into()), "epochs".into()),
        (set("image_size=0".into()), "image_size".into()),
        (set("image_size=17".into()), "image size (17, 17)".into()),
        (set("method=".into()), "method".into()),
        (set("rank=100000".into()), "rank".into()),
        (set("seed=-1".into()), "seed".into()),
        (set("device=\u{1F642}".into()), "device".into()),
        (set("out_dir=".into()), "out_dir".into()),
        (set(format!("weights={}", p(&folder))), "weights".into()),
        (set(format!("weights={}", p(&empty))), p(&empty)),
        (set(format!("data={}", p(&file))), "data".into()),
        (set(format!("data={}", p(&empty_idx))), "idx".into()),
        (
            {
                // Found when the first batch is decoded, after the run started (in a folder of its own).
                let mut a = set(format!("data={}", p(&empty_png)));
                a.extend([
                    "--set".into(),
                    "data_format=folder".into(),
                    "--set".into(),
                    format!("out_dir={}", p(&d.join("png"))),
                ]);
                a
            },
            "0.png".into(),
        ),
        (set(format!("out_dir={}", p(&file))), p(&file)),
        (set(format!("out_dir={}/sub", p(&file))), p(&file)),
        (vec!["train".into(), p(&d.join("missing.toml"))], "missing.toml".into()),
        (vec!["train".into(), p(&folder)], p(&folder)),
        (vec!["train".into(), p(&empty)], "data".into()),
        (vec!["train".into(), g.clone(), "--resume".into()], "checkpoint.safetensors".into()),
        (vec!["train".into(), g.clone(), "--resume-from".into(), p(&folder)], p(&folder)),
        (vec!["train".into(), g.clone(), "--resume-from".into(), p(&empty)], p(&empty)),
        (vec!["eval".into(), "--checkpoint".into(), p(&d.join("missing.safetensors"))], "missing.safetensors".into()),
        (vec!["eval".into(), "--checkpoint".into(), p(&folder)], p(&folder)),
        (vec!["eval".into(), "--checkpoint".into(), p(&empty)], p(&empty)),
        (vec!["export".into(), "--checkpoint".into(), p(&empty), "--out".into(), p(&folder)], p(&empty)),
        (vec!["memory".into(), "--models".into(), "".into()], "model".into()),
        (vec!["memory".into(), "--json".into(), p(&folder)], p(&folder)),
        (vec!["bench".into(), "--batch".into(), "0".into()], "--batch".into()),
    ];
    // A finished checkpoint, exported into a file instead of a folder.
    let ck_out = d.join("run");
    let c = recipe(&weights, &data, &ck_out, "lora4", 1);
    snella::train::trainer::Trainer::new(c).unwrap().run(false).unwrap();
    let ck = p(&ck_out.join("checkpoint.safetensors"));
    cases.push((vec!["export".into(), "--checkpoint".into(), ck.clone(), "--out".into(), p(&file)], p(&file)));
    cases.push((vec!["eval".into(), "--checkpoint".into(), ck, "--set".into(), "data=".into()], "data".into()));
    let mut wrong = Vec::new();
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = snella(&args);
        let err = text(&r.stderr);
        let one_line = err.lines().count() == 1 && err.starts_with("snella: ") && !err.contains("panicked");
        let wrote = std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_some());
        if r.status.code() != Some(2) || !one_line || !err.contains(&needle) || wrote {
            wrong.push(format!("{args:?}: exit {:?}, should name {needle:?}: {err}", r.status.code()));
        }
    }
    assert!(wrong.is_empty(), "{} of the malformed invocations:\n{}", wrong.len(), wrong.join("\n"));
}
