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
