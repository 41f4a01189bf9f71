//! `snella selftest`: every CUDA kernel against its CPU reference, on fresh random inputs.
//!
//! Each `Check` builds a small `Plan` (or a few), makes two runtimes from it (the CPU reference and the device
//! under test, together a `Twin`), uploads the same random inputs to both, poisons every output on both
//! sides (`0xFF` bytes, a NaN, so an output the kernel forgets to write fails), runs the op on both and
//! compares each output by `max |dev − cpu| / max |cpu|`. A NaN or infinity on either side fails the check.
//! Sizes are odd (not multiples of 32) and larger than one thread block, so tails and multi-block grids run.
//!
//! Inputs are fresh each run: every check draws its own seed from the clock and prints it, and
//! `snella selftest --filter NAME --seed SEED` replays exactly that check.
//!
//! # Where the checks live
//! This file holds the registry (`checks`), the runner and the harness every check works with (`Case`,
//! `Twin`, the seeded random source). The checks themselves live in one file per op family, named like the
//! files of `src/ops/`: `matmul.rs`, `layernorm.rs`, `gelu.rs`, `softmax.rs`, `add.rs`, `loss.rs`,
//! `adamw.rs`, `attention.rs`, `embed.rs`, `importance.rs`, `mask.rs`, `kmerge.rs`, `sparsify.rs`,
//! `dropout.rs`, `convert.rs`; `model.rs` holds the whole training steps of the golden cases. The
//! selftest is where CUDA is compared with the CPU: an op's own tests (in `src/ops/`) test the CPU alone.
//!
//! # Adding a check
//! Write a `pub(super) fn my_op(cx: &mut Case) -> Result<()>` in the file of its op family (the file named
//! like the op's file in `src/ops/`; a new op family gets a new file here and a `mod` line below), in this
//! order:
//! ```text
//! pub(super) fn my_op(cx: &mut Case) -> Result<()> {
//!     let mut p = Plan::new();
//!     let x = p.f32("x", &[37, 769], Pool::Activations);       // inputs and outputs, named: the names
//!     let y = p.f32("y", &[37, 769], Pool::Activations);       // appear in the report
//!     let tw = cx.twin(p)?;                                   // CPU runtime + device runtime
//!     cx.input(&tw, x, 1.0)?;                                 // same N(0, 1) values on both sides
//!     tw.poison(&[y])?;                                       // outputs the op only writes
//!     tw.run(|rt| ops::my_op(rt, y, x))?;                     // CPU first, then the device
//!     cx.compare(&tw, y)                                      // one entry per output
//! }
//! ```
//! and add one line to `checks` in this file: `Check { name: "my_op", tol: 1e-5, run: family::my_op }`.
//! The tolerance applies to every output; one output that needs another (a scalar summed over many
//! entries) is compared with `Case::compare_tol`; a tolerance of 0 demands bit-exact results. Outputs the
//! op accumulates into (`+=`) get random inputs instead of poison. To test one op in isolation from the
//! ones before it, compute its inputs on the CPU and copy them across with `Twin::copy_to_dev`.
//! A check whose shapes or options vary takes a non-capturing closure:
//! `run: |cx| family::my_op_with(cx, true)`.
//!
//! bf16 tensors (`p.add(name, shape, DType::BF16, pool)`) work with the same helpers: `Case::input` and
//! `Twin::upload` take f32 values and round them to nearest even on the host (the same bits on both
//! sides), comparisons download them widened to f32 (exact), and poison (0xFFFF) is a bf16 NaN.
//! `Case::compare_bits` demands identical bit patterns, where a tolerance of 0 would let −0 pass for +0.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::Recompute;
use crate::ops::kmerge::KernelKind;
use crate::rng::{splitmix64, unit_f64, SplitMix64, GOLDEN_GAMMA};
use crate::runtime::cuda::launch_counts;
use crate::runtime::GemmPrecision;
use crate::runtime::{Backend, Cuda, DType, Device, Plan, Runtime, Tensor};

mod adamw;
mod add;
mod attention;
mod convert;
mod dropout;
mod embed;
mod gelu;
mod importance;
mod kmerge;
mod layernorm;
mod loss;
mod mask;
mod matmul;
mod model;
mod softmax;
mod sparsify;

/// One comparison of an op (or a small group of its variants) between the CPU and the device.
pub(crate) struct Check {
    /// Unique name; `--filter` matches a substring of it.
    pub(crate) name: &'static str,
    /// Largest allowed `max |dev − cpu| / max |cpu|` of each output (unless `Case::compare_tol`
    /// gives that output its own); 0 means bit-exact.
    pub(crate) tol: f64,
    pub(crate) run: fn(&mut Case) -> Result<()>,
}

/// The registry: one entry per op variant, each run by a function of its op family's file. Add new checks
/// here (see the module docs).
#[rustfmt::skip]
pub(crate) fn checks() -> Vec<Check> {
    use GemmPrecision::{Bf16, Fp32, Tf32};
    use matmul::ALL_TRANSPOSES;
    vec![
        Check { name: "matmul_nn", tol: 1e-5, run: |cx| matmul::variants(cx, &[(false, false)], Fp32) },
        Check { name: "matmul_tn", tol: 1e-5, run: |cx| matmul::variants(cx, &[(true, false)], Fp32) },
        Check { name: "matmul_nt", tol: 1e-5, run: |cx| matmul::variants(cx, &[(false, true)], Fp32) },
        Check { name: "matmul_tt", tol: 1e-5, run: |cx| matmul::variants(cx, &[(true, true)], Fp32) },
        Check { name: "matmul_broadcast_b", tol: 1e-5, run: matmul::broadcast_b },
        Check { name: "matmul_strided", tol: 1e-5, run: matmul::strided },
        // TF32 rounds the inputs to 10 mantissa bits, bf16 to 7: about 5e-4 and 2e-3 of max |C| here.
        Check { name: "matmul_tf32", tol: 1e-2, run: |cx| matmul::variants(cx, &ALL_TRANSPOSES, Tf32) },
        Check { name: "matmul_bf16", tol: 1e-2, run: |cx| matmul::variants(cx, &ALL_TRANSPOSES, Bf16) },
        Check { name: "layernorm_forward", tol: 1e-5, run: layernorm::forward },
        Check { name: "layernorm_apply", tol: 1e-6, run: layernorm::apply },
        Check { name: "layernorm_backward", tol: 1e-5, run: |cx| layernorm::backward(cx, true) },
        Check { name: "layernorm_backward_no_affine", tol: 1e-5, run: |cx| layernorm::backward(cx, false) },
        Check { name: "gelu_forward", tol: 1e-5, run: gelu::forward },
        Check { name: "gelu_backward", tol: 1e-5, run: |cx| gelu::backward(cx, false) },
        Check { name: "gelu_backward_inplace", tol: 1e-5, run: |cx| gelu::backward(cx, true) },
        Check { name: "softmax_forward", tol: 1e-5, run: |cx| softmax::forward(cx, false) },
        Check { name: "softmax_forward_inplace", tol: 1e-5, run: |cx| softmax::forward(cx, true) },
        Check { name: "softmax_backward", tol: 1e-5, run: |cx| softmax::backward(cx, false) },
        Check { name: "softmax_backward_inplace", tol: 1e-5, run: |cx| softmax::backward(cx, true) },
        Check { name: "add_bias", tol: 1e-6, run: add::add_bias },
        Check { name: "bias_backward", tol: 0.0, run: add::bias_backward },
        Check { name: "axpy", tol: 1e-6, run: add::axpy },
        Check { name: "mul_cols", tol: 1e-6, run: |cx| add::mul_cols(cx, false) },
        Check { name: "mul_cols_accumulate", tol: 1e-6, run: |cx| add::mul_cols(cx, true) },
        Check { name: "mul_cols_backward_gamma", tol: 0.0, run: add::mul_cols_backward_gamma },
        Check { name: "scale_copy", tol: 1e-6, run: add::scale_copy },
        Check { name: "cross_entropy", tol: 1e-5, run: |cx| loss::cross_entropy(cx, true) },
        Check { name: "cross_entropy_loss_only", tol: 1e-5, run: |cx| loss::cross_entropy(cx, false) },
        // Labels outside 0..V: NaN rows on both devices (exactly), the other rows as above.
        Check { name: "cross_entropy_bad_labels", tol: 1e-5, run: loss::cross_entropy_bad_labels },
        Check { name: "adamw_3_steps", tol: 1e-5, run: adamw::three_steps },
        Check { name: "permute_heads_to_heads", tol: 0.0, run: attention::permute_to_heads },
        Check { name: "permute_heads_from_heads", tol: 0.0, run: |cx| attention::permute_from_heads(cx, false) },
        Check { name: "permute_heads_from_heads_strided", tol: 0.0, run: |cx| attention::permute_from_heads(cx, true) },
        Check { name: "attention_forward", tol: 1e-5, run: attention::forward },
        // A chain of four products and a softmax backward: a little more rounding than one op.
        Check { name: "attention_backward", tol: 1e-4, run: attention::backward },
        Check { name: "patchify", tol: 0.0, run: embed::patchify },
        Check { name: "embed_forward", tol: 0.0, run: embed::forward },
        Check { name: "embed_backward", tol: 1e-6, run: |cx| embed::backward(cx, true) },
        Check { name: "embed_backward_pos_only", tol: 1e-6, run: |cx| embed::backward(cx, false) },
        Check { name: "cls_gather", tol: 0.0, run: |cx| embed::cls_rows(cx, false) },
        Check { name: "cls_scatter", tol: 0.0, run: |cx| embed::cls_rows(cx, true) },
        Check { name: "importance_update_3_steps", tol: 1e-6, run: importance::three_steps },
        Check { name: "mask_grad", tol: 0.0, run: mask::mask_grad },
        // SNELLA: the kernelized merge, per kernel, with and without the mixture, on every shape of
        // kmerge::MERGE_SHAPES (d = 1, a single row and a single column among them); the backward also checks
        // both devices' dα, dγ, dβ against the f64 closed form.
        Check { name: "merge_forward_piecewise_linear", tol: 1e-5, run: |cx| kmerge::forward(cx, KernelKind::PiecewiseLinear) },
        Check { name: "merge_forward_linear", tol: 1e-5, run: |cx| kmerge::forward(cx, KernelKind::Linear) },
        Check { name: "merge_forward_rbf", tol: 1e-5, run: |cx| kmerge::forward(cx, KernelKind::Rbf) },
        Check { name: "merge_forward_sigmoid", tol: 1e-5, run: |cx| kmerge::forward(cx, KernelKind::Sigmoid) },
        Check { name: "merge_forward_poly", tol: 1e-5, run: |cx| kmerge::forward(cx, KernelKind::Poly) },
        Check { name: "merge_backward_piecewise_linear", tol: 1e-5, run: |cx| kmerge::backward(cx, KernelKind::PiecewiseLinear) },
        Check { name: "merge_backward_linear", tol: 1e-5, run: |cx| kmerge::backward(cx, KernelKind::Linear) },
        Check { name: "merge_backward_rbf", tol: 1e-5, run: |cx| kmerge::backward(cx, KernelKind::Rbf) },
        Check { name: "merge_backward_sigmoid", tol: 1e-5, run: |cx| kmerge::backward(cx, KernelKind::Sigmoid) },
        Check { name: "merge_backward_poly", tol: 1e-5, run: |cx| kmerge::backward(cx, KernelKind::Poly) },
        Check { name: "merge_backward_coincident_rows", tol: 1e-5, run: kmerge::backward_coincident_rows },
        // SNELLA: the magnitude competition. The threshold is an order statistic and M_s = M·|M| one
        // product per entry: both must be bit-exact, and so must the number of kept entries.
        Check { name: "sparsify_s0", tol: 0.0, run: |cx| sparsify::sparsify(cx, 0.0) },
        Check { name: "sparsify_s0.3", tol: 0.0, run: |cx| sparsify::sparsify(cx, 0.3) },
        Check { name: "sparsify_s0.5", tol: 0.0, run: |cx| sparsify::sparsify(cx, 0.5) },
        Check { name: "sparsify_s0.9", tol: 0.0, run: |cx| sparsify::sparsify(cx, 0.9) },
        Check { name: "sparsify_s0.99", tol: 0.0, run: |cx| sparsify::sparsify(cx, 0.99) },
        Check { name: "add_transposed", tol: 0.0, run: sparsify::add_transposed },
        // The edge cases of the select, each at s ∈ sparsify::EDGE_SPARSITIES, bit for bit (NaN equals NaN
        // only where the input has one): n = 1, n = 2, ties and a zero, all zeros, a NaN, and a large M
        // whose histograms loop over the grid (capped at 1024 blocks of 256) several times.
        Check { name: "sparsify_edge_n1", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::One) },
        Check { name: "sparsify_edge_n2", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Two) },
        Check { name: "sparsify_edge_random_1001", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Random) },
        Check { name: "sparsify_edge_ties", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Ties) },
        Check { name: "sparsify_edge_zeros", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Zeros) },
        Check { name: "sparsify_edge_nan", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Nan) },
        Check { name: "sparsify_edge_large", tol: 0.0, run: |cx| sparsify::edge_case(cx, sparsify::Edge::Large) },
        // A shape narrower than two tiles of add_transposed (n_out = 45 < 64) and a fixed t.
        Check { name: "sparsify_backward_add_transposed_67x45", tol: 0.0, run: sparsify::backward_add_transposed_67x45 },
        // The whole training step on the golden cases (their masks have decisive gaps, so fp32 rounding
        // differences between the devices cannot flip them): loss, logits, thresholds, every gradient, and
        // the parameters after three AdamW steps (and the allocator's EMAs). 1e-4: cancelling sums (the
        // gradients of α, γ, β) and AdamW's amplification of near-eps gradients, as the reference README says.
        Check { name: "model_snella_tiny", tol: 1e-4, run: |cx| model::step(cx, "snella_tiny", Recompute::Attention) },
        Check { name: "model_snella_tiny_keep_all", tol: 1e-4, run: |cx| model::step(cx, "snella_tiny", Recompute::None) },
        Check { name: "model_snella_tiny_recompute_block", tol: 1e-4, run: |cx| model::step(cx, "snella_tiny", Recompute::Block) },
        Check { name: "model_snella_tiny_fused_update", tol: 1e-4, run: model::step_fused },
        Check { name: "model_snella_d96_r16", tol: 1e-4, run: |cx| model::step(cx, "snella_d96_r16", Recompute::Attention) },
        Check { name: "model_snella_dinov2_ls", tol: 1e-4, run: |cx| model::step(cx, "snella_dinov2_ls", Recompute::Attention) },
        Check { name: "model_snell_tiny", tol: 1e-4, run: |cx| model::step(cx, "snell_tiny", Recompute::Attention) },
        Check { name: "model_mixk_tiny", tol: 1e-4, run: |cx| model::step(cx, "mixk_tiny", Recompute::Attention) },
        Check { name: "model_lora8_tiny", tol: 1e-4, run: |cx| model::step(cx, "lora8_tiny", Recompute::Attention) },
        Check { name: "model_full_tiny", tol: 1e-4, run: |cx| model::step(cx, "full_tiny", Recompute::Attention) },
        // The official recipe's regularisation: branch dropout and drop-path (the unmerged branch path) and
        // block drop-path; the masks are hashes of (seed, step, index), the same on both devices.
        Check { name: "model_snella_tiny_dropout", tol: 1e-4, run: model::step_dropout },
        // bf16 storage: the stream is rounded to bf16 where it is kept, so a value whose fp32 result differs by
        // an ulp between the devices can round to the neighbouring bf16 (2^-8 relative) on one side: a few
        // such flips per step move logits and gradients by ~1e-4 of their scale, hence 2e-3.
        Check { name: "model_snella_tiny_bf16_block", tol: 2e-3, run: |cx| model::step(cx, "snella_tiny", model::bf16(Recompute::Block)) },
        Check { name: "model_lora8_tiny_bf16", tol: 2e-3, run: |cx| model::step(cx, "lora8_tiny", model::bf16(Recompute::Attention)) },
        Check { name: "dropout", tol: 0.0, run: |cx| dropout::check(cx, 1) },
        Check { name: "drop_path", tol: 0.0, run: |cx| dropout::check(cx, 997) },
        // bf16 storage: round to nearest even and widen, bit for bit (ties, subnormals, the overflow edge).
        Check { name: "bf16_widen", tol: 0.0, run: convert::bf16_widen },
        Check { name: "bf16_round", tol: 0.0, run: convert::bf16_round },
    ]
}

// ---------------------------------------------------------------------------------------------------
// Running the registry
// ---------------------------------------------------------------------------------------------------

/// The names of every check with its tolerance (max |dev − cpu| / max |cpu|; 0 = bit-exact), in run order.
pub fn check_list() -> Vec<(&'static str, f64)> {
    checks().iter().map(|c| (c.name, c.tol)).collect()
}

/// Runs every check whose name contains `filter` on `device` (a GPU, or the emulated CUDA device), one
/// printed line each, with fresh seeds. `Ok(false)` when any check fails.
///
/// # Errors
/// `NoCuda` naming what is missing when the device cannot be opened; `Cuda` when the context cannot be made;
/// `Invalid` for `Device::Cpu` (that is [`dry_run`]).
pub fn run_all(device: Device, filter: Option<&str>) -> Result<bool> {
    run_seeded(device, filter, None)
}

/// [`run_all`] with every check's seed fixed to `seed` (to replay a failure), or fresh seeds for `None`.
///
/// # Errors
/// As [`run_all`].
pub fn run_seeded(device: Device, filter: Option<&str>, seed: Option<u64>) -> Result<bool> {
    let keep = match device {
        Device::Cpu => {
            return Err(Error::invalid(
                "device",
                "the selftest compares a CUDA device with the CPU (dry_run: CPU twice)",
            ))
        }
        Device::Cuda => {
            Cuda::probe().map_err(Error::NoCuda)?;
            // Held for the whole run: keeps the primary context alive between checks, so each check's own
            // runtime only adds a cuBLAS handle and the modules instead of a fresh context.
            Cuda::new()?
        }
        Device::CudaEmu => Cuda::emulated(None)?,
    };
    let (free, total) = keep.mem_info()?;
    println!(
        "selftest on {} ({:.1} GiB, {:.1} GiB free): CUDA vs CPU, max |cuda - cpu| / max |cpu| per output",
        keep.name,
        total as f64 / GIB,
        free as f64 / GIB
    );
    run_checks(filter, seed, device)
}

/// Runs the checks with the CPU on *both* sides: proves each check builds its plan, fills its inputs and
/// writes every output (an unwritten output stays NaN and fails) on a machine without a GPU. It compares
/// nothing about CUDA, so it is a test of the suite, never a substitute for [`run_all`].
///
/// # Errors
/// Never in practice (the CPU needs no setup); the signature matches [`run_all`].
pub fn dry_run(filter: Option<&str>) -> Result<bool> {
    println!("selftest dry run: CPU vs CPU (tests the checks themselves, not the CUDA kernels)");
    run_checks(filter, None, Device::Cpu)
}

fn run_checks(filter: Option<&str>, seed: Option<u64>, dev: Device) -> Result<bool> {
    let all = checks();
    let chosen: Vec<&Check> = all.iter().filter(|c| filter.is_none_or(|f| c.name.contains(f))).collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|c| c.name).collect();
        return Err(Error::invalid(
            "--filter",
            format!("no check name contains \"{}\"; checks: {}", filter.unwrap_or_default(), names.join(", ")),
        ));
    }
    let width = chosen.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut failed = Vec::new();
    let start = Instant::now();
    let launches_before = launch_counts();
    for check in &chosen {
        let seed = seed.unwrap_or_else(fresh_seed);
        let t0 = Instant::now();
        let outcome = run_one(check, seed, dev);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let pass = outcome.as_ref().is_ok_and(|v| v.pass);
        let verdict = if pass { "PASS" } else { "FAIL" };
        match &outcome {
            Ok(v) => println!(
                "{:<width$}  seed {seed:#018x}  max rel err {:>9}  tol {:.0e}  {verdict}  {}  ({ms:.0} ms)",
                check.name,
                fmt_err(v.worst),
                v.worst_tol,
                v.detail
            ),
            Err(msg) => println!(
                "{:<width$}  seed {seed:#018x}  max rel err {:>9}  tol {:.0e}  {verdict}  error: {msg}",
                check.name, "-", check.tol
            ),
        }
        if !pass {
            failed.push(check.name);
        }
    }
    println!(
        "{} of {} checks in {:.1} s{}",
        chosen.len() - failed.len(),
        chosen.len(),
        start.elapsed().as_secs_f64(),
        if failed.is_empty() { String::new() } else { format!("; FAILED: {}", failed.join(", ")) }
    );
    let summary = format!("{} passed, {} failed", chosen.len() - failed.len(), failed.len());
    if dev == Device::Cpu {
        println!("{summary} (dry run: the CPU on both sides)");
    } else {
        // Every kernel of cuda/*.cu should have run: one that no check launches is untested.
        let after = launch_counts();
        let idle: Vec<&str> =
            after.iter().zip(&launches_before).filter(|(a, b)| a.1 == b.1).map(|(a, _)| a.0).collect();
        let never = if idle.is_empty() { String::new() } else { format!(" (not launched: {})", idle.join(", ")) };
        println!("{summary}; kernels launched: {} of {}{never}", after.len() - idle.len(), after.len());
    }
    Ok(failed.is_empty())
}

/// What one check found: the output nearest its tolerance, and the outputs beyond theirs.
#[derive(Debug)]
struct Verdict {
    worst: f64,
    worst_tol: f64,
    detail: String,
    pass: bool,
}

/// Runs one check and judges every output against its own tolerance (the check's unless overridden).
fn run_one(check: &Check, seed: u64, dev: Device) -> std::result::Result<Verdict, String> {
    let mut cx = Case { rng: Rng::new(seed), dev, tol: check.tol, compared: Vec::new() };
    // An op's shape assertion is a panic; report it as this check's failure and go on with the others.
    match catch_unwind(AssertUnwindSafe(|| (check.run)(&mut cx))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            return Err(format!("panicked: {}", msg.unwrap_or_default()));
        }
    }
    if cx.compared.is_empty() {
        return Err("the check compared no output".into());
    }
    let tol = |c: &Compared| c.tol.unwrap_or(check.tol);
    // How far into its tolerance an output is (a tolerance of 0 demands exact equality).
    let ratio = |c: &Compared| {
        if c.rel == 0.0 {
            0.0
        } else if tol(c) == 0.0 {
            f64::INFINITY
        } else {
            c.rel / tol(c)
        }
    };
    let bad: Vec<String> = cx
        .compared
        .iter()
        .filter(|c| c.note.is_some() || c.rel > tol(c))
        .map(|c| {
            let note = c.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            format!("{} {} > {:.0e}{note}", c.name, fmt_err(c.rel), tol(c))
        })
        .collect();
    // The first output among the furthest into their tolerance (all exact: the first output).
    let worst = cx.compared.iter().fold(&cx.compared[0], |w, c| if ratio(c) > ratio(w) { c } else { w });
    let detail = if bad.is_empty() { format!("worst: {}", worst.name) } else { format!("bad: {}", bad.join(", ")) };
    Ok(Verdict { worst: worst.rel, worst_tol: tol(worst), detail, pass: bad.is_empty() })
}

fn fmt_err(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.2e}")
    } else {
        "inf".into()
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// A seed that differs between runs and between checks of one run (clock, process id, counter).
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let s = nanos
        ^ ((std::process::id() as u64) << 32)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(GOLDEN_GAMMA);
    splitmix64(s)
}

// ---------------------------------------------------------------------------------------------------
// What a check works with
// ---------------------------------------------------------------------------------------------------

/// The state of one running check: its seeded random source and the comparisons made so far.
pub(crate) struct Case {
    rng: Rng,
    /// The device under test (Cuda; Cpu in a dry run).
    dev: Device,
    /// The check's tolerance (what `compare_adamw` calls an outlier).
    tol: f64,
    compared: Vec<Compared>,
}

/// One output's comparison.
pub(crate) struct Compared {
    pub(crate) name: String,
    /// max |dev − cpu| / max |cpu| (infinite when a value is not finite).
    pub(crate) rel: f64,
    /// Set when a value is NaN or infinite, saying on which side.
    pub(crate) note: Option<String>,
    /// This output's tolerance when it differs from the check's.
    pub(crate) tol: Option<f64>,
}

/// The CPU reference and the device under test, each with its own allocation of the same plan.
pub(crate) struct Twin {
    pub(crate) cpu: Runtime,
    pub(crate) dev: Runtime,
}

impl Case {
    /// Allocates `plan` on the CPU and on the device under test.
    pub(crate) fn twin(&self, plan: Plan) -> Result<Twin> {
        let cpu = Runtime::new(Backend::Cpu, plan.clone())?;
        let dev = Runtime::new(Backend::new(self.dev)?, plan)?;
        Ok(Twin { cpu, dev })
    }

    /// `n` values from N(0, scale²).
    pub(crate) fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.normal() * scale).collect()
    }

    /// A uniform integer in [0, n).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    /// A uniform value in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.rng.uniform()
    }

    /// Fills `t` on both sides with the same N(0, scale²) values and returns them.
    pub(crate) fn input(&mut self, tw: &Twin, t: Tensor, scale: f32) -> Result<Vec<f32>> {
        let v = self.randn(t.numel, scale);
        tw.upload(t, &v)?;
        Ok(v)
    }

    /// Downloads `t` from both sides and records the comparison under the tensor's plan name.
    pub(crate) fn compare(&mut self, tw: &Twin, t: Tensor) -> Result<()> {
        let name = tw.cpu.plan.spec(t).name.clone();
        self.compare_as(tw, t, name)
    }

    /// [`Case::compare`] under another name (for slices of a tensor, or one tensor compared twice).
    pub(crate) fn compare_as(&mut self, tw: &Twin, t: Tensor, name: impl Into<String>) -> Result<()> {
        let (want, got) = (tw.cpu.download(t)?, tw.dev.download(t)?);
        self.compare_values(name, &want, &got, None);
        Ok(())
    }

    /// [`Case::compare`] with this output's own tolerance instead of the check's.
    pub(crate) fn compare_tol(&mut self, tw: &Twin, t: Tensor, tol: f64) -> Result<()> {
        let name = tw.cpu.plan.spec(t).name.clone();
        let (want, got) = (tw.cpu.download(t)?, tw.dev.download(t)?);
        self.compare_values(name, &want, &got, Some(tol));
        Ok(())
    }

    /// Downloads `t` from both sides and records how many values differ in their bits, which must be none
    /// (a tolerance of 0 still lets −0 pass for +0). A bf16 tensor is compared widened, which is exact.
    pub(crate) fn compare_bits(&mut self, tw: &Twin, t: Tensor) -> Result<()> {
        let name = tw.cpu.plan.spec(t).name.clone();
        let (want, got) = (tw.cpu.download(t)?, tw.dev.download(t)?);
        let differ = want.iter().zip(&got).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
        self.compare_values(format!("{name} (values with other bits)"), &[0.0], &[differ as f32], Some(0.0));
        Ok(())
    }

    /// Records a comparison of host values (e.g. counts read back by an op); `tol` overrides the check's.
    pub(crate) fn compare_values(&mut self, name: impl Into<String>, want: &[f32], got: &[f32], tol: Option<f64>) {
        let (rel, note) = compare_values(want, got);
        self.compared.push(Compared { name: name.into(), rel, note, tol });
    }

    /// Records parameters after `steps` AdamW steps of learning rate `lr`, with the rule the reference's README
    /// documents (and `golden::compare_adamw` applies): AdamW's first steps, lr·g/(|g| + eps), turn the rounding
    /// difference of a gradient entry with |g| ≈ eps into a change of up to about 1% of lr, for about one entry
    /// in 10⁴. Up to ⌈n/10⁴⌉ entries beyond the check's tolerance are set aside when each is within 1% of lr per
    /// step (the name then says how many); every other entry is held to the tolerance.
    pub(crate) fn compare_adamw(&mut self, name: impl Into<String>, want: &[f32], got: &[f32], lr: f64, steps: usize) {
        let mut name = name.into();
        let (rel, note) = compare_values(want, got);
        if note.is_some() || rel <= self.tol {
            self.compared.push(Compared { name, rel, note, tol: None });
            return;
        }
        let scale = scale_of(want);
        let mut diffs: Vec<f64> = want.iter().zip(got).map(|(&w, &g)| (g as f64 - w as f64).abs()).collect();
        diffs.sort_by(|a, b| b.total_cmp(a));
        let outliers = diffs.iter().take_while(|&&d| d > self.tol * scale).count();
        let rel = if outliers <= want.len().div_ceil(10_000) && diffs[0] <= 0.01 * lr * steps as f64 {
            name = format!("{name} ({outliers} AdamW outlier(s) <= 1% lr/step)");
            diffs.get(outliers).copied().unwrap_or(0.0) / scale
        } else {
            rel
        };
        self.compared.push(Compared { name, rel, note: None, tol: None });
    }

    /// Records `|got − want| / scale` of one value against an exact reference (e.g. f64) whose rounding
    /// scale is known (the Σ|term| of a sum that cancels), with its own tolerance.
    pub(crate) fn compare_scaled(&mut self, name: impl Into<String>, want: f64, got: f32, scale: f64, tol: f64) {
        let (rel, note) = if got.is_finite() && want.is_finite() {
            let diff = (got as f64 - want).abs();
            (if scale > 0.0 { diff / scale } else { diff }, None)
        } else {
            (f64::INFINITY, Some(format!("non-finite: got {got}, want {want}")))
        };
        self.compared.push(Compared { name: name.into(), rel, note, tol: Some(tol) });
    }

    /// Records how many values of `got` differ from `want` in their bits, which must be none; a NaN equals
    /// any NaN (whatever its payload) where `nan_allowed(index)` says the op may produce one, and nowhere
    /// else (there it is an unwritten, poisoned output).
    pub(crate) fn compare_exact(
        &mut self,
        name: impl Into<String>,
        want: &[f32],
        got: &[f32],
        nan_allowed: impl Fn(usize) -> bool,
    ) {
        let name = name.into();
        if want.len() != got.len() {
            let note = Some(format!("length {} vs {}", got.len(), want.len()));
            self.compared.push(Compared { name, rel: f64::INFINITY, note, tol: Some(0.0) });
            return;
        }
        let same = |i: usize, w: f32, g: f32| {
            if w.is_nan() || g.is_nan() {
                w.is_nan() && g.is_nan() && nan_allowed(i)
            } else {
                w.to_bits() == g.to_bits()
            }
        };
        let differ = want.iter().zip(got).enumerate().filter(|&(i, (&w, &g))| !same(i, w, g)).count();
        self.compare_values(format!("{name} (values with other bits)"), &[0.0], &[differ as f32], Some(0.0));
    }
}

/// max |v| (at least 1e-30): the scale a relative error is taken against.
pub(crate) fn scale_of(want: &[f32]) -> f64 {
    want.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30)
}

/// max |got − want| / max |want| (absolute when want is all zero), and a note if a value is not finite.
pub(crate) fn compare_values(want: &[f32], got: &[f32]) -> (f64, Option<String>) {
    if want.len() != got.len() {
        return (f64::INFINITY, Some(format!("length {} vs {}", got.len(), want.len())));
    }
    let count_bad = |v: &[f32]| v.iter().filter(|x| !x.is_finite()).count();
    let (bad_cpu, bad_dev) = (count_bad(want), count_bad(got));
    if bad_cpu + bad_dev > 0 {
        let first =
            |v: &[f32]| v.iter().position(|x| !x.is_finite()).map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        return (
            f64::INFINITY,
            Some(format!(
                "non-finite: {bad_dev} on the device (first at {}), {bad_cpu} on the cpu (first at {})",
                first(got),
                first(want)
            )),
        );
    }
    let (mut scale, mut diff) = (0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        scale = scale.max((w as f64).abs());
        diff = diff.max((g as f64 - w as f64).abs());
    }
    (if scale > 0.0 { diff / scale } else { diff }, None)
}

impl Twin {
    pub(crate) fn upload(&self, t: Tensor, data: &[f32]) -> Result<()> {
        self.cpu.upload(t, data)?;
        self.dev.upload(t, data)
    }

    pub(crate) fn upload_i32(&self, t: Tensor, data: &[i32]) -> Result<()> {
        self.cpu.upload_i32(t, data)?;
        self.dev.upload_i32(t, data)
    }

    /// Bytes into a u8 tensor (masks) on both sides.
    pub(crate) fn upload_u8(&self, t: Tensor, data: &[u8]) -> Result<()> {
        assert!(
            t.dtype == DType::U8 && t.numel == data.len(),
            "upload_u8: {} bytes for a u8 tensor of {}",
            data.len(),
            t.numel
        );
        for rt in [&self.cpu, &self.dev] {
            match &rt.backend {
                Backend::Cpu => rt.u8_mut(t).copy_from_slice(data),
                Backend::Cuda(c) => c.upload(rt.ptr(t), data)?,
            }
        }
        Ok(())
    }

    /// Sets every byte of each tensor to 0xFF on both sides (a NaN in f32): outputs the op must write.
    pub(crate) fn poison(&self, ts: &[Tensor]) -> Result<()> {
        for &t in ts {
            self.cpu.fill_bytes(t, 0xFF)?;
            self.dev.fill_bytes(t, 0xFF)?;
        }
        Ok(())
    }

    /// Copies the CPU's values of `t` to the device (inputs computed by a CPU op, shared exactly).
    pub(crate) fn copy_to_dev(&self, t: Tensor) -> Result<()> {
        self.dev.upload(t, &self.cpu.download(t)?)
    }

    pub(crate) fn set_gemm_precision(&self, p: GemmPrecision) {
        self.cpu.set_gemm_precision(p);
        self.dev.set_gemm_precision(p);
    }

    /// Runs the op on the CPU, then on the device, and waits for the device.
    pub(crate) fn run(&self, f: impl Fn(&Runtime) -> Result<()>) -> Result<()> {
        f(&self.cpu)?;
        f(&self.dev)?;
        self.dev.sync()
    }
}

/// The checks' random source: `crate::rng`'s SplitMix64 with the helpers the checks need.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        unit_f64(&mut self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

// ---------------------------------------------------------------------------------------------------
// Sizes shared by the checks of several files. Sizes: odd, not multiples of 32, larger than one block
// (256 threads) where a kernel tiles.
// ---------------------------------------------------------------------------------------------------

/// Rows and channels of the row-wise ops: C > 256 so each block loops over its row.
const ROWS: usize = 37;
const CHANNELS: usize = 769;

/// Elements of the elementwise ops: 28453, many blocks, a ragged last one.
const ELEMENTS: usize = 37 * 769;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Pool;

    #[test]
    fn rng_is_reproducible_and_roughly_normal() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<f32> = (0..20000).map(|_| a.normal()).collect();
        assert!(xs.iter().zip((0..20000).map(|_| b.normal())).all(|(x, y)| *x == y));
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        assert_ne!(fresh_seed(), fresh_seed());
    }

    #[test]
    fn compare_values_flags_nan_and_scales() {
        assert_eq!(compare_values(&[2.0, -4.0], &[2.0, -3.0]).0, 0.25);
        let (rel, note) = compare_values(&[1.0, 2.0], &[1.0, f32::NAN]);
        assert!(rel.is_infinite() && note.unwrap().contains("1 on the device"));
        let poison = f32::from_bits(u32::MAX);
        assert!(compare_values(&[poison], &[poison]).1.is_some(), "two unwritten outputs must not pass");
    }

    #[test]
    fn compare_exact_allows_a_nan_only_where_told_and_scaled_flags_nan() {
        let mut cx = Case { rng: Rng::new(1), dev: Device::Cpu, tol: 1e-5, compared: Vec::new() };
        let (nan, poison) = (f32::NAN, f32::from_bits(u32::MAX));
        cx.compare_exact("nan allowed", &[1.0, nan], &[1.0, poison], |i| i == 1);
        cx.compare_exact("poison", &[1.0, 2.0], &[1.0, poison], |_| true);
        cx.compare_exact("nan not allowed", &[1.0, nan], &[1.0, poison], |_| false);
        cx.compare_exact("signed zero", &[0.0], &[-0.0], |_| false);
        cx.compare_scaled("scaled", 1.0, 1.5, 10.0, 0.1);
        cx.compare_scaled("scaled nan", 1.0, nan, 10.0, 0.1);
        let rels: Vec<f64> = cx.compared.iter().map(|c| c.rel).collect();
        assert_eq!(rels, [0.0, 1.0, 1.0, 1.0, 0.05, f64::INFINITY]);
        assert!(cx.compared[5].note.is_some());
    }

    fn forgets_to_write(cx: &mut Case) -> Result<()> {
        let mut p = Plan::new();
        let y = p.f32("y", &[300], Pool::Activations);
        let tw = cx.twin(p)?;
        tw.poison(&[y])?;
        cx.compare(&tw, y)
    }

    fn panics(_: &mut Case) -> Result<()> {
        panic!("shape assertion")
    }

    #[test]
    fn an_unwritten_output_or_a_panic_fails_the_check() {
        let c = Check { name: "unwritten", tol: 1.0, run: forgets_to_write };
        let v = run_one(&c, 1, Device::Cpu).unwrap();
        assert!(!v.pass && v.detail.contains("non-finite"), "{}", v.detail);
        let c = Check { name: "panics", tol: 1.0, run: panics };
        assert!(run_one(&c, 1, Device::Cpu).unwrap_err().contains("shape assertion"));
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = checks().iter().map(|c| c.name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
    }
}
