//! The fuzz targets (`fuzz/`, cargo-fuzz on nightly) replayed on stable: every seed of the starting corpus is
//! accepted, and every input that once crashed a target (`fuzz/regressions/<target>/`) is now answered with
//! an error or a success, never a panic. `cargo test --release --test fuzz_corpus write_seeds -- --ignored`
//! writes the seeds into `fuzz/corpus/<target>/` (or `$SNELLA_FUZZ_CORPUS/<target>/`) before a fuzz run.
use std::path::{Path, PathBuf};

use snella::fuzz::{run, seeds, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_target_accepts_its_seeds() {
    let seeds = seeds().unwrap();
    for target in TARGETS {
        assert!(seeds.iter().any(|s| s.0 == target), "no seed for {target}");
    }
    for (target, name, bytes) in &seeds {
        if let Err(e) = run(target, bytes) {
            panic!("{target}: seed '{name}' is refused: {e}");
        }
    }
    snella::fuzz::cleanup();
}

#[test]
fn crashing_inputs_stay_fixed() {
    let dir = fuzz_dir().join("regressions");
    let mut replayed = 0;
    for target in TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            // Any answer but a panic: the test harness reports a panic with the file's name below.
            println!("{}: {:?}", p.display(), run(target, &bytes).err().map(|e| e.to_string()));
            replayed += 1;
        }
    }
    println!("{replayed} crashing inputs replayed");
    assert!(replayed > 0, "no crashing input under {}", dir.display());
    snella::fuzz::cleanup();
}

#[test]
#[ignore]
fn write_seeds() {
    let root = std::env::var_os("SNELLA_FUZZ_CORPUS").map(PathBuf::from).unwrap_or_else(|| fuzz_dir().join("corpus"));
    for (target, name, bytes) in seeds().unwrap() {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
    }
    snella::fuzz::cleanup();
}
