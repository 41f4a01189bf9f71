//! The kernelized merge of SNELL / SNELLA: the dense update M (in × out) of one branch, built from its
//! low-rank factors, and the backward of that merge. CUDA twin: `cuda/kmerge.cu`.
//!
//! Factors (method.md §2): A = In_Qs (2, n_in, d) and B = Out_Qs (2, n_out, d), d = r/2, H = 2 "pieces".
//! Write A_h,i for row i of piece h, and a_i = [A_0,i, A_1,i] (r values) for the two pieces side by
//! side; likewise B_h,j and b_j. Per piece, p_h = A_h,i·B_h,j, and p = p_0 + p_1 = a_i·b_j.
//!
//! Kernels ([`KernelKind`], K is (n_in, n_out)):
//! * `PiecewiseLinear` (the official SNELL kernel, the only one in the released code):
//!   K = 0.1·D_0 − 0.1·D_1 with D_h = ‖A_h,i − B_h,j‖₂ computed as torch.cdist's matmul path does,
//!   D_h = sqrt(max(0, (−2·p_h + ‖A_h,i‖²) + ‖B_h,j‖²)) in fp32 (a direct Σ(a−b)² is *not* the same
//!   numerically). The ±0.1 are fixed fp32 constants.
//! * `Linear`: K = a_i·b_j, the plain low-rank product (LoRA-like, rank r).
//! * `Rbf`: K = exp(−‖a_i − b_j‖² / r) − 1, bandwidth σ² = r/2 over the r-dim rows; ‖·‖² by the same
//!   expanded form (clamped at 0) and `exp_m1`. The −1 shift (a constant, the role β plays in the
//!   mixture) makes K → 0 as the factors shrink, like every other kernel here: unshifted, a near-zero
//!   initialisation would add an all-ones matrix to the frozen weight.
//! * `Sigmoid`: K = tanh(a_i·b_j) (the sigmoid kernel tanh(x·x' + c) with c = 0, odd and 0 at 0).
//! * `Poly`: K = (a_i·b_j + 1)² − 1 = p·(p + 2) (degree-2 polynomial kernel minus its constant;
//!   evaluated as p·(p + 2) to avoid the cancellation of (p+1)² − 1 for the tiny p of a kaiming init).
//!
//! Mixture (SNELLA / MixK, method.md §3), on top of any kernel: M = K + α·softmax_row(K/γ) + β, the softmax
//! over the out index j of each input row i; α, γ, β are 1-element device tensors (never read on the host).
//!
//! Backward (method.md §7). With G = dL/dM: dβ = ΣG, dα = ΣG·S, u = S·(αG − rowsum(αG·S)),
//! dK = G + u/γ, dγ = −Σu·K/γ². Then a ratio R per kind turns dK into factor gradients:
//! * distance kernels (`PiecewiseLinear` per piece with R_h = c_h·dK / D_h (0 where D_h = 0, as torch's
//!   `_euclidean_dist_backward`); `Rbf` with R = dK·(−2/r)·exp(−‖a−b‖²/r), shared by both pieces):
//!   dA_h = A_h·rowsum(R_h) − R_h·B_h,  dB_h = B_h·colsum(R_h) − R_hᵀ·A_h;
//! * inner-product kernels (R = dK·f'(p): 1, 1 − K², 2(p + 1)): dA_h = R·B_h, dB_h = Rᵀ·A_h.
//!
//! The row/column sums ride along the products: R·[B_h | 1] (n_in, d+1) gives R·B_h and rowsum(R) at once,
//! Rᵀ·[A_h | 1] gives Rᵀ·A_h and colsum(R) (the CPU takes R·B_h and rowsum(R) apart, and [A_h | 1]ᵀ·R, in
//! shapes its GEMM kernels fill: step 3 of [`merge_backward`]). Nothing of the forward is kept: the backward
//! recomputes K (mixture only) and the distances from the factors, which is the memory design of the method
//! (method.md §6).
//! On the CPU the pass that recomputes K and R also recomputes M, masks ∂L/∂M_s and writes M_sᵀ into the
//! merged weight ([`Along`], [`cpu::backward`]), so a Linear's backward builds its M once.
use cudarc::driver::LaunchConfig;

use crate::error::Result;
use crate::ops::sparsify::{add_transposed, sparsify_apply, sparsify_backward};
use crate::ops::{matmul, Matmul};
use crate::runtime::cuda::{grid_1d, grid_rows, KArg};
use crate::runtime::{Backend, Plan, Pool, Runtime, Tensor};

pub(crate) mod cpu;

/// Number of pieces of the factors (`num_Hs`, hard-coded 2 in the official code).
pub const PIECES: usize = 2;
/// The fixed coefficients of the piecewise-linear kernel (`shared_coeff_fc` = 0.1·[+1, −1]).
pub const PL_COEFF: [f32; 2] = [0.1, -0.1];
/// Largest d = r/2 the CUDA tiles are sized for (shared memory of the merge kernels).
pub const MAX_D: usize = 128;

/// Which kernel κ(a_i, b_j) builds K; see the module documentation for the exact definitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum KernelKind {
    /// 0.1·‖A_0,i − B_0,j‖ − 0.1·‖A_1,i − B_1,j‖ (official SNELL / SNELLA).
    PiecewiseLinear,
    /// a_i·b_j.
    Linear,
    /// exp(−‖a_i − b_j‖²/r) − 1.
    Rbf,
    /// tanh(a_i·b_j).
    Sigmoid,
    /// (a_i·b_j + 1)² − 1.
    Poly,
}

impl KernelKind {
    /// The `kind` argument of the CUDA kernels (`KIND_*` in `cuda/kmerge.cu`).
    fn code(self) -> i32 {
        match self {
            KernelKind::PiecewiseLinear => 0,
            KernelKind::Linear => 1,
            KernelKind::Rbf => 2,
            KernelKind::Sigmoid => 3,
            KernelKind::Poly => 4,
        }
    }

    /// Distance kernels have the backward a·rowsum(R) − R·B; the others R·B.
    fn is_distance(self) -> bool {
        matches!(self, KernelKind::PiecewiseLinear | KernelKind::Rbf)
    }
}

/// Factors of one branch. a = In_Qs (2, n_in, d), b = Out_Qs (2, n_out, d), d = r/2.
/// mix = Some([alpha, gamma, beta]) (each a 1-element tensor) for the SNELLA/MixK mixture.
#[derive(Clone, Copy, Debug)]
pub struct Factors {
    pub in_qs: Tensor,
    pub out_qs: Tensor,
    pub mix: Option<[Tensor; 3]>,
    pub n_in: usize,
    pub n_out: usize,
    /// r/2: the length of each factor row (the d of the formulas above).
    pub half_rank: usize,
}

impl Factors {
    fn check(&self) {
        assert_eq!(
            self.in_qs.numel,
            PIECES * self.n_in * self.half_rank,
            "kmerge: In_Qs must be (2, {}, {})",
            self.n_in,
            self.half_rank
        );
        assert_eq!(
            self.out_qs.numel,
            PIECES * self.n_out * self.half_rank,
            "kmerge: Out_Qs must be (2, {}, {})",
            self.n_out,
            self.half_rank
        );
        assert!(self.half_rank >= 1 && self.half_rank <= MAX_D, "kmerge: d = {} outside 1..={MAX_D}", self.half_rank);
        if let Some(mix) = &self.mix {
            assert!(mix.iter().all(|t| t.numel == 1), "kmerge: alpha, gamma, beta are 1-element tensors");
        }
    }
    /// Piece h of A: (n_in, d).
    fn a_piece(&self, h: usize) -> Tensor {
        self.in_qs.slice(h * self.n_in * self.half_rank, self.n_in * self.half_rank)
    }
    /// Piece h of B: (n_out, d).
    fn b_piece(&self, h: usize) -> Tensor {
        self.out_qs.slice(h * self.n_out * self.half_rank, self.n_out * self.half_rank)
    }
}

/// Scratch of one merge backward (the forward needs none). All of it is in `Pool::Scratch`, in the
/// plan's current scope; it is dead once `merge_backward` returns.
pub struct MergeScratch {
    /// K recomputed for the mixture backward, then reused as R_0 of the piecewise-linear kernel. (n_in, n_out)
    pub k: Tensor,
    /// [A_h | 1].                                                        (n_in, d+1)
    pub aug_a: Tensor,
    /// [B_h | 1].                                                        (n_out, d+1)
    pub aug_b: Tensor,
    /// R_h·[B_h | 1]: R_h·B_h and rowsum(R_h).                           (n_in, d+1)
    pub tmp_a: Tensor,
    /// R_hᵀ·[A_h | 1]: R_hᵀ·A_h and colsum(R_h).            (n_out, d+1); the CPU stores it transposed, (d+1, n_out)
    pub tmp_b: Tensor,
    /// Per-row sums of the mixture backward: ΣG, ΣG·S, Σu·K.            (3, n_in)
    pub mix_part: Tensor,
    pub n_in: usize,
    pub n_out: usize,
    pub d: usize,
}

impl MergeScratch {
    pub fn plan(plan: &mut Plan, prefix: &str, n_in: usize, n_out: usize, d: usize) -> MergeScratch {
        let k = plan.f32(format!("{prefix}.kmerge.K"), &[n_in, n_out], Pool::Scratch);
        MergeScratch::plan_with_k(plan, prefix, n_in, n_out, d, k)
    }

    /// The scratch with K in a buffer the caller owns (n_in, n_out): the model lends it M's, which is dead by
    /// the time the backward needs K.
    pub fn plan_with_k(plan: &mut Plan, prefix: &str, n_in: usize, n_out: usize, d: usize, k: Tensor) -> MergeScratch {
        assert!(k.numel >= n_in * n_out, "kmerge: K needs {n_in}x{n_out} entries");
        let k = k.slice(0, n_in * n_out);
        let sc = Pool::Scratch;
        MergeScratch {
            k,
            aug_a: plan.f32(format!("{prefix}.kmerge.aug_a"), &[n_in, d + 1], sc),
            aug_b: plan.f32(format!("{prefix}.kmerge.aug_b"), &[n_out, d + 1], sc),
            tmp_a: plan.f32(format!("{prefix}.kmerge.tmp_a"), &[n_in, d + 1], sc),
            tmp_b: plan.f32(format!("{prefix}.kmerge.tmp_b"), &[n_out, d + 1], sc),
            mix_part: plan.f32(format!("{prefix}.kmerge.mix_part"), &[3, n_in], sc),
            n_in,
            n_out,
            d,
        }
    }

    fn check(&self, f: &Factors) {
        assert!(
            self.n_in == f.n_in && self.n_out == f.n_out && self.d == f.half_rank,
            "kmerge: scratch planned for ({}, {}, {}), factors are ({}, {}, {})",
            self.n_in,
            self.n_out,
            self.d,
            f.n_in,
            f.n_out,
            f.half_rank
        );
    }
}

/// M = kernel(A, B) [+ alpha * softmax_over_out(K / gamma) + beta].      m: (n_in, n_out)
pub fn merge_forward(rt: &Runtime, m: Tensor, f: &Factors, kind: KernelKind, s: &MergeScratch) -> Result<()> {
    f.check();
    s.check(f);
    assert_eq!(m.numel, f.n_in * f.n_out, "kmerge: M must be ({}, {})", f.n_in, f.n_out);
    if let Backend::Cpu = rt.backend {
        // One pass: each row's kernel values and its mixture while the row is in cache.
        let mix = f.mix.map(|[al, gm, be]| [rt.f32(al)[0], rt.f32(gm)[0], rt.f32(be)[0]]);
        let (a, b) = (rt.f32(f.in_qs), rt.f32(f.out_qs));
        cpu::forward(rt.f32_mut(m), a, b, f.n_in, f.n_out, f.half_rank, kind, mix);
        return Ok(());
    }
    kernel_forward(rt, m, f, kind)?;
    if let Some(mix) = f.mix {
        mix_forward(rt, m, mix, f.n_in, f.n_out)?;
    }
    Ok(())
}

/// What a merge backward also does with the M it recomputes, so that a Linear's backward passes over M
/// once (method.md §5–§7).
#[derive(Clone, Copy, Debug, Default)]
pub struct Along {
    /// A sparse branch's threshold t (1): g comes in as ∂L/∂M_s and is masked to ∂L/∂M = g·|M|·1[|M| > t]
    /// first. None: g is ∂L/∂M already.
    pub threshold: Option<Tensor>,
    /// The merged weight (dst, src), both fp32 (n_out, n_in): dst := src + M_sᵀ (M_s with a threshold, M
    /// without); src may be dst.
    pub weight: Option<(Tensor, Tensor)>,
}

/// Given g = dL/dM (n_in, n_out) (or dL/dM_s with `along.threshold`; overwritten), ACCUMULATES (+=) into
/// d_in_qs (2, n_in, d), d_out_qs (2, n_out, d) and, with the mixture, dmix = [dalpha, dgamma, dbeta] (1 each);
/// with `along.weight` it also builds the merged weight. Everything needed is recomputed from the factors.
/// `dmix` may be None with `f.mix` set (frozen mixture scalars); the reverse is an error.
///
/// The CPU takes the elementwise part in one pass over the rows of M ([`cpu::backward`]), M never stored;
/// CUDA builds M in `s.k` for the threshold and the weight, then runs the backward's kernels. Both end with
/// the same GEMMs.
#[allow(clippy::too_many_arguments)]
pub fn merge_backward(
    rt: &Runtime,
    d_in_qs: Tensor,
    d_out_qs: Tensor,
    dmix: Option<[Tensor; 3]>,
    g: Tensor,
    f: &Factors,
    kind: KernelKind,
    s: &MergeScratch,
    along: Along,
) -> Result<()> {
    f.check();
    s.check(f);
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.half_rank);
    assert_eq!(g.numel, n_in * n_out, "kmerge: dM must be ({n_in}, {n_out})");
    assert_eq!(d_in_qs.numel, f.in_qs.numel, "kmerge: dIn_Qs must be shaped like In_Qs");
    assert_eq!(d_out_qs.numel, f.out_qs.numel, "kmerge: dOut_Qs must be shaped like Out_Qs");
    assert!(dmix.is_none() || f.mix.is_some(), "kmerge: dmix given for factors without a mixture");
    assert!(along.threshold.is_none_or(|t| t.numel == 1), "kmerge: the threshold is a 1-element tensor");
    if let Some((dst, src)) = along.weight {
        assert!(dst.numel == n_in * n_out && src.numel == n_in * n_out, "kmerge: W must be ({n_out}, {n_in})");
        assert!(dst != g && dst != s.k, "kmerge: W must not overwrite dM or the merge scratch");
    }
    if let Some(dm) = dmix {
        assert!(dm.iter().all(|t| t.numel == 1), "kmerge: dalpha, dgamma, dbeta are 1-element tensors");
    }

    if let Backend::Cpu = rt.backend {
        // Steps 0–2 below in one pass over the rows, the dot products of each row evaluated once, M never
        // stored: W's column i is written from row i of M_s.
        let mix = f.mix.map(|[al, gm, be]| [rt.f32(al)[0], rt.f32(gm)[0], rt.f32(be)[0]]);
        let t = along.threshold.map(|t| rt.f32(t)[0]);
        let w = along.weight.map(|(dst, src)| {
            // In place (src = dst) both pointers come from the one &mut: no shared borrow overlaps it.
            let dst_p = rt.f32_mut(dst).as_mut_ptr();
            let src_p = if src == dst { dst_p.cast_const() } else { rt.f32(src).as_ptr() };
            cpu::WeightOut { dst: dst_p, src: src_p }
        });
        let (a, b) = (rt.f32(f.in_qs), rt.f32(f.out_qs));
        cpu::backward(rt.f32_mut(g), rt.f32_mut(s.k), w, a, b, n_in, n_out, d, kind, mix, t, rt.f32_mut(s.mix_part));
        if let (Some(mix), Some(dm)) = (f.mix, dmix) {
            mix_reduce(rt, dm, mix[1], s.mix_part, n_in)?;
        }
    } else {
        // 0. M for the threshold and the weight, in s.k (free until step 1 recomputes K there).
        if along.threshold.is_some() || along.weight.is_some() {
            merge_forward(rt, s.k, f, kind, s)?;
            if let Some(t) = along.threshold {
                sparsify_backward(rt, g, g, s.k, t)?;
                sparsify_apply(rt, s.k, s.k, t)?;
            }
            if let Some((dst, src)) = along.weight {
                add_transposed(rt, dst, src, s.k, n_in, n_out)?;
            }
        }
        // 1. Mixture: g := dL/dK (K recomputed into s.k), per-row partial sums, then dα, dγ, dβ.
        if let Some(mix) = f.mix {
            kernel_forward(rt, s.k, f, kind)?;
            mix_backward(rt, g, s.k, mix, s.mix_part, n_in, n_out)?;
            if let Some(dm) = dmix {
                mix_reduce(rt, dm, mix[1], s.mix_part, n_in)?;
            }
        }
        // 2. dK -> R (in place in g; the piecewise-linear piece 0 goes to s.k, which is free now).
        if kind != KernelKind::Linear {
            ratio(rt, g, s.k, f, kind)?;
        }
    }
    // 3. Factor gradients per piece.
    for h in 0..PIECES {
        let (a_h, b_h) = (f.a_piece(h), f.b_piece(h));
        let (d_in_qs_h, d_out_qs_h) = (d_in_qs.slice(h * n_in * d, n_in * d), d_out_qs.slice(h * n_out * d, n_out * d));
        if kind.is_distance() {
            let r = if kind == KernelKind::PiecewiseLinear && h == 0 { s.k } else { g };
            augment(rt, s.aug_a, a_h, n_in, d)?;
            if let Backend::Cpu = rt.backend {
                // The same products in the shapes the gemm crate's kernels fill, where d + 1 = 17 columns take 17
                // of the 32 rows of its narrowest kernel (about twice the time): R·B_h at n = d with rowsum(R)
                // beside it, and [A_h | 1]ᵀ·R (d+1, n_out), the transpose of Rᵀ·[A_h | 1] with the same sums in
                // the same order (the same bits), read transposed by dist_grad_t.
                matmul(rt, s.tmp_a, r, b_h, Matmul::new(n_in, d, n_out, false, false).ld(0, 0, d + 1))?;
                cpu::row_sums(rt.f32_mut(s.tmp_a), rt.f32(r), n_out, d);
                dist_grad(rt, d_in_qs_h, a_h, s.tmp_a, n_in, d)?;
                matmul(rt, s.tmp_b, s.aug_a, r, Matmul::new(d + 1, n_out, n_in, true, false))?;
                cpu::dist_grad_t(rt.f32_mut(d_out_qs_h), rt.f32(b_h), rt.f32(s.tmp_b), d);
            } else {
                augment(rt, s.aug_b, b_h, n_out, d)?;
                matmul(rt, s.tmp_a, r, s.aug_b, Matmul::new(n_in, d + 1, n_out, false, false))?;
                matmul(rt, s.tmp_b, r, s.aug_a, Matmul::new(n_out, d + 1, n_in, true, false))?;
                dist_grad(rt, d_in_qs_h, a_h, s.tmp_a, n_in, d)?;
                dist_grad(rt, d_out_qs_h, b_h, s.tmp_b, n_out, d)?;
            }
        } else {
            matmul(rt, d_in_qs_h, g, b_h, Matmul::new(n_in, d, n_out, false, false).accumulate())?;
            matmul(rt, d_out_qs_h, g, a_h, Matmul::new(n_out, d, n_in, true, false).accumulate())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Steps (each dispatches on the backend)
// ---------------------------------------------------------------------------------------------------

/// Columns (out index) and rows (in index) of one CUDA block of the elementwise merge kernels.
const TILE_J: u32 = 32;
const TILE_I: u32 = 8;

/// Launch of the tiled (i, j) kernels: shared memory holds 2 pieces × TILE_I rows of A and 2 × TILE_J
/// rows of B (row stride d|1, odd, so the column reads do not conflict on banks).
fn tile_cfg(n_in: usize, n_out: usize, d: usize) -> LaunchConfig {
    let sd = d | 1;
    let floats = PIECES * (TILE_I as usize * d + TILE_J as usize * sd);
    LaunchConfig {
        grid_dim: ((n_out as u32).div_ceil(TILE_J), (n_in as u32).div_ceil(TILE_I), 1),
        block_dim: (TILE_J, TILE_I, 1),
        shared_mem_bytes: (floats * 4) as u32,
    }
}

/// out (n_in, n_out) = K(A, B).
fn kernel_forward(rt: &Runtime, out: Tensor, f: &Factors, kind: KernelKind) -> Result<()> {
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.half_rank);
    match &rt.backend {
        Backend::Cpu => cpu::forward(rt.f32_mut(out), rt.f32(f.in_qs), rt.f32(f.out_qs), n_in, n_out, d, kind, None),
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_forward",
            tile_cfg(n_in, n_out, d),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(f.in_qs)),
                KArg::Ptr(rt.ptr(f.out_qs)),
                KArg::I32(n_in as i32),
                KArg::I32(n_out as i32),
                KArg::I32(d as i32),
                KArg::I32(kind.code()),
            ],
        )?,
    }
    Ok(())
}

/// m (n_in, n_out) := m + α·softmax_row(m/γ) + β, in place.
fn mix_forward(rt: &Runtime, m: Tensor, mix: [Tensor; 3], n_in: usize, n_out: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => {
            let (al, gm, be) = (rt.f32(mix[0])[0], rt.f32(mix[1])[0], rt.f32(mix[2])[0]);
            cpu::mix_forward(rt.f32_mut(m), al, gm, be, n_out)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_mix_forward",
            grid_rows(n_in, 256, 0),
            &[
                KArg::Ptr(rt.ptr(m)),
                KArg::Ptr(rt.ptr(mix[0])),
                KArg::Ptr(rt.ptr(mix[1])),
                KArg::Ptr(rt.ptr(mix[2])),
                KArg::I32(n_in as i32),
                KArg::I32(n_out as i32),
            ],
        )?,
    }
    Ok(())
}

/// g (n_in, n_out) := dL/dK from dL/dM; part (3, n_in) := per-row ΣG, ΣG·S, Σu·K.
fn mix_backward(
    rt: &Runtime,
    g: Tensor,
    k: Tensor,
    mix: [Tensor; 3],
    part: Tensor,
    n_in: usize,
    n_out: usize,
) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => {
            let (al, gm) = (rt.f32(mix[0])[0], rt.f32(mix[1])[0]);
            cpu::mix_backward(rt.f32_mut(g), rt.f32(k), al, gm, rt.f32_mut(part), n_in, n_out)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_mix_backward",
            grid_rows(n_in, 256, 0),
            &[
                KArg::Ptr(rt.ptr(g)),
                KArg::Ptr(rt.ptr(k)),
                KArg::Ptr(rt.ptr(mix[0])),
                KArg::Ptr(rt.ptr(mix[1])),
                KArg::Ptr(rt.ptr(part)),
                KArg::I32(n_in as i32),
                KArg::I32(n_out as i32),
            ],
        )?,
    }
    Ok(())
}

/// dα += ΣΣG·S, dγ += −ΣΣu·K/γ², dβ += ΣΣG from the per-row sums.    part: (3, n_in)
fn mix_reduce(rt: &Runtime, dmix: [Tensor; 3], gamma: Tensor, part: Tensor, n_in: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => {
            let [s_g, s_gs, s_uk] = cpu::mix_reduce(rt.f32(part), n_in);
            let gm = rt.f32(gamma)[0];
            rt.f32_mut(dmix[0])[0] += s_gs;
            rt.f32_mut(dmix[1])[0] += -s_uk / (gm * gm);
            rt.f32_mut(dmix[2])[0] += s_g;
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_mix_reduce",
            grid_rows(1, 256, 0),
            &[
                KArg::Ptr(rt.ptr(dmix[0])),
                KArg::Ptr(rt.ptr(dmix[1])),
                KArg::Ptr(rt.ptr(dmix[2])),
                KArg::Ptr(rt.ptr(gamma)),
                KArg::Ptr(rt.ptr(part)),
                KArg::I32(n_in as i32),
            ],
        )?,
    }
    Ok(())
}

/// dK -> R, see the module documentation. g (n_in, n_out) := R (R_1 for the piecewise-linear kernel,
/// whose R_0 goes to r0 (n_in, n_out)).
fn ratio(rt: &Runtime, g: Tensor, r0: Tensor, f: &Factors, kind: KernelKind) -> Result<()> {
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.half_rank);
    match &rt.backend {
        Backend::Cpu => {
            cpu::ratio(rt.f32_mut(g), rt.f32_mut(r0), rt.f32(f.in_qs), rt.f32(f.out_qs), n_in, n_out, d, kind)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_ratio",
            tile_cfg(n_in, n_out, d),
            &[
                KArg::Ptr(rt.ptr(g)),
                KArg::Ptr(rt.ptr(r0)),
                KArg::Ptr(rt.ptr(f.in_qs)),
                KArg::Ptr(rt.ptr(f.out_qs)),
                KArg::I32(n_in as i32),
                KArg::I32(n_out as i32),
                KArg::I32(d as i32),
                KArg::I32(kind.code()),
            ],
        )?,
    }
    Ok(())
}

/// aug (rows, d+1) = [x | 1].                                            x: (rows, d)
fn augment(rt: &Runtime, aug: Tensor, x: Tensor, rows: usize, d: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => cpu::augment(rt.f32_mut(aug), rt.f32(x), d),
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_augment",
            grid_1d(rows * (d + 1), 256),
            &[KArg::Ptr(rt.ptr(aug)), KArg::Ptr(rt.ptr(x)), KArg::I32(rows as i32), KArg::I32(d as i32)],
        )?,
    }
    Ok(())
}

/// dx (rows, d) += x·t[:, d] − t[:, :d], where t = R·[Y | 1] (rows, d+1).
fn dist_grad(rt: &Runtime, dx: Tensor, x: Tensor, t: Tensor, rows: usize, d: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => cpu::dist_grad(rt.f32_mut(dx), rt.f32(x), rt.f32(t), d),
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_dist_grad",
            grid_1d(rows * d, 256),
            &[
                KArg::Ptr(rt.ptr(dx)),
                KArg::Ptr(rt.ptr(x)),
                KArg::Ptr(rt.ptr(t)),
                KArg::I32(rows as i32),
                KArg::I32(d as i32),
            ],
        )?,
    }
    Ok(())
}

/// f64 references, for the op tests and the selftest (which checks the mixture scalars' gradients of both
/// devices against the closed form).
pub(crate) mod reference {
    /// [dα, dγ, dβ] of L = Σ G ⊙ M in f64 from K, and the Σ|term| of each sum (its rounding scale).
    pub fn mix_grads_f64(k: &[f64], g: &[f64], [al, gm, _]: [f64; 3], n_out: usize) -> ([f64; 3], [f64; 3]) {
        let (mut v, mut sc) = ([0f64; 3], [0f64; 3]);
        for (kr, gr) in k.chunks(n_out).zip(g.chunks(n_out)) {
            let mx = kr.iter().fold(f64::MIN, |x, &k| x.max(k / gm));
            let z: f64 = kr.iter().map(|&k| (k / gm - mx).exp()).sum();
            let s: Vec<f64> = kr.iter().map(|&k| (k / gm - mx).exp() / z).collect();
            let dot: f64 = gr.iter().zip(&s).map(|(g, s)| al * g * s).sum();
            for j in 0..n_out {
                let u = s[j] * (al * gr[j] - dot);
                let terms = [gr[j] * s[j], -u * kr[j] / (gm * gm), gr[j]];
                for c in 0..3 {
                    v[c] += terms[c];
                    sc[c] += terms[c].abs();
                }
            }
        }
        (v, sc)
    }
}

#[cfg(test)]
mod tests;
