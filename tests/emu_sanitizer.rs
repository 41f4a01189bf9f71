//! The emulated CUDA device's sanitizers catch what they claim: one kernel with one planted bug per check
//! (`cuda/emu/planted_bugs.cu`), each of which must be reported naming the check, the kernel, the block, the
//! thread and (for memory) the address. A correct launch of the same kind passes, so the checks are not
//! simply failing everything.
use snella::testing::{launch_planted, PlantedArg::*};

fn error_of(kernel: &str, grid: u32, block: u32, shared: u32, args: &[snella::testing::PlantedArg]) -> String {
    match snella::cuda_emu_available() {
        Err(why) => panic!("this build has no emulated device: {why}"),
        Ok(()) => match launch_planted(kernel, (grid, 1, 1), (block, 1, 1), shared, args) {
            Ok(_) => panic!("{kernel}: the planted bug was not reported"),
            Err(e) => e.to_string(),
        },
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "the error does not name `{p}`:\n{err}");
    }
}

#[test]
fn a_correct_launch_passes() {
    let out = launch_planted("snella_bug_launch_target", (2, 1, 1), (32, 1, 1), 0, &[Floats(40), I32(40)]).unwrap();
    assert_eq!(out[0], vec![2.0; 40]);
}

#[test]
fn memcheck_reports_an_out_of_bounds_global_write() {
    // 64 threads over 40 elements: thread 8 of block 1 (i = 40) writes one past the end.
    let e = error_of("snella_bug_global_oob_write", 2, 32, 0, &[Floats(40), I32(40)]);
    assert_names(&e, &["memcheck", "snella_bug_global_oob_write", "block (1,0,0)", "thread (8,0,0)", "global write"]);
    assert_names(&e, &["device address 0x", "0 B past the end of argument 0 `out` (160 B"]);
}

#[test]
fn memcheck_reports_an_out_of_bounds_shared_read() {
    let e = error_of("snella_bug_shared_oob_read", 1, 32, 0, &[Floats(32)]);
    assert_names(&e, &["memcheck", "snella_bug_shared_oob_read", "block (0,0,0)", "thread (31,0,0)", "shared read"]);
    assert_names(&e, &["shared offset 0x", "0 B past the end of `s` (128 B)"]);
}

#[test]
fn racecheck_reports_a_missing_barrier() {
    // Thread 0 reads s[1] before thread 1 writes it, with no barrier between.
    let e = error_of("snella_bug_missing_barrier", 1, 64, 0, &[Floats(64)]);
    assert_names(&e, &["racecheck", "snella_bug_missing_barrier", "block (0,0,0)", "thread (1,0,0)"]);
    assert_names(&e, &["write-after-read", "`s`+4", "shared offset 0x", "thread (0,0,0) touched"]);
}

#[test]
fn synccheck_reports_a_full_mask_shuffle_after_an_early_return() {
    let e = error_of("snella_bug_shuffle_after_return", 1, 32, 0, &[Floats(32)]);
    assert_names(&e, &["synccheck", "snella_bug_shuffle_after_return", "block (0,0,0)", "thread (16,0,0)"]);
    assert_names(&e, &["lane 16 of warp 0 ends", "__shfl_xor_sync (planted_bugs.cu:", "mask 0xffffffff"]);
}

#[test]
fn synccheck_reports_a_barrier_in_divergent_code() {
    let e = error_of("snella_bug_divergent_barrier", 1, 64, 0, &[Floats(64)]);
    assert_names(&e, &["synccheck", "snella_bug_divergent_barrier", "block (0,0,0)", "divergent __syncthreads"]);
    assert_names(&e, &["threads 0-31 wait at __syncthreads (planted_bugs.cu:", "threads 32-63 wait at __syncthreads"]);
}

#[test]
fn launch_check_reports_geometry_beyond_sm90() {
    let e = error_of("snella_bug_launch_target", 1, 2048, 0, &[Floats(4), I32(4)]);
    assert_names(&e, &["snella_bug_launch_target", "launch check", "beyond sm_90's limits", "2048 threads"]);
    let e = error_of("snella_bug_launch_target", 1, 32, 64 << 10, &[Floats(4), I32(4)]);
    assert_names(&e, &["launch check", "65536 B dynamic shared memory (at most 49152)"]);
}

#[test]
fn launch_check_reports_unknown_kernels_and_wrong_arguments() {
    let e = error_of("snella_no_such_kernel", 1, 32, 0, &[Floats(4)]);
    assert_names(&e, &["snella_no_such_kernel", "launch check: no kernel of that name"]);
    // An f32 where the kernel takes an int: the argument list does not match the C signature.
    let e = error_of("snella_bug_launch_target", 1, 32, 0, &[Floats(4), F32(4.0)]);
    assert_names(&e, &["snella_bug_launch_target", "launch check", "[Ptr, F32]", "float* out, int n"]);
    let e = error_of("snella_bug_launch_target", 1, 32, 0, &[Floats(4)]);
    assert_names(&e, &["launch check", "[Ptr]"]);
}
