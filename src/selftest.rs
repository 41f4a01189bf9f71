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
//! # Adding a check
//! Write a `fn my_op(cx: &mut Case) -> Result<()>` next to the others, in this order:
//! ```text
//! fn my_op(cx: &mut Case) -> Result<()> {
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
//! and add one line to `checks`: `Check { name: "my_op", tol: 1e-5, run: my_op }`. The tolerance
//! applies to every output; one output that needs another (a scalar summed over many entries) is
//! compared with `Case::compare_tol`; a tolerance of 0 demands bit-exact results. Outputs the op
//! accumulates into (`+=`) get random inputs instead of poison. To test one op in isolation from the
//! ones before it, compute its inputs on the CPU and copy them across with `Twin::copy_to_dev`.
//! A check whose shapes or options vary takes a non-capturing closure:
//! `run: |cx| my_op_with(cx, true)`.
//!
//! bf16 tensors (`p.add(name, shape, DType::BF16, pool)`) work with the same helpers: `Case::input` and
//! `Twin::upload` take f32 values and round them to nearest even on the host (the same bits on both
//! sides), comparisons download them widened to f32 (exact), and poison (0xFFFF) is a bf16 NaN.
//! `Case::compare_bits` demands identical bit patterns, where a tolerance of 0 would let −0 pass for +0.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::golden::{golden_dir, GoldenCase};
use crate::model::{MemoryOptions, Recompute};
use crate::ops::adamw::{adamw, AdamWStep};
use crate::ops::add::{add_bias, axpy, bias_backward, mul_cols, mul_cols_backward_gamma, scale_copy};
use crate::ops::attention::{attention_backward, attention_forward, permute_heads, AttentionBuffers, Heads};
use crate::ops::compete::{add_transposed, kept_count, sparsify_backward, sparsify_forward, CompeteScratch};
use crate::ops::convert::{bf16_round, bf16_widen};
use crate::ops::embed::{cls_gather, cls_scatter, embed_backward, embed_forward, patchify, PatchGeom};
use crate::ops::gelu::{gelu_backward, gelu_forward};
use crate::ops::importance::importance_update;
use crate::ops::kmerge::{merge_backward, merge_forward, Factors, KernelKind, MergeScratch};
use crate::ops::layernorm::{layernorm_apply, layernorm_backward, layernorm_forward};
use crate::ops::loss::cross_entropy;
use crate::ops::mask::mask_grad;
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::ops::{matmul, GemmPrecision, Matmul};
use crate::peft::allocator::{Allocator, AllocatorConfig};
use crate::peft::Method;
use crate::runtime::{Backend, Cuda, DType, Device, Plan, Pool, Runtime, Tensor};

/// One comparison of an op (or a small group of its variants) between the CPU and the device.
pub(crate) struct Check {
    /// Unique name; `--filter` matches a substring of it.
    pub(crate) name: &'static str,
    /// Largest allowed `max |dev − cpu| / max |cpu|` of each output (unless `Case::compare_tol`
    /// gives that output its own); 0 means bit-exact.
    pub(crate) tol: f64,
    pub(crate) run: fn(&mut Case) -> Result<()>,
}

/// The registry: one entry per op variant. Add new checks here (see the module docs).
#[rustfmt::skip]
pub(crate) fn checks() -> Vec<Check> {
    use GemmPrecision::{Bf16, Fp32, Tf32};
    vec![
        Check { name: "matmul_nn", tol: 1e-5, run: |cx| matmul_variants(cx, &[(false, false)], Fp32) },
        Check { name: "matmul_tn", tol: 1e-5, run: |cx| matmul_variants(cx, &[(true, false)], Fp32) },
        Check { name: "matmul_nt", tol: 1e-5, run: |cx| matmul_variants(cx, &[(false, true)], Fp32) },
        Check { name: "matmul_tt", tol: 1e-5, run: |cx| matmul_variants(cx, &[(true, true)], Fp32) },
        Check { name: "matmul_broadcast_b", tol: 1e-5, run: matmul_broadcast_b },
        Check { name: "matmul_strided", tol: 1e-5, run: matmul_strided },
        // TF32 rounds the inputs to 10 mantissa bits, bf16 to 7: about 5e-4 and 2e-3 of max |C| here.
        Check { name: "matmul_tf32", tol: 1e-2, run: |cx| matmul_variants(cx, &ALL_TRANSPOSES, Tf32) },
        Check { name: "matmul_bf16", tol: 1e-2, run: |cx| matmul_variants(cx, &ALL_TRANSPOSES, Bf16) },
        Check { name: "layernorm_forward", tol: 1e-5, run: layernorm_fwd },
        Check { name: "layernorm_apply", tol: 1e-6, run: layernorm_apply_check },
        Check { name: "layernorm_backward", tol: 1e-5, run: |cx| layernorm_bwd(cx, true) },
        Check { name: "layernorm_backward_no_affine", tol: 1e-5, run: |cx| layernorm_bwd(cx, false) },
        Check { name: "gelu_forward", tol: 1e-5, run: gelu_fwd },
        Check { name: "gelu_backward", tol: 1e-5, run: |cx| gelu_bwd(cx, false) },
        Check { name: "gelu_backward_inplace", tol: 1e-5, run: |cx| gelu_bwd(cx, true) },
        Check { name: "softmax_forward", tol: 1e-5, run: |cx| softmax_fwd(cx, false) },
        Check { name: "softmax_forward_inplace", tol: 1e-5, run: |cx| softmax_fwd(cx, true) },
        Check { name: "softmax_backward", tol: 1e-5, run: |cx| softmax_bwd(cx, false) },
        Check { name: "softmax_backward_inplace", tol: 1e-5, run: |cx| softmax_bwd(cx, true) },
        Check { name: "add_bias", tol: 1e-6, run: add_bias_check },
        Check { name: "bias_backward", tol: 1e-5, run: bias_backward_check },
        Check { name: "axpy", tol: 1e-6, run: axpy_check },
        Check { name: "mul_cols", tol: 1e-6, run: |cx| mul_cols_check(cx, false) },
        Check { name: "mul_cols_accumulate", tol: 1e-6, run: |cx| mul_cols_check(cx, true) },
        Check { name: "mul_cols_backward_gamma", tol: 1e-5, run: mul_cols_backward_gamma_check },
        Check { name: "scale_copy", tol: 1e-6, run: scale_copy_check },
        Check { name: "cross_entropy", tol: 1e-5, run: |cx| cross_entropy_check(cx, true) },
        Check { name: "cross_entropy_loss_only", tol: 1e-5, run: |cx| cross_entropy_check(cx, false) },
        Check { name: "adamw_3_steps", tol: 1e-5, run: adamw_check },
        Check { name: "permute_heads_to_heads", tol: 0.0, run: permute_to_heads },
        Check { name: "permute_heads_from_heads", tol: 0.0, run: |cx| permute_from_heads(cx, false) },
        Check { name: "permute_heads_from_heads_strided", tol: 0.0, run: |cx| permute_from_heads(cx, true) },
        Check { name: "attention_forward", tol: 1e-5, run: attention_fwd },
        // A chain of four products and a softmax backward: a little more rounding than one op.
        Check { name: "attention_backward", tol: 1e-4, run: attention_bwd },
        Check { name: "patchify", tol: 0.0, run: patchify_check },
        Check { name: "embed_forward", tol: 0.0, run: embed_fwd },
        Check { name: "embed_backward", tol: 1e-6, run: |cx| embed_bwd(cx, true) },
        Check { name: "embed_backward_pos_only", tol: 1e-6, run: |cx| embed_bwd(cx, false) },
        Check { name: "cls_gather", tol: 0.0, run: |cx| cls_rows(cx, false) },
        Check { name: "cls_scatter", tol: 0.0, run: |cx| cls_rows(cx, true) },
        Check { name: "importance_update_3_steps", tol: 1e-6, run: importance_check },
        Check { name: "mask_grad", tol: 0.0, run: mask_grad_check },
        // SNELLA: the kernelized merge, per kernel, with and without the mixture.
        Check { name: "merge_forward_piecewise_linear", tol: 1e-5, run: |cx| merge_fwd(cx, KernelKind::PiecewiseLinear) },
        Check { name: "merge_forward_linear", tol: 1e-5, run: |cx| merge_fwd(cx, KernelKind::Linear) },
        Check { name: "merge_forward_rbf", tol: 1e-5, run: |cx| merge_fwd(cx, KernelKind::Rbf) },
        Check { name: "merge_forward_sigmoid", tol: 1e-5, run: |cx| merge_fwd(cx, KernelKind::Sigmoid) },
        Check { name: "merge_forward_poly", tol: 1e-5, run: |cx| merge_fwd(cx, KernelKind::Poly) },
        Check { name: "merge_backward_piecewise_linear", tol: 1e-5, run: |cx| merge_bwd(cx, KernelKind::PiecewiseLinear) },
        Check { name: "merge_backward_linear", tol: 1e-5, run: |cx| merge_bwd(cx, KernelKind::Linear) },
        Check { name: "merge_backward_rbf", tol: 1e-5, run: |cx| merge_bwd(cx, KernelKind::Rbf) },
        Check { name: "merge_backward_sigmoid", tol: 1e-5, run: |cx| merge_bwd(cx, KernelKind::Sigmoid) },
        Check { name: "merge_backward_poly", tol: 1e-5, run: |cx| merge_bwd(cx, KernelKind::Poly) },
        // SNELLA: the magnitude competition. The threshold is an order statistic and M_s = M·|M| one
        // product per entry: both must be bit-exact, and so must the number of kept entries.
        Check { name: "sparsify_s0", tol: 0.0, run: |cx| sparsify_check(cx, 0.0) },
        Check { name: "sparsify_s0.3", tol: 0.0, run: |cx| sparsify_check(cx, 0.3) },
        Check { name: "sparsify_s0.5", tol: 0.0, run: |cx| sparsify_check(cx, 0.5) },
        Check { name: "sparsify_s0.9", tol: 0.0, run: |cx| sparsify_check(cx, 0.9) },
        Check { name: "sparsify_s0.99", tol: 0.0, run: |cx| sparsify_check(cx, 0.99) },
        Check { name: "add_transposed", tol: 0.0, run: add_transposed_check },
        // The whole training step on the golden cases (their masks have decisive gaps, so fp32 rounding
        // differences between the devices cannot flip them): loss, logits, thresholds, every gradient, and
        // the parameters after three AdamW steps (and the allocator's EMAs). 1e-4: cancelling sums (the
        // gradients of α, γ, β) and AdamW's amplification of near-eps gradients, as the reference README says.
        Check { name: "model_snella_tiny", tol: 1e-4, run: |cx| model_step(cx, "snella_tiny", Recompute::Attention) },
        Check { name: "model_snella_tiny_keep_all", tol: 1e-4, run: |cx| model_step(cx, "snella_tiny", Recompute::None) },
        Check { name: "model_snella_tiny_recompute_block", tol: 1e-4, run: |cx| model_step(cx, "snella_tiny", Recompute::Block) },
        Check { name: "model_snella_d96_r16", tol: 1e-4, run: |cx| model_step(cx, "snella_d96_r16", Recompute::Attention) },
        Check { name: "model_snella_dinov2_ls", tol: 1e-4, run: |cx| model_step(cx, "snella_dinov2_ls", Recompute::Attention) },
        Check { name: "model_snell_tiny", tol: 1e-4, run: |cx| model_step(cx, "snell_tiny", Recompute::Attention) },
        Check { name: "model_mixk_tiny", tol: 1e-4, run: |cx| model_step(cx, "mixk_tiny", Recompute::Attention) },
        Check { name: "model_lora8_tiny", tol: 1e-4, run: |cx| model_step(cx, "lora8_tiny", Recompute::Attention) },
        Check { name: "model_full_tiny", tol: 1e-4, run: |cx| model_step(cx, "full_tiny", Recompute::Attention) },
        // The official recipe's regularisation: branch dropout and drop-path (the unmerged branch path) and
        // block drop-path; the masks are hashes of (seed, step, index), the same on both devices.
        Check { name: "model_snella_tiny_dropout", tol: 1e-4, run: model_step_dropout },
        // bf16 storage: the stream is rounded to bf16 where it is kept, so a value whose fp32 result differs by
        // an ulp between the devices can round to the neighbouring bf16 (2^-8 relative) on one side: a few
        // such flips per step move logits and gradients by ~1e-4 of their scale, hence 2e-3.
        Check { name: "model_snella_tiny_bf16_block", tol: 2e-3, run: |cx| model_step(cx, "snella_tiny", bf16(Recompute::Block)) },
        Check { name: "model_lora8_tiny_bf16", tol: 2e-3, run: |cx| model_step(cx, "lora8_tiny", bf16(Recompute::Attention)) },
        Check { name: "dropout", tol: 0.0, run: |cx| dropout_check(cx, 1) },
        Check { name: "drop_path", tol: 0.0, run: |cx| dropout_check(cx, 997) },
        // bf16 storage: round to nearest even and widen, bit for bit (ties, subnormals, the overflow edge).
        Check { name: "bf16_widen", tol: 0.0, run: bf16_widen_check },
        Check { name: "bf16_round", tol: 0.0, run: bf16_round_check },
    ]
}

// ---------------------------------------------------------------------------------------------------
// Running the registry
// ---------------------------------------------------------------------------------------------------

/// The names of every check with its tolerance (max |dev − cpu| / max |cpu|; 0 = bit-exact), in run order.
pub fn check_list() -> Vec<(&'static str, f64)> {
    checks().iter().map(|c| (c.name, c.tol)).collect()
}

/// Runs every check whose name contains `filter` on the GPU, one printed line each, with fresh seeds.
/// `Ok(false)` when any check fails.
///
/// # Errors
/// `NoCuda` naming what is missing when there is no usable GPU; `Cuda` when the context cannot be made.
pub fn run_all(filter: Option<&str>) -> Result<bool> {
    run_seeded(filter, None)
}

/// [`run_all`] with every check's seed fixed to `seed` (to replay a failure), or fresh seeds for `None`.
///
/// # Errors
/// As [`run_all`].
pub fn run_seeded(filter: Option<&str>, seed: Option<u64>) -> Result<bool> {
    Cuda::probe().map_err(Error::NoCuda)?;
    // Held for the whole run: keeps the primary context alive between checks, so each check's own
    // runtime only adds a cuBLAS handle and the modules instead of a fresh context.
    let keep = Cuda::new()?;
    let (free, total) = keep.mem_info()?;
    println!(
        "selftest on {} ({:.1} GiB, {:.1} GiB free): CUDA vs CPU, max |cuda - cpu| / max |cpu| per output",
        keep.name,
        total as f64 / GIB,
        free as f64 / GIB
    );
    run_checks(filter, seed, Device::Cuda)
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
            format!("no check name contains {filter:?}; checks: {}", names.join(", ")),
        ));
    }
    let width = chosen.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut failed = Vec::new();
    let start = Instant::now();
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
        "{} of {} checks passed in {:.1} s{}",
        chosen.len() - failed.len(),
        chosen.len(),
        start.elapsed().as_secs_f64(),
        if failed.is_empty() { String::new() } else { format!("; FAILED: {}", failed.join(", ")) }
    );
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
    let mut cx = Case { rng: Rng::new(seed), dev, compared: Vec::new() };
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
    let mut s = nanos
        ^ ((std::process::id() as u64) << 32)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    splitmix64(&mut s)
}

// ---------------------------------------------------------------------------------------------------
// What a check works with
// ---------------------------------------------------------------------------------------------------

/// The state of one running check: its seeded random source and the comparisons made so far.
pub(crate) struct Case {
    rng: Rng,
    /// The device under test (Cuda; Cpu in a dry run).
    dev: Device,
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

/// splitmix64: small, fast and good enough for test inputs; no dependency.
fn splitmix64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (splitmix64(&mut self.0) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
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
// The checks. Sizes: odd, not multiples of 32, larger than one block (256 threads) where a kernel tiles.
// ---------------------------------------------------------------------------------------------------

const ALL_TRANSPOSES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];
/// Rows and channels of the row-wise ops: C > 256 so each block loops over its row.
const ROWS: usize = 37;
const CHANNELS: usize = 769;

fn tn(t: bool) -> char {
    if t {
        't'
    } else {
        'n'
    }
}

/// For each (ta, tb): a single product, a batched one with alpha, and a batched one accumulating into C.
fn matmul_variants(cx: &mut Case, transposes: &[(bool, bool)], prec: GemmPrecision) -> Result<()> {
    let (m, n, k, batch) = (173, 95, 131, 3);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let a = p.f32("a", &[batch, m, k], Pool::Activations);
    let b = p.f32("b", &[batch, k, n], Pool::Activations);
    let mut outs = Vec::new();
    for &(ta, tb) in transposes {
        let tag = format!("{}{}", tn(ta), tn(tb));
        let single = p.f32(format!("c_{tag}"), &[m, n], Pool::Activations);
        let alpha = p.f32(format!("c_{tag}_batched_alpha"), &[batch, m, n], Pool::Activations);
        let acc = p.f32(format!("c_{tag}_batched_accumulate"), &[batch, m, n], Pool::Activations);
        outs.push((ta, tb, single, alpha, acc));
    }
    let tw = cx.twin(p)?;
    tw.set_gemm_precision(prec);
    cx.input(&tw, a, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    for &(ta, tb, single, alpha, acc) in &outs {
        tw.poison(&[single, alpha])?;
        cx.input(&tw, acc, 1.0)?;
        let s = Matmul::new(m, n, k, ta, tb);
        tw.run(|rt| {
            matmul(rt, single, a, b, s)?;
            matmul(rt, alpha, a, b, s.batched(batch).alpha(0.37))?;
            matmul(rt, acc, a, b, s.batched(batch).alpha(-1.25).accumulate())
        })?;
        for t in [single, alpha, acc] {
            cx.compare(&tw, t)?;
        }
    }
    Ok(())
}

/// One B for every product of the batch (the frozen weight times a batch of activations).
fn matmul_broadcast_b(cx: &mut Case) -> Result<()> {
    let (m, n, k, batch) = (67, 143, 97, 5);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let a = p.f32("a", &[batch, m, k], Pool::Activations);
    let b = p.f32("b", &[k, n], Pool::Frozen);
    let c_nn = p.f32("c_nn", &[batch, m, n], Pool::Activations);
    let c_nt_acc = p.f32("c_nt_accumulate", &[batch, m, n], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, a, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    tw.poison(&[c_nn])?;
    cx.input(&tw, c_nt_acc, 1.0)?;
    tw.run(|rt| {
        matmul(rt, c_nn, a, b, Matmul::new(m, n, k, false, false).batched(batch).broadcast_b())?;
        matmul(
            rt,
            c_nt_acc,
            a,
            b,
            Matmul::new(m, n, k, false, true).batched(batch).broadcast_b().alpha(0.5).accumulate(),
        )
    })?;
    cx.compare(&tw, c_nn)?;
    cx.compare(&tw, c_nt_acc)
}

/// Row strides: op(A), op(B) read as column blocks of wider buffers, C written into a column block of
/// a wider buffer whose other columns must stay untouched (e.g. q of a fused qkv). Batch 1 only.
fn matmul_strided(cx: &mut Case) -> Result<()> {
    let (m, n, k) = (131, 77, 95);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let mut cases = Vec::new();
    for (ta, tb) in ALL_TRANSPOSES {
        let tag = format!("{}{}", tn(ta), tn(tb));
        // Stored shapes (rows, cols) of A and B; each sits at a column offset of a wider buffer.
        let (ra, ca) = if ta { (k, m) } else { (m, k) };
        let (rb, cb) = if tb { (n, k) } else { (k, n) };
        let (lda, ldb, ldc) = (ca + 17, cb + 11, n + 9);
        let a = p.f32(format!("a_{tag}"), &[ra, lda], Pool::Activations);
        let b = p.f32(format!("b_{tag}"), &[rb, ldb], Pool::Frozen);
        let c = p.f32(format!("c_{tag}_column_block"), &[m, ldc], Pool::Activations);
        cases.push((ta, tb, a, b, c, lda, ldb, ldc));
    }
    let tw = cx.twin(p)?;
    for (ta, tb, a, b, c, lda, ldb, ldc) in cases {
        cx.input(&tw, a, 1.0)?;
        cx.input(&tw, b, 1.0)?;
        cx.input(&tw, c, 1.0)?;
        let (a_off, b_off, c_off) = (7, 3, 4);
        let (av, bv, cv) =
            (a.slice(a_off, a.numel - a_off), b.slice(b_off, b.numel - b_off), c.slice(c_off, c.numel - c_off));
        let s = Matmul::new(m, n, k, ta, tb).ld(lda, ldb, ldc).alpha(0.83);
        // Half the products accumulate, so both C = and C += are exercised.
        let s = if ta == tb { s.accumulate() } else { s };
        tw.run(|rt| matmul(rt, cv, av, bv, s))?;
        cx.compare(&tw, c)?;
    }
    Ok(())
}

const LN_EPS: f32 = 1e-6;

fn layernorm_fwd(cx: &mut Case) -> Result<()> {
    let (n, c) = (ROWS, CHANNELS);
    let mut p = Plan::new();
    let x = p.f32("x", &[n, c], Pool::Activations);
    let w = p.f32("w", &[c], Pool::Frozen);
    let b = p.f32("b", &[c], Pool::Frozen);
    let out = p.f32("out", &[n, c], Pool::Activations);
    let mean = p.f32("mean", &[n], Pool::Activations);
    let rstd = p.f32("rstd", &[n], Pool::Activations);
    let tw = cx.twin(p)?;
    // A per-row offset: the mean must be subtracted, not assumed to be zero.
    let mut xv = cx.randn(n * c, 2.0);
    for r in 0..n {
        let off = cx.uniform(-3.0, 3.0) as f32;
        xv[r * c..(r + 1) * c].iter_mut().for_each(|v| *v += off);
    }
    tw.upload(x, &xv)?;
    cx.input(&tw, w, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    tw.poison(&[out, mean, rstd])?;
    tw.run(|rt| layernorm_forward(rt, out, mean, rstd, x, w, b, c, LN_EPS))?;
    for t in [out, mean, rstd] {
        cx.compare(&tw, t)?;
    }
    Ok(())
}

/// Row statistics of x (n rows of c) in f64, rounded to f32: the same mean and rstd for both sides.
fn row_stats(xv: &[f32], n: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut mv, mut rv) = (vec![0f32; n], vec![0f32; n]);
    for r in 0..n {
        let row = &xv[r * c..(r + 1) * c];
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        mv[r] = m as f32;
        rv[r] = (1.0 / (var + LN_EPS as f64).sqrt()) as f32;
    }
    (mv, rv)
}

/// The forward's output recomputed from saved statistics (given to both sides).
fn layernorm_apply_check(cx: &mut Case) -> Result<()> {
    let (n, c) = (ROWS, CHANNELS);
    let mut p = Plan::new();
    let x = p.f32("x", &[n, c], Pool::Activations);
    let w = p.f32("w", &[c], Pool::Frozen);
    let b = p.f32("b", &[c], Pool::Frozen);
    let mean = p.f32("mean", &[n], Pool::Activations);
    let rstd = p.f32("rstd", &[n], Pool::Activations);
    let out = p.f32("out", &[n, c], Pool::Activations);
    let tw = cx.twin(p)?;
    let xv = cx.input(&tw, x, 2.0)?;
    let (mv, rv) = row_stats(&xv, n, c);
    tw.upload(mean, &mv)?;
    tw.upload(rstd, &rv)?;
    cx.input(&tw, w, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    tw.poison(&[out])?;
    tw.run(|rt| layernorm_apply(rt, out, x, mean, rstd, w, b, c))?;
    cx.compare(&tw, out)
}

/// The backward in isolation: mean and rstd are computed here (f64) and given to both sides.
fn layernorm_bwd(cx: &mut Case, affine: bool) -> Result<()> {
    let (n, c) = (ROWS, CHANNELS);
    let mut p = Plan::new();
    let x = p.f32("x", &[n, c], Pool::Activations);
    let w = p.f32("w", &[c], Pool::Frozen);
    let mean = p.f32("mean", &[n], Pool::Activations);
    let rstd = p.f32("rstd", &[n], Pool::Activations);
    let dout = p.f32("dout", &[n, c], Pool::Scratch);
    let dinp = p.f32("dinp", &[n, c], Pool::Scratch);
    let dw = p.f32("dw", &[c], Pool::Grads);
    let db = p.f32("db", &[c], Pool::Grads);
    let tw = cx.twin(p)?;
    let xv = cx.input(&tw, x, 2.0)?;
    let (mv, rv) = row_stats(&xv, n, c);
    tw.upload(mean, &mv)?;
    tw.upload(rstd, &rv)?;
    cx.input(&tw, w, 1.0)?;
    cx.input(&tw, dout, 1.0)?;
    // All three gradients accumulate (+=): they start from random values, not poison.
    cx.input(&tw, dinp, 1.0)?;
    cx.input(&tw, dw, 1.0)?;
    cx.input(&tw, db, 1.0)?;
    let (dwo, dbo) = if affine { (Some(dw), Some(db)) } else { (None, None) };
    tw.run(|rt| layernorm_backward(rt, dinp, dwo, dbo, dout, x, w, mean, rstd, c))?;
    cx.compare(&tw, dinp)?;
    // Without the affine gradients, dw and db must come back untouched (and equal on both sides).
    cx.compare_as(&tw, dw, if affine { "dw" } else { "dw (untouched)" })?;
    cx.compare_as(&tw, db, if affine { "db" } else { "db (untouched)" })
}

const ELEMENTS: usize = 37 * 769; // 28453: many blocks, a ragged last one

fn gelu_fwd(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let x = p.f32("x", &[ELEMENTS], Pool::Activations);
    let out = p.f32("out", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 3.0)?;
    tw.poison(&[out])?;
    tw.run(|rt| gelu_forward(rt, out, x))?;
    cx.compare(&tw, out)
}

fn gelu_bwd(cx: &mut Case, in_place: bool) -> Result<()> {
    let mut p = Plan::new();
    let x = p.f32("x", &[ELEMENTS], Pool::Activations);
    let dout = p.f32("dout", &[ELEMENTS], Pool::Scratch);
    let dinp = p.f32("dinp", &[ELEMENTS], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 3.0)?;
    cx.input(&tw, dout, 1.0)?;
    if in_place {
        tw.run(|rt| gelu_backward(rt, dout, x, dout))?;
        cx.compare_as(&tw, dout, "dinp (in place)")
    } else {
        tw.poison(&[dinp])?;
        tw.run(|rt| gelu_backward(rt, dinp, x, dout))?;
        cx.compare(&tw, dinp)
    }
}

/// Rows of 1001 (four passes of a 256-thread block, ragged), scale ≠ 1.
const SOFTMAX_ROWS: usize = 41;
const SOFTMAX_COLS: usize = 1001;
const SOFTMAX_SCALE: f32 = 0.37;

fn softmax_fwd(cx: &mut Case, in_place: bool) -> Result<()> {
    let (r, c) = (SOFTMAX_ROWS, SOFTMAX_COLS);
    let mut p = Plan::new();
    let x = p.f32("x", &[r, c], Pool::Activations);
    let out = p.f32("out", &[r, c], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 4.0)?;
    if in_place {
        tw.run(|rt| softmax_forward(rt, x, x, c, SOFTMAX_SCALE))?;
        cx.compare_as(&tw, x, "out (in place)")
    } else {
        tw.poison(&[out])?;
        tw.run(|rt| softmax_forward(rt, out, x, c, SOFTMAX_SCALE))?;
        cx.compare(&tw, out)
    }
}

/// The backward in isolation: the probabilities come from the CPU forward, copied to the device.
fn softmax_bwd(cx: &mut Case, in_place: bool) -> Result<()> {
    let (r, c) = (SOFTMAX_ROWS, SOFTMAX_COLS);
    let mut p = Plan::new();
    let x = p.f32("x", &[r, c], Pool::Activations);
    let y = p.f32("probs", &[r, c], Pool::Activations);
    let dout = p.f32("dout", &[r, c], Pool::Scratch);
    let dinp = p.f32("dinp", &[r, c], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 4.0)?;
    softmax_forward(&tw.cpu, y, x, c, SOFTMAX_SCALE)?;
    tw.copy_to_dev(y)?;
    cx.input(&tw, dout, 1.0)?;
    if in_place {
        tw.run(|rt| softmax_backward(rt, dout, y, dout, c, SOFTMAX_SCALE))?;
        cx.compare_as(&tw, dout, "dinp (in place)")
    } else {
        tw.poison(&[dinp])?;
        tw.run(|rt| softmax_backward(rt, dinp, y, dout, c, SOFTMAX_SCALE))?;
        cx.compare(&tw, dinp)
    }
}

fn add_bias_check(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let out = p.f32("out", &[ROWS, CHANNELS], Pool::Activations);
    let bias = p.f32("bias", &[CHANNELS], Pool::Frozen);
    let tw = cx.twin(p)?;
    cx.input(&tw, out, 1.0)?;
    cx.input(&tw, bias, 1.0)?;
    tw.run(|rt| add_bias(rt, out, bias))?;
    cx.compare(&tw, out)
}

fn bias_backward_check(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dout = p.f32("dout", &[ROWS, CHANNELS], Pool::Scratch);
    let dbias = p.f32("dbias", &[CHANNELS], Pool::Grads);
    let tw = cx.twin(p)?;
    cx.input(&tw, dout, 1.0)?;
    cx.input(&tw, dbias, 1.0)?; // accumulates
    tw.run(|rt| bias_backward(rt, dbias, dout))?;
    cx.compare(&tw, dbias)
}

fn axpy_check(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dst = p.f32("dst", &[ELEMENTS], Pool::Activations);
    let src = p.f32("src", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, dst, 1.0)?;
    cx.input(&tw, src, 1.0)?;
    tw.run(|rt| axpy(rt, dst, src, -0.71))?;
    cx.compare(&tw, dst)
}

fn mul_cols_check(cx: &mut Case, accumulate: bool) -> Result<()> {
    let mut p = Plan::new();
    let out = p.f32("out", &[ROWS, CHANNELS], Pool::Activations);
    let inp = p.f32("inp", &[ROWS, CHANNELS], Pool::Activations);
    let gamma = p.f32("gamma", &[CHANNELS], Pool::Trainable);
    let tw = cx.twin(p)?;
    cx.input(&tw, inp, 1.0)?;
    cx.input(&tw, gamma, 1.0)?;
    if accumulate {
        cx.input(&tw, out, 1.0)?;
    } else {
        tw.poison(&[out])?;
    }
    tw.run(|rt| mul_cols(rt, out, inp, gamma, accumulate))?;
    cx.compare(&tw, out)
}

fn mul_cols_backward_gamma_check(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dout = p.f32("dout", &[ROWS, CHANNELS], Pool::Scratch);
    let inp = p.f32("inp", &[ROWS, CHANNELS], Pool::Activations);
    let dgamma = p.f32("dgamma", &[CHANNELS], Pool::Grads);
    let tw = cx.twin(p)?;
    cx.input(&tw, dout, 1.0)?;
    cx.input(&tw, inp, 1.0)?;
    cx.input(&tw, dgamma, 1.0)?; // accumulates
    tw.run(|rt| mul_cols_backward_gamma(rt, dgamma, dout, inp))?;
    cx.compare(&tw, dgamma)
}

fn scale_copy_check(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dst = p.f32("dst", &[ELEMENTS], Pool::Activations);
    let src = p.f32("src", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, src, 1.0)?;
    tw.poison(&[dst])?;
    tw.run(|rt| scale_copy(rt, dst, src, 1.7))?;
    cx.compare(&tw, dst)
}

fn cross_entropy_check(cx: &mut Case, with_grad: bool) -> Result<()> {
    let (b, v) = (13, 1003);
    let mut p = Plan::new();
    let logits = p.f32("logits", &[b, v], Pool::Activations);
    let labels = p.add("labels", &[b], DType::I32, Pool::Activations);
    let losses = p.f32("losses", &[b], Pool::Activations);
    let dlogits = p.f32("dlogits", &[b, v], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, logits, 3.0)?;
    // The first and last class always appear: the edges of the row.
    let mut lv: Vec<i32> = (0..b).map(|_| cx.below(v) as i32).collect();
    lv[0] = 0;
    lv[b - 1] = v as i32 - 1;
    tw.upload_i32(labels, &lv)?;
    tw.poison(&[losses, dlogits])?;
    tw.run(|rt| cross_entropy(rt, losses, with_grad.then_some(dlogits), logits, labels, v))?;
    cx.compare(&tw, losses)?;
    if with_grad {
        cx.compare(&tw, dlogits)?;
    }
    Ok(())
}

fn adamw_check(cx: &mut Case) -> Result<()> {
    let n = ELEMENTS;
    let mut p = Plan::new();
    let param = p.f32("param", &[n], Pool::Trainable);
    let grad = p.f32("grad", &[n], Pool::Grads);
    let m = p.f32("m", &[n], Pool::Optimizer);
    let v = p.f32("v", &[n], Pool::Optimizer);
    let tw = cx.twin(p)?;
    cx.input(&tw, param, 1.0)?;
    tw.upload(m, &vec![0.0; n])?;
    tw.upload(v, &vec![0.0; n])?;
    for t in 1..=3 {
        cx.input(&tw, grad, 1.0)?; // a fresh gradient each step
        let step = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, t };
        tw.run(|rt| adamw(rt, param, grad, m, v, step))?;
    }
    for t in [param, m, v] {
        cx.compare(&tw, t)?;
    }
    Ok(())
}

/// Odd head size and token count (ViT-B/16 at 224 has N = 197).
const HEADS: Heads = Heads { b: 2, n: 197, h: 3, hd: 23 };

/// The k part of a fused qkv (row stride 3D, offset D) into head-major (B, H, N, hd).
fn permute_to_heads(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let qkv = p.f32("qkv", &[s.b, s.n, 3 * d], Pool::Activations);
    let k = p.f32("k", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    tw.poison(&[k])?;
    tw.run(|rt| permute_heads(rt, k, qkv.slice(d, qkv.numel - d), s, 3 * d, true))?;
    cx.compare(&tw, k)
}

/// Head-major back to rows: into a dense (B, N, D), or into the v part of a (B, N, 3D) whose other
/// columns must stay untouched (so it starts from random values, not poison).
fn permute_from_heads(cx: &mut Case, strided: bool) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let heads = p.f32("heads", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let rows = p.f32("rows", &[s.b, s.n, d], Pool::Activations);
    let dqkv = p.f32("dqkv", &[s.b, s.n, 3 * d], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, heads, 1.0)?;
    if strided {
        cx.input(&tw, dqkv, 1.0)?;
        tw.run(|rt| permute_heads(rt, dqkv.slice(2 * d, dqkv.numel - 2 * d), heads, s, 3 * d, false))?;
        cx.compare(&tw, dqkv)
    } else {
        tw.poison(&[rows])?;
        tw.run(|rt| permute_heads(rt, rows, heads, s, d, false))?;
        cx.compare(&tw, rows)
    }
}

fn attention_plan(p: &mut Plan, s: Heads) -> (Tensor, Tensor, AttentionBuffers) {
    p.add_cublas_workspace();
    let d = s.d();
    let qkv = p.f32("qkv", &[s.b, s.n, 3 * d], Pool::Activations);
    let out = p.f32("out", &[s.b, s.n, d], Pool::Activations);
    let buf = AttentionBuffers {
        q: p.f32("q", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        k: p.f32("k", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        v: p.f32("v", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        o: p.f32("o", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        probs: p.f32("probs", &[s.b, s.h, s.n, s.n], Pool::Activations),
    };
    (qkv, out, buf)
}

fn attention_fwd(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let mut p = Plan::new();
    let (qkv, out, buf) = attention_plan(&mut p, s);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    tw.poison(&[out, buf.q, buf.k, buf.v, buf.o, buf.probs])?;
    tw.run(|rt| attention_forward(rt, out, qkv, &buf, s))?;
    for t in [out, buf.probs, buf.q, buf.k, buf.v, buf.o] {
        cx.compare(&tw, t)?;
    }
    Ok(())
}

/// The backward in isolation: the forward runs on the CPU and its saved tensors are copied across.
fn attention_bwd(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let (qkv, out, buf) = attention_plan(&mut p, s);
    let dout = p.f32("dout", &[s.b, s.n, d], Pool::Scratch);
    let dqkv = p.f32("dqkv", &[s.b, s.n, 3 * d], Pool::Scratch);
    let dscores = p.f32("dscores", &[s.b, s.h, s.n, s.n], Pool::Scratch);
    let dtmp = p.f32("dtmp", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    attention_forward(&tw.cpu, out, qkv, &buf, s)?;
    for t in [buf.q, buf.k, buf.v, buf.o, buf.probs] {
        tw.copy_to_dev(t)?;
    }
    cx.input(&tw, dout, 1.0)?;
    tw.poison(&[dqkv, dscores, dtmp])?;
    tw.run(|rt| attention_backward(rt, dqkv, dout, &buf, dscores, dtmp, s))?;
    cx.compare(&tw, dqkv)?;
    // dv lands in buf.o; dscores holds dS: both are part of the contract the model relies on.
    cx.compare_as(&tw, buf.o, "o (dv, head-major)")?;
    cx.compare(&tw, dscores)
}

/// Odd image sizes whose height and width are not multiples of the patch (the remainder is ignored).
const GEOM: PatchGeom = PatchGeom { b: 2, c: 3, h: 37, w: 50, p: 7 };

fn patchify_check(cx: &mut Case) -> Result<()> {
    let g = GEOM;
    let mut p = Plan::new();
    let img = p.f32("img", &[g.b, g.c, g.h, g.w], Pool::Activations);
    let out = p.f32("patches", &[g.b * g.patches(), g.patch_dim()], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, img, 1.0)?;
    tw.poison(&[out])?;
    tw.run(|rt| patchify(rt, out, img, g))?;
    cx.compare(&tw, out)
}

/// Tokens of the embedding checks: batch 3, cls + 35 patches, width 771.
const EMB: (usize, usize, usize) = (3, 36, 771);

fn embed_fwd(cx: &mut Case) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let patch_out = p.f32("patch_out", &[b * (t - 1), d], Pool::Activations);
    let cls = p.f32("cls", &[d], Pool::Frozen);
    let pos = p.f32("pos", &[t, d], Pool::Frozen);
    let x = p.f32("x", &[b, t, d], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, patch_out, 1.0)?;
    cx.input(&tw, cls, 1.0)?;
    cx.input(&tw, pos, 1.0)?;
    tw.poison(&[x])?;
    tw.run(|rt| embed_forward(rt, x, patch_out, cls, pos, b, t, d))?;
    cx.compare(&tw, x)
}

/// dcls and dpos accumulate (random start); dpatch is written. `all`: every gradient, else dpos alone.
fn embed_bwd(cx: &mut Case, all: bool) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let dx = p.f32("dx", &[b, t, d], Pool::Scratch);
    let dcls = p.f32("dcls", &[d], Pool::Grads);
    let dpos = p.f32("dpos", &[t, d], Pool::Grads);
    let dpatch = p.f32("dpatch", &[b * (t - 1), d], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, dx, 1.0)?;
    cx.input(&tw, dcls, 1.0)?;
    cx.input(&tw, dpos, 1.0)?;
    tw.poison(&[dpatch])?;
    if all {
        tw.run(|rt| embed_backward(rt, Some(dcls), Some(dpos), Some(dpatch), dx, b, t, d))?;
        for t in [dcls, dpos, dpatch] {
            cx.compare(&tw, t)?;
        }
        Ok(())
    } else {
        tw.run(|rt| embed_backward(rt, None, Some(dpos), None, dx, b, t, d))?;
        cx.compare(&tw, dpos)?;
        cx.compare_as(&tw, dcls, "dcls (untouched)")
    }
}

fn cls_rows(cx: &mut Case, scatter: bool) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let x = p.f32("x", &[b, t, d], Pool::Activations);
    let feat = p.f32("cls_rows", &[b, d], Pool::Activations);
    let tw = cx.twin(p)?;
    if scatter {
        cx.input(&tw, feat, 1.0)?;
        tw.poison(&[x])?; // every row is written: the cls rows, zeros elsewhere
        tw.run(|rt| cls_scatter(rt, x, feat, b, t, d))?;
        cx.compare_as(&tw, x, "dx")
    } else {
        cx.input(&tw, x, 1.0)?;
        tw.poison(&[feat])?;
        tw.run(|rt| cls_gather(rt, feat, x, b, t, d))?;
        cx.compare(&tw, feat)
    }
}

/// Three EMA steps (fresh gradients each) from a non-zero state; a few NaN parameters count as 0.
fn importance_check(cx: &mut Case) -> Result<()> {
    let n = ELEMENTS;
    let mut p = Plan::new();
    let ipt = p.f32("ipt", &[n], Pool::Optimizer);
    let unc = p.f32("unc", &[n], Pool::Optimizer);
    let param = p.f32("param", &[n], Pool::Trainable);
    let grad = p.f32("grad", &[n], Pool::Grads);
    let tw = cx.twin(p)?;
    let abs = |v: Vec<f32>| v.into_iter().map(f32::abs).collect::<Vec<_>>();
    let v = abs(cx.randn(n, 0.1));
    tw.upload(ipt, &v)?;
    let v = abs(cx.randn(n, 0.1));
    tw.upload(unc, &v)?;
    let mut pv = cx.randn(n, 1.0);
    for _ in 0..11 {
        let i = cx.below(n);
        pv[i] = f32::NAN;
    }
    tw.upload(param, &pv)?;
    for _ in 0..3 {
        cx.input(&tw, grad, 1.0)?;
        tw.run(|rt| importance_update(rt, ipt, unc, param, grad, 0.85, 0.85))?;
    }
    cx.compare(&tw, ipt)?;
    cx.compare(&tw, unc)
}

/// bf16 storage at a recompute level.
fn bf16(recompute: Recompute) -> MemoryOptions {
    MemoryOptions { recompute, precision: crate::model::Precision::Bf16 }
}

/// Three training steps of a golden case on the CPU and on the device, compared tensor by tensor.
/// Tensors the manifest lists as rounding noise (exactly zero in exact arithmetic) are compared in absolute
/// terms: 1e-6 for gradients, 2·lr per step for parameters (AdamW turns noise into ±lr steps).
fn model_step(cx: &mut Case, case: &str, memory: impl Into<MemoryOptions>) -> Result<()> {
    let memory = memory.into();
    let g = GoldenCase::load(&golden_dir(), case)?;
    let mut cpu = g.build_model(Backend::Cpu, memory)?;
    let mut dev = g.build_model(Backend::new(cx.dev)?, memory)?;
    let names = g.trainable();
    let alloc = match cpu.method {
        Method::Kernel(k) if k.allocator => Some(Allocator::new(&cpu, AllocatorConfig::default())?),
        _ => None,
    };
    let (lr, wd, steps) = (1e-3, 0.05, 3);
    let noise_tol = |cx: &mut Case, name: String, want: &[f32], got: &[f32], abs: f64| {
        let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
        cx.compare_values(name, want, got, Some(abs / scale));
    };
    for step in 0..steps {
        let (lc, ld) = (cpu.forward()?, dev.forward()?);
        cx.compare_values(format!("step{step}.loss"), &[lc], &[ld], None);
        if step == 0 {
            cx.compare_values("logits", &cpu.logits()?, &dev.logits()?, None);
            cx.compare_values("thresholds", &cpu.thresholds()?, &dev.thresholds()?, None);
        }
        cpu.backward()?;
        dev.backward()?;
        if step == 0 {
            for n in &names {
                let (want, got) = (cpu.get_grad(n)?, dev.get_grad(n)?);
                if g.noise_ranges(n).iter().map(|(a, b)| b - a).sum::<usize>() == want.len() {
                    noise_tol(cx, format!("grad.{n} (noise)"), &want, &got, 1e-6);
                } else {
                    cx.compare_values(format!("grad.{n}"), &want, &got, None);
                }
            }
        }
        cpu.adamw_step(lr, wd)?;
        dev.adamw_step(lr, wd)?;
        if let Some(a) = &alloc {
            a.update(&cpu)?;
            a.update(&dev)?;
        }
    }
    for n in &names {
        let (want, got) = (cpu.get_param(n)?, dev.get_param(n)?);
        if g.noise_ranges(n).is_empty() {
            cx.compare_values(format!("param.{n} after {steps} steps"), &want, &got, None);
        } else {
            noise_tol(cx, format!("param.{n} after {steps} steps (noise)"), &want, &got, 2.0 * lr * steps as f64);
        }
    }
    if let Some(a) = &alloc {
        cx.compare_values("allocator scores", &a.scores(&cpu)?, &a.scores(&dev)?, None);
    }
    dev.rt.sync()
}

/// Dropout (group 1) or drop-path (one decision per `group` elements), out of place and in place.
fn dropout_check(cx: &mut Case, group: usize) -> Result<()> {
    let n = if group == 1 { 37 * 1013 } else { 37 * group };
    let mut p = Plan::new();
    let x = p.f32("x", &[n], Pool::Activations);
    let y = p.f32("y", &[n], Pool::Activations);
    let z = p.f32("z (in place)", &[n], Pool::Activations);
    let tw = cx.twin(p)?;
    let v = cx.input(&tw, x, 1.0)?;
    tw.upload(z, &v)?;
    tw.poison(&[y])?;
    let seed = cx.below(1 << 30) as u64;
    tw.run(|rt| {
        if group == 1 {
            crate::ops::dropout::dropout(rt, y, x, 0.3, seed, 5)?;
            crate::ops::dropout::dropout(rt, z, z, 0.3, seed, 5)
        } else {
            crate::ops::dropout::drop_path(rt, y, x, group, 0.3, seed, 5)?;
            crate::ops::dropout::drop_path(rt, z, z, group, 0.3, seed, 5)
        }
    })?;
    cx.compare(&tw, y)?;
    cx.compare(&tw, z)
}

/// [`model_step`] of snella_tiny with branch dropout 0.1, branch drop-path 0.1 and block drop-path 0.1.
fn model_step_dropout(cx: &mut Case) -> Result<()> {
    let g = GoldenCase::load(&golden_dir(), "snella_tiny")?;
    let Method::Kernel(k) = g.method()? else { unreachable!() };
    let method = Method::Kernel(crate::peft::KernelMethod { dropout: 0.1, drop_path: 0.1, ..k });
    let mut cpu = g.build_model_with(Backend::Cpu, Recompute::Attention, method)?;
    let mut dev = g.build_model_with(Backend::new(cx.dev)?, Recompute::Attention, method)?;
    for m in [&mut cpu, &mut dev] {
        m.block_drop_path = 0.1;
        m.reg_seed = 7;
    }
    for step in 0..2 {
        let (lc, ld) = (cpu.forward()?, dev.forward()?);
        cx.compare_values(format!("step{step}.loss"), &[lc], &[ld], None);
        cpu.backward()?;
        dev.backward()?;
        for n in g.trainable() {
            if n.ends_with("attn.k.beta") {
                continue; // ~0 by softmax's shift invariance: rounding noise on both devices
            }
            cx.compare_values(format!("step{step}.grad.{n}"), &cpu.get_grad(&n)?, &dev.get_grad(&n)?, None);
        }
        cpu.adamw_step(1e-3, 0.05)?;
        dev.adamw_step(1e-3, 0.05)?;
    }
    dev.rt.sync()
}

/// Odd, spanning many blocks of 256.
const BF16_ELEMENTS: usize = 37 * 1013;

/// f32 values that exercise bf16 rounding, all of which round to finite bf16 values (an infinity would
/// fail the comparison): exact ties of every exponent, their neighbours one f32 step off, values from the
/// f32 subnormals up to 2^120, N(0, 1) values, signed zeros and the largest values short of overflow.
fn bf16_test_values(cx: &mut Case, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            let sign = if cx.below(2) == 0 { 0 } else { 0x8000_0000u32 };
            // Kept parts up to 0x7F7E: even at the top, so no tie there rounds up to infinity.
            let tie = sign | (cx.below(0x7F7F) as u32) << 16 | 0x8000;
            match i % 4 {
                0 => f32::from_bits(tie),
                1 => f32::from_bits(if cx.below(2) == 0 { tie + 1 } else { tie - 1 }),
                2 => cx.randn(1, 1.0)[0] * 2f32.powi(cx.below(266) as i32 - 145),
                _ => cx.randn(1, 1.0)[0],
            }
        })
        .collect();
    let edges = [
        0.0,
        -0.0,
        f32::from_bits(0x0000_0001),
        f32::from_bits(0x8000_8000),
        f32::from_bits(0x0001_8000),
        f32::from_bits(0x007F_FFFF),
        f32::from_bits(0x7F7F_0000),
        f32::from_bits(0x7F7F_7FFF),
        f32::from_bits(0xFF7F_7FFF),
    ];
    for (i, e) in edges.into_iter().enumerate() {
        v[n - 1 - 97 * i] = e; // spread over the last blocks, the tail included
    }
    v
}

/// dst = f32(src) from bf16 values uploaded (rounded on the host) to both sides.
fn bf16_widen_check(cx: &mut Case) -> Result<()> {
    let n = BF16_ELEMENTS;
    let mut p = Plan::new();
    let src = p.add("src (bf16)", &[n], DType::BF16, Pool::Frozen);
    let dst = p.f32("dst", &[n], Pool::Activations);
    let tw = cx.twin(p)?;
    let v = bf16_test_values(cx, n);
    tw.upload(src, &v)?;
    tw.poison(&[dst])?;
    tw.run(|rt| bf16_widen(rt, dst, src))?;
    cx.compare(&tw, dst)?;
    cx.compare_bits(&tw, dst)
}

/// dst = bf16(x) and x = f32(dst) in place.
fn bf16_round_check(cx: &mut Case) -> Result<()> {
    let n = BF16_ELEMENTS;
    let mut p = Plan::new();
    let x = p.f32("x (rounded in place)", &[n], Pool::Activations);
    let dst = p.add("dst (bf16)", &[n], DType::BF16, Pool::Activations);
    let tw = cx.twin(p)?;
    let v = bf16_test_values(cx, n);
    tw.upload(x, &v)?;
    tw.poison(&[dst])?;
    tw.run(|rt| bf16_round(rt, dst, x))?;
    cx.compare(&tw, dst)?;
    cx.compare_bits(&tw, dst)?;
    cx.compare(&tw, x)?;
    cx.compare_bits(&tw, x)
}

fn mask_grad_check(cx: &mut Case) -> Result<()> {
    let n = ELEMENTS;
    let mut p = Plan::new();
    let grad = p.f32("grad", &[n], Pool::Grads);
    let mask = p.add("mask", &[n], DType::U8, Pool::Frozen);
    let tw = cx.twin(p)?;
    cx.input(&tw, grad, 1.0)?;
    // Half zeros; any non-zero byte keeps the entry, not only 1.
    let mv: Vec<u8> = (0..n).map(|_| if cx.below(2) == 0 { 0 } else { 1 + cx.below(255) as u8 }).collect();
    tw.upload_u8(mask, &mv)?;
    tw.run(|rt| mask_grad(rt, grad, mask))?;
    cx.compare(&tw, grad)
}

/// Shapes (n_in, n_out, d) and factor scales of the merge checks: a ViT-like branch at a kaiming-like
/// initial scale, and an odd d > 32 (wider than a tile row) at a trained-like scale.
const MERGE_SHAPES: [(usize, usize, usize, f32); 2] = [(173, 301, 8, 0.0), (67, 45, 33, 0.3)];

fn merge_scale(n_in: usize, d: usize, scale: f32) -> f32 {
    if scale > 0.0 {
        scale
    } else {
        1.0 / ((n_in * d) as f32).sqrt()
    }
}

/// The three mixture scalars [alpha, gamma, beta], drawn around the official initial values.
fn mix_values(cx: &mut Case) -> [f32; 3] {
    [cx.uniform(0.5, 1.5) as f32, cx.uniform(0.5, 1.0) as f32, cx.uniform(-0.3, 0.3) as f32]
}

struct MergeSetup {
    f: Factors,
    mix: [Tensor; 3],
    s: MergeScratch,
}

fn merge_plan(p: &mut Plan, n_in: usize, n_out: usize, d: usize) -> MergeSetup {
    p.add_cublas_workspace();
    let a = p.f32("in_qs", &[2, n_in, d], Pool::Trainable);
    let b = p.f32("out_qs", &[2, n_out, d], Pool::Trainable);
    let mix = ["alpha", "gamma", "beta"].map(|n| p.f32(n, &[1], Pool::Trainable));
    let s = MergeScratch::plan(p, "selftest", n_in, n_out, d);
    MergeSetup { f: Factors { a, b, mix: None, n_in, n_out, d }, mix, s }
}

fn merge_inputs(cx: &mut Case, tw: &Twin, st: &MergeSetup, scale: f32) -> Result<()> {
    cx.input(tw, st.f.a, scale)?;
    cx.input(tw, st.f.b, scale)?;
    let mv = mix_values(cx);
    for (t, v) in st.mix.iter().zip(mv) {
        tw.upload(*t, &[v])?;
    }
    let s = &st.s;
    tw.poison(&[s.k, s.aug_a, s.aug_b, s.tmp_a, s.tmp_b, s.mix_part])
}

/// M = K(A, B), and M = K + α·softmax(K/γ) + β, for each shape.
fn merge_fwd(cx: &mut Case, kind: KernelKind) -> Result<()> {
    for (n_in, n_out, d, scale) in MERGE_SHAPES {
        let mut p = Plan::new();
        let st = merge_plan(&mut p, n_in, n_out, d);
        let m = p.f32(format!("M ({n_in}x{n_out}, d {d})"), &[n_in, n_out], Pool::Scratch);
        let m_mix = p.f32(format!("M mixture ({n_in}x{n_out}, d {d})"), &[n_in, n_out], Pool::Scratch);
        let tw = cx.twin(p)?;
        merge_inputs(cx, &tw, &st, merge_scale(n_in, d, scale))?;
        tw.poison(&[m, m_mix])?;
        let mixed = Factors { mix: Some(st.mix), ..st.f };
        tw.run(|rt| {
            merge_forward(rt, m, &st.f, kind, &st.s)?;
            merge_forward(rt, m_mix, &mixed, kind, &st.s)
        })?;
        cx.compare(&tw, m)?;
        cx.compare(&tw, m_mix)?;
    }
    Ok(())
}

/// The merge backward from a random dL/dM, for each shape: without the mixture, with it (dα, dγ, dβ
/// too), and with a frozen mixture (no scalar gradients). Factor gradients accumulate from random values.
fn merge_bwd(cx: &mut Case, kind: KernelKind) -> Result<()> {
    for (n_in, n_out, d, scale) in MERGE_SHAPES {
        let mut p = Plan::new();
        let st = merge_plan(&mut p, n_in, n_out, d);
        let g = p.f32("dM", &[n_in, n_out], Pool::Scratch);
        let variants = ["plain", "mixture", "frozen mixture"].map(|v| {
            let da = p.f32(format!("d_in_qs {v} ({n_in}x{n_out}, d {d})"), &[2, n_in, d], Pool::Grads);
            let db = p.f32(format!("d_out_qs {v} ({n_in}x{n_out}, d {d})"), &[2, n_out, d], Pool::Grads);
            (da, db)
        });
        let dmix =
            ["d_alpha", "d_gamma", "d_beta"].map(|n| p.f32(format!("{n} ({n_in}x{n_out}, d {d})"), &[1], Pool::Grads));
        let k = p.f32("K (for dM)", &[n_in, n_out], Pool::Scratch);
        let tw = cx.twin(p)?;
        merge_inputs(cx, &tw, &st, merge_scale(n_in, d, scale))?;
        // dM = 1 + noise + 2·K/std(K). With a zero-mean dM the three scalar gradients are sums that
        // cancel to ~0 by chance, and a relative comparison of them would fail at random; the offset
        // gives dβ = ΣdM and dα = ΣdM·S a size, the part along K gives dγ (a covariance with K) one.
        merge_forward(&tw.cpu, k, &st.f, kind, &st.s)?;
        let kv = tw.cpu.download(k)?;
        let mean = kv.iter().map(|&x| x as f64).sum::<f64>() / kv.len() as f64;
        let std = (kv.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / kv.len() as f64).sqrt().max(1e-30);
        let noise = cx.randn(n_in * n_out, 1.0);
        let gv: Vec<f32> =
            noise.iter().zip(&kv).map(|(&z, &kx)| 1.0 + z + (2.0 * (kx as f64 - mean) / std) as f32).collect();
        for (da, db) in variants {
            cx.input(&tw, da, 1.0)?;
            cx.input(&tw, db, 1.0)?;
        }
        for t in dmix {
            tw.upload(t, &[0.0])?;
        }
        let mixed = Factors { mix: Some(st.mix), ..st.f };
        for (v, (da, db)) in variants.into_iter().enumerate() {
            tw.upload(g, &gv)?; // the backward overwrites dM
            let (f, dm) = match v {
                0 => (st.f, None),
                1 => (mixed, Some(dmix)),
                _ => (mixed, None),
            };
            tw.run(|rt| merge_backward(rt, da, db, dm, g, &f, kind, &st.s))?;
            cx.compare(&tw, da)?;
            cx.compare(&tw, db)?;
        }
        // Scalars summed over every entry of M (in another order on each side): looser than the factors.
        for t in dmix {
            cx.compare_tol(&tw, t, 1e-4)?;
        }
    }
    Ok(())
}

/// About 300k entries (a ViT-B fc1 branch is 768x3072 = 2.4M; this keeps the CPU side quick).
const COMPETE_SHAPE: (usize, usize) = (587, 511);

/// Threshold, M_s (out of place and in place), kept count, and the backward (out of place and in
/// place) at sparsity s, on an M with exact ties and zeros (the strict > must agree on them).
fn sparsify_check(cx: &mut Case, s: f32) -> Result<()> {
    let n = COMPETE_SHAPE.0 * COMPETE_SHAPE.1;
    let mut p = Plan::new();
    let m = p.f32("M", &[n], Pool::Scratch);
    let ms = p.f32("M_s", &[n], Pool::Scratch);
    let t = p.f32("t", &[1], Pool::Scratch);
    let m2 = p.f32("M_s (in place)", &[n], Pool::Scratch);
    let t2 = p.f32("t (in place)", &[1], Pool::Scratch);
    let dms = p.f32("dM_s", &[n], Pool::Scratch);
    let dm = p.f32("dM", &[n], Pool::Scratch);
    let dms2 = p.f32("dM (in place)", &[n], Pool::Scratch);
    let sc = CompeteScratch::plan(&mut p, "selftest", n);
    let tw = cx.twin(p)?;
    let mut mv = cx.randn(n, 0.02);
    for _ in 0..n / 100 {
        let (i, j) = (cx.below(n), cx.below(n));
        mv[i] = if cx.below(2) == 0 { mv[j] } else { -mv[j] };
    }
    for _ in 0..7 {
        let i = cx.below(n);
        mv[i] = 0.0;
    }
    tw.upload(m, &mv)?;
    tw.upload(m2, &mv)?;
    tw.poison(&[ms, t, t2, dm, sc.hist, sc.state])?;
    tw.run(|rt| sparsify_forward(rt, ms, t, m, s, &sc))?;
    cx.compare(&tw, t)?;
    cx.compare(&tw, ms)?;
    let (kc, kd) = (kept_count(&tw.cpu, m, t)?, kept_count(&tw.dev, m, t)?);
    cx.compare_values("kept_count", &[kc as f32], &[kd as f32], Some(0.0));
    tw.poison(&[sc.hist, sc.state])?;
    tw.run(|rt| sparsify_forward(rt, m2, t2, m2, s, &sc))?;
    cx.compare(&tw, t2)?;
    cx.compare(&tw, m2)?;
    // The backward in isolation: both sides get the CPU's threshold.
    tw.copy_to_dev(t)?;
    cx.input(&tw, dms, 1.0)?;
    tw.run(|rt| sparsify_backward(rt, dm, dms, m, t))?;
    cx.compare(&tw, dm)?;
    tw.upload(dms2, &tw.cpu.download(dms)?)?;
    tw.run(|rt| sparsify_backward(rt, dms2, dms2, m, t))?;
    cx.compare(&tw, dms2)
}

/// W = W0 + M_sᵀ, into a fresh tensor and in place.
fn add_transposed_check(cx: &mut Case) -> Result<()> {
    let (n_in, n_out) = (301, 769);
    let mut p = Plan::new();
    let w0 = p.f32("W0", &[n_out, n_in], Pool::Frozen);
    let ms = p.f32("M_s", &[n_in, n_out], Pool::Scratch);
    let w = p.f32("W", &[n_out, n_in], Pool::Scratch);
    let w_in_place = p.f32("W (in place)", &[n_out, n_in], Pool::Scratch);
    let tw = cx.twin(p)?;
    let w0v = cx.input(&tw, w0, 1.0)?;
    cx.input(&tw, ms, 0.1)?;
    tw.upload(w_in_place, &w0v)?;
    tw.poison(&[w])?;
    tw.run(|rt| {
        add_transposed(rt, w, w0, ms, n_in, n_out)?;
        add_transposed(rt, w_in_place, w_in_place, ms, n_in, n_out)
    })?;
    cx.compare(&tw, w)?;
    cx.compare(&tw, w_in_place)
}

#[cfg(test)]
mod tests {
    use super::*;

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
