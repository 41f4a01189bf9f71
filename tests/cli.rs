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
fn selftest_without_gpu_is_a_one_line_error() {
    if snella::runtime::Cuda::probe().is_ok() {
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
