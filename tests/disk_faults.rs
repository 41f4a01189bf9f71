//! A full disk, a read-only folder and a folder that disappears: the run stops with an error that names the
//! file and the system's reason and says what the last good checkpoint holds; that checkpoint is intact, the
//! outputs still obey the rule of `train/checkpoint.rs`, no temporary is left, and once the fault is gone a
//! resume ends exactly as an uninterrupted run.
//!
//! ENOSPC and EACCES come from a fault-injecting writer (`snella::testing::FailWrites`: these tests run as any
//! user, root included, for whom a read-only folder is still writable); the vanished folder and a file size
//! limit (RLIMIT_FSIZE: EFBIG, the size-limited file of a small disk) are the system's own errors.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::process::Command;

use snella::testing::FailWrites;
use snella::train::checkpoint::read_checkpoint_meta;
use snella::train::trainer::Trainer;
use snella::Error;

/// SNELLA-8 for 2 epochs of 4 steps, a checkpoint every 2 steps.
fn config(weights: &Path, data: &Path, out: &Path) -> TrainConfig {
    let mut c = recipe(weights, data, out, "snella8", 2);
    c.checkpoint_every = 2;
    c
}

/// Every tensor of a checkpoint as raw bytes.
fn tensors(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect()
}

/// The metrics lines of a run folder without their time field.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// The checkpoint reads, `metrics.jsonl` starts with exactly the lines it counts, and no temporary is left.
/// Returns the checkpoint's global step.
fn assert_intact(out: &Path, what: &str) -> u64 {
    let meta = read_checkpoint_meta(&out.join("checkpoint.safetensors"))
        .unwrap_or_else(|e| panic!("{what}: the last good checkpoint does not read: {e}"));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let counted: String = meta.state.metrics.iter().map(|l| format!("{l}\n")).collect();
    assert!(text.starts_with(&counted), "{what}: metrics.jsonl lacks lines the checkpoint counts:\n{text}");
    let left: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{what}: temporaries left: {left:?}");
    meta.state.global_step
}

/// The error of a failed write: `Io` naming a file of the run folder, with the system's reason and the last
/// good checkpoint.
fn assert_clear(e: &Error, out: &Path, reason: &str, what: &str) {
    let msg = e.to_string();
    match e {
        Error::Io { path, .. } => assert!(path.starts_with(out), "{what}: names {}", path.display()),
        other => panic!("{what}: expected Error::Io, got {other}"),
    }
    assert!(msg.contains(reason), "{what}: {msg}");
    assert!(msg.contains("last good checkpoint") && msg.contains("intact"), "{what}: {msg}");
}

#[test]
fn a_full_disk_or_a_read_only_folder_keeps_the_last_good_checkpoint() {
    let (dir, weights, data) = fixture(32, 16);
    let reference = dir.path().join("reference");
    Trainer::new(config(&weights, &data, &reference)).unwrap().run(false).unwrap();
    let ck_size = std::fs::metadata(reference.join("checkpoint.safetensors")).unwrap().len();
    // Where the disk fills up: at once, inside the first checkpoint of the session, or later, among metrics
    // lines and checkpoints. The read-only folder refuses the first file the session opens for writing.
    let mut faults: Vec<(String, u64)> = [0, 1, 4096, ck_size / 2, ck_size - 1, ck_size + 700, 2 * ck_size + 3000]
        .iter()
        .map(|&b| (format!("ENOSPC after {b} bytes"), b))
        .collect();
    faults.push(("EACCES".into(), u64::MAX));
    for (what, budget) in faults {
        let out = dir.path().join(what.replace(' ', "-"));
        // Session 1 stops after 3 steps (a checkpoint at step 2); session 2 resumes on a failing disk.
        let mut c = config(&weights, &data, &out);
        c.max_steps = Some(3);
        Trainer::new(c.clone()).unwrap().run(false).unwrap();
        c.max_steps = None;
        let mut t = Trainer::new(c.clone()).unwrap();
        t.resume_from(&t.checkpoint_path()).unwrap();
        let e = {
            let _fault = if budget == u64::MAX {
                FailWrites::at_open(&out, libc::EACCES)
            } else {
                FailWrites::after_bytes(&out, libc::ENOSPC, budget)
            };
            t.run(false).unwrap_err()
        };
        let reason = if budget == u64::MAX { "Permission denied" } else { "No space left on device" };
        assert_clear(&e, &out, reason, &what);
        let step = assert_intact(&out, &what);
        assert!(step >= 2, "{what}: the checkpoint went back to step {step}");
        // Room again: the resumed run ends as if nothing had happened.
        let mut t = Trainer::new(c).unwrap();
        t.resume_from(&t.checkpoint_path()).unwrap();
        assert!(t.run(false).unwrap().completed);
        let (got, want) = (tensors(&t.checkpoint_path()), tensors(&reference.join("checkpoint.safetensors")));
        assert!(got == want, "{what}: the final checkpoint differs from the uninterrupted run");
        assert_eq!(metrics(&out), metrics(&reference), "{what}: metrics.jsonl");
    }
}

#[test]
fn an_output_folder_that_disappears_is_a_clear_error() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("gone");
    let mut t = Trainer::new(config(&weights, &data, &out)).unwrap();
    t.config.max_steps = Some(3);
    t.run(false).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    t.config.max_steps = None;
    let e = t.run(false).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Io { .. }) && msg.contains("No such file or directory"), "{msg}");
    assert!(msg.contains(&out.display().to_string()), "{msg}");
    assert!(msg.contains("there is no good checkpoint"), "it says the checkpoint went with the folder: {msg}");
}

/// The size-limited file of a small disk, without root: the binary runs under RLIMIT_FSIZE, so the kernel
/// refuses to grow a file past the limit (EFBIG; SIGXFSZ is ignored, so the write fails instead of killing).
#[test]
fn a_file_size_limit_stops_the_binary_with_one_line_and_the_checkpoint_intact() {
    let (dir, weights, data) = fixture(32, 16);
    let out = dir.path().join("limited");
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, config(&weights, &data, &out).to_toml().unwrap()).unwrap();
    let snella = |extra: &[&str], limit: Option<u64>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snella"));
        cmd.args(["train", recipe.to_str().unwrap(), "--quiet"]).args(extra);
        if let Some(limit) = limit {
            // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal) are made.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.output().unwrap()
    };
    let first = snella(&["--set", "max_steps=3"], None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let ck = out.join("checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let limited = snella(&["--resume"], Some(before.len() as u64 / 2));
    let err = String::from_utf8_lossy(&limited.stderr);
    let errors: Vec<&str> =
        err.lines().filter(|l| !l.starts_with("snella: resumed") && !l.contains(" on Cpu: ")).collect();
    assert_eq!(limited.status.code(), Some(2), "{err}");
    assert_eq!(errors.len(), 1, "one line: {err}");
    let line = errors[0];
    assert!(line.starts_with("snella: ") && line.contains("File too large"), "{line}");
    assert!(line.contains("checkpoint.safetensors") && line.contains("intact"), "{line}");
    assert_eq!(std::fs::read(&ck).unwrap(), before, "the last good checkpoint changed");
    assert_intact(&out, "RLIMIT_FSIZE");
    let done = snella(&["--resume"], None);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
}
