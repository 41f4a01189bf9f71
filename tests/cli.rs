//! The `snella` binary as a user meets it: exit codes, one-line errors, no panics.
use std::process::{Command, Output};

fn snella(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snella")).args(args).output().expect("run the snella binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn info_exits_zero_and_reports_kernels_and_probe() {
    let out = snella(&["info"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "snella info failed: {stdout}{}", text(&out.stderr));
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
    assert!(stdout.contains("CUDA kernels compiled in:"), "{stdout}");
    assert!(stdout.contains("CUDA probe:"), "{stdout}");
}

#[test]
fn info_json_says_the_same_as_the_library() {
    let out = snella(&["info", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snella info --json prints one JSON object");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["kernels_compiled"], snella::KERNELS_COMPILED);
    assert_eq!(v["cuda"]["available"], snella::cuda_available().is_ok());
    assert_eq!(v["cuda_emu"]["available"], snella::cuda_emu_available().is_ok());
    let devices: Vec<&str> = v["devices"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(devices[0], "cpu");
    assert_eq!(devices.contains(&"cuda-emu"), snella::cuda_emu_available().is_ok());
    assert!(["cpu", "cuda"].contains(&v["auto_device"].as_str().unwrap()));
}

#[test]
fn selftest_without_gpu_is_a_one_line_error() {
    if snella::cuda_available().is_ok() {
        println!("skipping: this machine has a GPU (the selftest itself runs in tests/cuda_vs_cpu.rs)");
        return;
    }
    for args in [&["selftest", "--device", "cuda"][..], &["selftest"][..]] {
        let out = snella(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no CUDA device"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        assert!(stderr.starts_with("snella: "), "{args:?}: {stderr}");
    }
}

#[test]
fn bad_option_is_a_usage_error() {
    let out = snella(&["selftest", "--no-such-option"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error:") && stderr.contains("--no-such-option"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = snella(&["selftest", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid value"), "{}", text(&out.stderr));
}

#[test]
fn selftest_list_needs_no_gpu() {
    let out = snella(&["selftest", "--list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("matmul_nn") && stdout.contains("attention_backward"), "{stdout}");
}

#[test]
fn closed_stdout_does_not_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_snella"))
        .args(["selftest", "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, as with `| head -0`
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn memory_prints_the_plan_beside_the_paper_and_writes_every_format() {
    let dir = std::env::temp_dir().join(format!("snella-cli-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, csv, svg) = (dir.join("m.json"), dir.join("m.csv"), dir.join("m.svg"));
    let out = snella(&[
        "memory",
        "--models",
        "vit_b16",
        "--methods",
        "lora8,gps,snell32,snella32",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("planned bytes") && stdout.contains("1673") && stdout.contains("2428"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 8, "4 methods x 2 recompute levels");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 9);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("</svg>"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_rejects_bad_options_with_one_line_and_no_output_file() {
    let dir = std::env::temp_dir().join(format!("snella-cli-memory-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("never.json");
    for (args, needle) in [
        (vec!["memory", "--precision", "fp8"], "--precision"),
        (vec!["memory", "--methods", "adapter"], "adapter"),
        (vec!["memory", "--models", "vit_x"], "vit_x"),
        (vec!["memory", "--batch", "0"], "--batch"),
        (vec!["memory", "--resolution", "225"], "patch"),
        (vec!["memory", "--measure"], "no CUDA device"),
    ] {
        let mut args = args;
        args.extend(["--json", json.to_str().unwrap()]);
        let out = snella(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!json.exists(), "{args:?} left an output file");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
