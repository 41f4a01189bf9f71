//! The pictures of a run: the curves and (SNELL/SNELLA) the allocation map are drawn into the run folder after
//! every evaluated epoch, redrawn from the counted metrics at the start of every session (a fresh run clears an
//! earlier run's), a picture that cannot be written does not stop the run, and `snella plot` redraws them from
//! `metrics.jsonl`.
mod common;
use common::*;

use std::process::{Command, Output};

use snella::testing::FailWrites;
use snella::train::pictures::{redraw, PICTURE_FILES};
use snella::train::trainer::Trainer;

fn snella(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snella")).args(args).output().expect("run the snella binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The picture files present in `dir`.
fn pictures(dir: &Path) -> Vec<&'static str> {
    PICTURE_FILES.into_iter().filter(|f| dir.join(f).exists()).collect()
}

/// The PNG's size, and whether it has more than a few colours (something was drawn).
fn png_size(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 20, "{}: only {} colours", p.display(), colours.len());
    img.dimensions()
}

#[test]
fn pictures_follow_the_evaluations_and_the_checkpoint() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("run");
    // 3 epochs of 4 steps, evaluated at epochs 2 and 3 only.
    let mut c = recipe(&weights, &data, &out, "snella8", 3);
    c.eval_every = 2;
    // Session 1: epoch 1 (not evaluated) and one step of epoch 2: nothing to draw yet.
    c.max_steps = Some(5);
    let s = Trainer::new(c.clone()).unwrap().run(false).unwrap();
    assert!(!s.completed && s.pictures_failed.is_none());
    assert!(pictures(&out).is_empty(), "drawn before an evaluation: {:?}", pictures(&out));
    // Session 2 starts by drawing the counted epoch, then draws again after each evaluation.
    c.max_steps = None;
    let mut t = Trainer::new(c.clone()).unwrap();
    t.resume_from(&t.checkpoint_path()).unwrap();
    let s = t.run(false).unwrap();
    assert!(s.completed && s.pictures_failed.is_none(), "{s:?}");
    assert_eq!(pictures(&out), PICTURE_FILES);
    let (w, h) = png_size(&out.join("curves.png"));
    assert!(w > 1000 && h > 300, "{w}x{h}");
    let (_, h) = png_size(&out.join("allocation.png"));
    assert!(h >= 12 * 13, "a row per branch: {h}");
    let svg = std::fs::read_to_string(out.join("allocation.svg")).unwrap();
    assert!(svg.contains("snella8: kept fraction per branch") && svg.contains("1 fc2"), "labels");
    let curves = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    for label in ["loss (cross-entropy)", "top-1 accuracy", "learning rate", "epoch", "train", "test"] {
        assert!(curves.contains(label), "the curves lack '{label}'");
    }
    // A fresh LoRA run in the same folder clears them, and draws curves only.
    let mut lora = recipe(&weights, &data, &out, "lora4", 1);
    lora.max_steps = Some(1);
    Trainer::new(lora.clone()).unwrap().run(false).unwrap();
    assert!(pictures(&out).is_empty(), "an earlier run's pictures were left: {:?}", pictures(&out));
    lora.max_steps = None;
    let mut t = Trainer::new(lora).unwrap();
    t.resume_from(&t.checkpoint_path()).unwrap();
    t.run(false).unwrap();
    assert_eq!(pictures(&out), ["curves.png", "curves.svg"]);
}

#[test]
fn a_picture_that_cannot_be_written_does_not_stop_the_run() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("run");
    let c = recipe(&weights, &data, &out, "snella8", 2);
    let mut t = Trainer::new(c).unwrap();
    // Every write of curves.png (its temporary) fails as a full disk would; everything else is written.
    let tmp = out.join(format!(".curves.png.tmp-{}", std::process::id()));
    let s = {
        let _fault = FailWrites::at_open(&tmp, libc::ENOSPC);
        t.run(false).unwrap()
    };
    assert!(s.completed && s.epochs_done == 2, "{s:?}");
    let why = s.pictures_failed.expect("the failure is reported");
    assert!(why.contains("curves.png") && why.contains("No space left") && why.contains("snella plot"), "{why}");
    assert!(!tmp.exists() && !out.join("curves.png").exists());
    // Nothing was lost: the pictures are drawn again from metrics.jsonl.
    let written = redraw(&out.join("metrics.jsonl"), &out, "snella8").unwrap();
    assert_eq!(written.len(), 4);
    assert_eq!(pictures(&out), PICTURE_FILES);
}

#[test]
fn snella_plot_redraws_a_run_from_its_metrics() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("run");
    let r = dir.path().join("r.toml");
    std::fs::write(&r, recipe(&weights, &data, &out, "snella8", 2).to_toml().unwrap()).unwrap();
    let trained = snella(&["train", r.to_str().unwrap(), "--quiet"]);
    assert!(trained.status.success(), "{}", text(&trained.stderr));
    // A copy of the metrics alone (no checkpoint) plots too, into another folder.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(out.join("metrics.jsonl"), copy.join("metrics.jsonl")).unwrap();
    let pics = dir.path().join("pics");
    let p = snella(&["plot", copy.to_str().unwrap(), "--out", pics.to_str().unwrap()]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    assert_eq!(text(&p.stdout).lines().filter(|l| l.starts_with("wrote ")).count(), 4, "{}", text(&p.stdout));
    assert_eq!(pictures(&pics), PICTURE_FILES);
    // The run's own folder: the same pictures the trainer drew (the title is the checkpoint's method).
    let before = std::fs::read(out.join("allocation.svg")).unwrap();
    std::fs::remove_file(out.join("allocation.svg")).unwrap();
    let p = snella(&["plot", out.to_str().unwrap()]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    assert_eq!(std::fs::read(out.join("allocation.svg")).unwrap(), before);
    // A torn last line (a kill mid-append) and a folder that is no run are one line naming the file.
    let mut metrics = std::fs::read_to_string(copy.join("metrics.jsonl")).unwrap();
    metrics.push_str("{\"epoch\": 2, \"lr\"");
    std::fs::write(copy.join("metrics.jsonl"), metrics).unwrap();
    for (dir, needle) in [(copy.as_path(), "line 3 is not a metrics line"), (pics.as_path(), "holds no metrics.jsonl")]
    {
        let p = snella(&["plot", dir.to_str().unwrap()]);
        let err = text(&p.stderr);
        assert_eq!(p.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle) && err.contains(dir.to_str().unwrap()), "{err}");
    }
}
