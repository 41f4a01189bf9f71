//! The CUDA-vs-CPU suite (`snella::selftest`) as a test: on a GPU machine every check must pass; without
//! a GPU it prints why it is skipped and passes. The dry run (CPU on both sides) runs everywhere and
//! proves the checks themselves work: every plan builds, every output gets written, nothing panics.

#[test]
fn cuda_matches_cpu_on_every_check() {
    match snella::cuda_available() {
        Err(why) => println!("skipping: {why}"),
        Ok(_) => {
            let ok = snella::selftest::run_all(snella::Device::Cuda, None).expect("selftest could not run on the GPU");
            assert!(ok, "some CUDA kernels differ from the CPU reference (see the FAIL lines above)");
        }
    }
}

#[test]
fn every_check_runs_on_the_cpu_twin() {
    let ok = snella::selftest::dry_run(None).expect("dry run");
    assert!(ok, "a check fails with the CPU on both sides: the check itself is broken (see the FAIL lines above)");
}

/// A test binary built before `scripts/install-nvcc.sh` ran has no CUDA kernels; build.rs reruns once nvcc
/// arrives in .tools (or $NVCC is set). If nvcc is installed and the kernels are still missing, say so loudly.
#[test]
fn the_kernels_are_compiled_when_nvcc_is_installed() {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/nvcc/nvidia/cu13/bin/nvcc");
    let nvcc = std::env::var_os("NVCC").map(std::path::PathBuf::from).filter(|p| p.exists());
    match nvcc.or_else(|| tools.exists().then_some(tools)) {
        Some(n) if !snella::KERNELS_COMPILED => {
            panic!(
                "nvcc is installed at {} but this build has no CUDA kernels: rebuild (cargo clean -p snella)",
                n.display()
            )
        }
        Some(n) => println!("nvcc at {}: the kernels are compiled in", n.display()),
        None => println!("no nvcc installed (run scripts/install-nvcc.sh): nothing to check"),
    }
}
