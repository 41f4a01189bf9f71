//! The kernelized merge of SNELL / SNELLA: the dense update M (in × out) of one branch, built from its
//! low-rank factors, and the backward of that merge. CUDA twin: `cuda/kmerge.cu`.
//!
//! Factors (spec b.2): A = In_Qs (2, n_in, d) and B = Out_Qs (2, n_out, d), d = r/2, H = 2 "pieces".
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
//! Mixture (SNELLA / MixK, spec b.3), on top of any kernel: M = K + α·softmax_row(K/γ) + β, the softmax
//! over the out index j of each input row i; α, γ, β are 1-element device tensors (never read on the host).
//!
//! Backward (spec c.2). With G = dL/dM: dβ = ΣG, dα = ΣG·S, u = S·(αG − rowsum(αG·S)),
//! dK = G + u/γ, dγ = −Σu·K/γ². Then a ratio R per kind turns dK into factor gradients:
//! * distance kernels (`PiecewiseLinear` per piece with R_h = c_h·dK / D_h (0 where D_h = 0, as torch's
//!   `_euclidean_dist_backward`); `Rbf` with R = dK·(−2/r)·exp(−‖a−b‖²/r), shared by both pieces):
//!   dA_h = A_h·rowsum(R_h) − R_h·B_h,  dB_h = B_h·colsum(R_h) − R_hᵀ·A_h;
//! * inner-product kernels (R = dK·f'(p): 1, 1 − K², 2(p + 1)): dA_h = R·B_h, dB_h = Rᵀ·A_h.
//!
//! The row/column sums ride along the GEMMs: R·[B_h | 1] (n_in, d+1) gives R·B_h and rowsum(R) at once,
//! Rᵀ·[A_h | 1] gives Rᵀ·A_h and colsum(R). Nothing of the forward is kept: the backward recomputes K
//! (mixture only) and the distances from the factors, which is the memory design of the method (spec b.5).
use cudarc::driver::LaunchConfig;

use crate::error::Result;
use crate::ops::{matmul, Matmul};
use crate::runtime::cuda::{grid_1d, grid_rows, KArg};
use crate::runtime::{Backend, Plan, Pool, Runtime, Tensor};

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
    pub a: Tensor,
    pub b: Tensor,
    pub mix: Option<[Tensor; 3]>,
    pub n_in: usize,
    pub n_out: usize,
    pub d: usize,
}

impl Factors {
    fn check(&self) {
        assert_eq!(self.a.numel, PIECES * self.n_in * self.d, "kmerge: In_Qs must be (2, {}, {})", self.n_in, self.d);
        assert_eq!(
            self.b.numel,
            PIECES * self.n_out * self.d,
            "kmerge: Out_Qs must be (2, {}, {})",
            self.n_out,
            self.d
        );
        assert!(self.d >= 1 && self.d <= MAX_D, "kmerge: d = {} outside 1..={MAX_D}", self.d);
        if let Some(mix) = &self.mix {
            assert!(mix.iter().all(|t| t.numel == 1), "kmerge: alpha, gamma, beta are 1-element tensors");
        }
    }
    /// Piece h of A: (n_in, d).
    fn a_piece(&self, h: usize) -> Tensor {
        self.a.slice(h * self.n_in * self.d, self.n_in * self.d)
    }
    /// Piece h of B: (n_out, d).
    fn b_piece(&self, h: usize) -> Tensor {
        self.b.slice(h * self.n_out * self.d, self.n_out * self.d)
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
    /// R_hᵀ·[A_h | 1]: R_hᵀ·A_h and colsum(R_h).                         (n_out, d+1)
    pub tmp_b: Tensor,
    /// Per-row sums of the mixture backward: ΣG, ΣG·S, Σu·K.            (3, n_in)
    pub mix_part: Tensor,
    pub n_in: usize,
    pub n_out: usize,
    pub d: usize,
}

impl MergeScratch {
    pub fn plan(plan: &mut Plan, prefix: &str, n_in: usize, n_out: usize, d: usize) -> MergeScratch {
        let sc = Pool::Scratch;
        MergeScratch {
            k: plan.f32(format!("{prefix}.kmerge.K"), &[n_in, n_out], sc),
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
            self.n_in == f.n_in && self.n_out == f.n_out && self.d == f.d,
            "kmerge: scratch planned for ({}, {}, {}), factors are ({}, {}, {})",
            self.n_in,
            self.n_out,
            self.d,
            f.n_in,
            f.n_out,
            f.d
        );
    }
}

/// M = kernel(A, B) [+ alpha * softmax_over_out(K / gamma) + beta].      m: (n_in, n_out)
pub fn merge_forward(rt: &Runtime, m: Tensor, f: &Factors, kind: KernelKind, s: &MergeScratch) -> Result<()> {
    f.check();
    s.check(f);
    assert_eq!(m.numel, f.n_in * f.n_out, "kmerge: M must be ({}, {})", f.n_in, f.n_out);
    kernel_forward(rt, m, f, kind)?;
    if let Some(mix) = f.mix {
        mix_forward(rt, m, mix, f.n_in, f.n_out)?;
    }
    Ok(())
}

/// Given g = dL/dM (n_in, n_out) (overwritten: it ends as a ratio R), ACCUMULATES (+=) into
/// da (2, n_in, d), db (2, n_out, d) and, with the mixture, dmix = [dalpha, dgamma, dbeta] (1 each).
/// Everything needed is recomputed from the factors. `dmix` may be None with `f.mix` set (frozen
/// mixture scalars); the reverse is an error.
#[allow(clippy::too_many_arguments)]
pub fn merge_backward(
    rt: &Runtime,
    da: Tensor,
    db: Tensor,
    dmix: Option<[Tensor; 3]>,
    g: Tensor,
    f: &Factors,
    kind: KernelKind,
    s: &MergeScratch,
) -> Result<()> {
    f.check();
    s.check(f);
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.d);
    assert_eq!(g.numel, n_in * n_out, "kmerge: dM must be ({n_in}, {n_out})");
    assert_eq!(da.numel, f.a.numel, "kmerge: dIn_Qs must be shaped like In_Qs");
    assert_eq!(db.numel, f.b.numel, "kmerge: dOut_Qs must be shaped like Out_Qs");
    assert!(dmix.is_none() || f.mix.is_some(), "kmerge: dmix given for factors without a mixture");

    // 1. Mixture: g := dL/dK (K recomputed into s.k), per-row partial sums, then dα, dγ, dβ.
    if let Some(mix) = f.mix {
        kernel_forward(rt, s.k, f, kind)?;
        mix_backward(rt, g, s.k, mix, s.mix_part, n_in, n_out)?;
        if let Some(dm) = dmix {
            assert!(dm.iter().all(|t| t.numel == 1), "kmerge: dalpha, dgamma, dbeta are 1-element tensors");
            mix_reduce(rt, dm, mix[1], s.mix_part, n_in)?;
        }
    }
    // 2. dK -> R (in place in g; the piecewise-linear piece 0 goes to s.k, which is free now).
    if kind != KernelKind::Linear {
        ratio(rt, g, s.k, f, kind)?;
    }
    // 3. Factor gradients per piece.
    for h in 0..PIECES {
        let (a_h, b_h) = (f.a_piece(h), f.b_piece(h));
        let (da_h, db_h) = (da.slice(h * n_in * d, n_in * d), db.slice(h * n_out * d, n_out * d));
        if kind.is_distance() {
            let r = if kind == KernelKind::PiecewiseLinear && h == 0 { s.k } else { g };
            augment(rt, s.aug_a, a_h, n_in, d)?;
            augment(rt, s.aug_b, b_h, n_out, d)?;
            matmul(rt, s.tmp_a, r, s.aug_b, Matmul::new(n_in, d + 1, n_out, false, false))?;
            matmul(rt, s.tmp_b, r, s.aug_a, Matmul::new(n_out, d + 1, n_in, true, false))?;
            dist_grad(rt, da_h, a_h, s.tmp_a, n_in, d)?;
            dist_grad(rt, db_h, b_h, s.tmp_b, n_out, d)?;
        } else {
            matmul(rt, da_h, g, b_h, Matmul::new(n_in, d, n_out, false, false).accumulate())?;
            matmul(rt, db_h, g, a_h, Matmul::new(n_out, d, n_in, true, false).accumulate())?;
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
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.d);
    match &rt.backend {
        Backend::Cpu => cpu::forward(rt.f32_mut(out), rt.f32(f.a), rt.f32(f.b), n_in, n_out, d, kind),
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_forward",
            tile_cfg(n_in, n_out, d),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(f.a)),
                KArg::Ptr(rt.ptr(f.b)),
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
    let (n_in, n_out, d) = (f.n_in, f.n_out, f.d);
    match &rt.backend {
        Backend::Cpu => cpu::ratio(rt.f32_mut(g), rt.f32_mut(r0), rt.f32(f.a), rt.f32(f.b), n_in, n_out, d, kind),
        Backend::Cuda(cu) => cu.launch(
            "snella_kmerge_ratio",
            tile_cfg(n_in, n_out, d),
            &[
                KArg::Ptr(rt.ptr(g)),
                KArg::Ptr(rt.ptr(r0)),
                KArg::Ptr(rt.ptr(f.a)),
                KArg::Ptr(rt.ptr(f.b)),
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

pub(crate) mod cpu {
    //! The readable reference of every step; the CUDA kernels compute the same expressions in the
    //! same order (up to fused multiply-adds in the d-long dot products).
    use super::{KernelKind, PIECES, PL_COEFF};
    use rayon::prelude::*;

    /// Per-piece dot product and squared norms of (A_h,i, B_h,j).
    pub struct Pair {
        pub p: [f32; PIECES],
        pub a2: [f32; PIECES],
        pub b2: [f32; PIECES],
    }

    /// ‖x_h,i‖² of every row i and piece h of a factor (2, n, d), summed in order: computed once per merge
    /// instead of once per (i, j) pair, with the same additions, so the values are the same.
    pub fn row_norms(x: &[f32], n: usize, d: usize) -> Vec<[f32; PIECES]> {
        (0..n)
            .map(|i| {
                let mut r = [0f32; PIECES];
                for (h, r) in r.iter_mut().enumerate() {
                    *r = x[(h * n + i) * d..][..d].iter().fold(0f32, |s, &u| s + u * u);
                }
                r
            })
            .collect()
    }

    /// The per-piece dot products of (A_h,i, B_h,j), with the squared norms from `row_norms`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn pair(
        a: &[f32],
        b: &[f32],
        an: &[[f32; PIECES]],
        bn: &[[f32; PIECES]],
        i: usize,
        j: usize,
        n_in: usize,
        n_out: usize,
        d: usize,
    ) -> Pair {
        let mut q = Pair { p: [0.0; PIECES], a2: an[i], b2: bn[j] };
        for h in 0..PIECES {
            let x = &a[(h * n_in + i) * d..][..d];
            let y = &b[(h * n_out + j) * d..][..d];
            q.p[h] = x.iter().zip(y).fold(0f32, |s, (&u, &v)| s + u * v);
        }
        q
    }

    /// max(x, 0) that keeps NaN (torch clamp_min), unlike f32::max.
    #[inline]
    fn clamp0(x: f32) -> f32 {
        if x < 0.0 {
            0.0
        } else {
            x
        }
    }

    /// ‖A_h,i − B_h,j‖² by cdist's expanded form, [−2a, ‖a‖², 1]·[b, 1, ‖b‖²], clamped at 0.
    #[inline]
    fn sq_dist(q: &Pair, h: usize) -> f32 {
        clamp0((-2.0 * q.p[h] + q.a2[h]) + q.b2[h])
    }

    /// ‖A_h,i − B_h,j‖ for the backward's ratio, 0 where the expanded form cannot tell the rows apart: its
    /// rounding error is about (2d + 2)·ε·(‖a‖² + ‖b‖²), and below that 0.1·g/D would divide by rounding noise
    /// (R jumping between 0 and 0.1·g/tiny with the last bit of a sum). The forward keeps cdist's value.
    #[inline]
    fn dist_or_zero(q: &Pair, h: usize, d: usize) -> f32 {
        let d2 = sq_dist(q, h);
        let noise = ((2 * d + 2) as f32 * f32::EPSILON) * (q.a2[h] + q.b2[h]);
        if d2 <= noise {
            0.0
        } else {
            d2.sqrt()
        }
    }

    /// ‖a_i − b_j‖² over both pieces (r values).
    #[inline]
    fn sq_dist_all(q: &Pair) -> f32 {
        clamp0(((-2.0 * q.p[0] + q.a2[0]) + q.b2[0]) + ((-2.0 * q.p[1] + q.a2[1]) + q.b2[1]))
    }

    #[inline]
    pub fn value(kind: KernelKind, q: &Pair, d: usize) -> f32 {
        match kind {
            KernelKind::PiecewiseLinear => PL_COEFF[0] * sq_dist(q, 0).sqrt() + PL_COEFF[1] * sq_dist(q, 1).sqrt(),
            KernelKind::Linear => q.p[0] + q.p[1],
            KernelKind::Rbf => (-sq_dist_all(q) / (2 * d) as f32).exp_m1(),
            KernelKind::Sigmoid => (q.p[0] + q.p[1]).tanh(),
            KernelKind::Poly => {
                let p = q.p[0] + q.p[1];
                p * (p + 2.0)
            }
        }
    }

    /// m (n_in, n_out) = K(A, B).
    pub fn forward(m: &mut [f32], a: &[f32], b: &[f32], n_in: usize, n_out: usize, d: usize, kind: KernelKind) {
        let (an, bn) = (row_norms(a, n_in, d), row_norms(b, n_out, d));
        m.par_chunks_mut(n_out).enumerate().for_each(|(i, row)| {
            for (j, o) in row.iter_mut().enumerate() {
                *o = value(kind, &pair(a, b, &an, &bn, i, j, n_in, n_out, d), d);
            }
        });
    }

    /// Row max of x/γ and the reciprocal of Σexp(x/γ − max): the softmax of one row is exp(x/γ − max)·inv.
    #[inline]
    fn softmax_stats(row: &[f32], gm: f32) -> (f32, f32) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &k| m.max(k / gm));
        let sum: f32 = row.iter().map(|&k| (k / gm - mx).exp()).sum();
        (mx, 1.0 / sum)
    }

    /// m := m + α·softmax_row(m/γ) + β, in place.                       m: (rows, n_out)
    pub fn mix_forward(m: &mut [f32], al: f32, gm: f32, be: f32, n_out: usize) {
        m.par_chunks_mut(n_out).for_each(|row| {
            let (mx, inv) = softmax_stats(row, gm);
            for k in row.iter_mut() {
                let s = (*k / gm - mx).exp() * inv;
                *k = (*k + al * s) + be;
            }
        });
    }

    /// g := dK = G + u/γ with u = S·(αG − Σ_row αG·S); part (3, n_in) := per-row ΣG, ΣG·S, Σu·K.
    pub fn mix_backward(g: &mut [f32], k: &[f32], al: f32, gm: f32, part: &mut [f32], n_in: usize, n_out: usize) {
        let sums: Vec<[f32; 3]> = g
            .par_chunks_mut(n_out)
            .zip(k.par_chunks(n_out))
            .map(|(gr, kr)| {
                let (mx, inv) = softmax_stats(kr, gm);
                // The long sums accumulate in f64 (the CUDA twin reduces in trees): closer to the exact sums.
                let (mut s_g, mut s_gs, mut dot) = (0f64, 0f64, 0f64);
                for (&gv, &kv) in gr.iter().zip(kr) {
                    let s = (kv / gm - mx).exp() * inv;
                    s_g += gv as f64;
                    s_gs += (gv * s) as f64;
                    dot += ((al * gv) * s) as f64;
                }
                let dot = dot as f32;
                let mut s_uk = 0f64;
                for (gv, &kv) in gr.iter_mut().zip(kr) {
                    let s = (kv / gm - mx).exp() * inv;
                    let u = s * (al * *gv - dot);
                    *gv += u / gm;
                    s_uk += (u * kv) as f64;
                }
                [s_g as f32, s_gs as f32, s_uk as f32]
            })
            .collect();
        for (i, s) in sums.iter().enumerate() {
            for (c, &v) in s.iter().enumerate() {
                part[c * n_in + i] = v;
            }
        }
    }

    /// [ΣΣG, ΣΣG·S, ΣΣu·K] from the per-row sums.                       part: (3, n_in)
    pub fn mix_reduce(part: &[f32], n_in: usize) -> [f32; 3] {
        let s = |c: usize| part[c * n_in..(c + 1) * n_in].iter().map(|&x| x as f64).sum::<f64>() as f32;
        [s(0), s(1), s(2)]
    }

    /// dK -> R in place in g; the piecewise-linear kernel writes R_0 to r0 and R_1 to g.
    #[allow(clippy::too_many_arguments)]
    pub fn ratio(
        g: &mut [f32],
        r0: &mut [f32],
        a: &[f32],
        b: &[f32],
        n_in: usize,
        n_out: usize,
        d: usize,
        kind: KernelKind,
    ) {
        let r = (2 * d) as f32;
        let (an, bn) = (row_norms(a, n_in, d), row_norms(b, n_out, d));
        g.par_chunks_mut(n_out).zip(r0.par_chunks_mut(n_out)).enumerate().for_each(|(i, (gr, r0r))| {
            for j in 0..n_out {
                let q = pair(a, b, &an, &bn, i, j, n_in, n_out, d);
                let gv = gr[j];
                gr[j] = match kind {
                    KernelKind::PiecewiseLinear => {
                        let (d0, d1) = (dist_or_zero(&q, 0, d), dist_or_zero(&q, 1, d));
                        r0r[j] = if d0 == 0.0 { 0.0 } else { (PL_COEFF[0] * gv) / d0 };
                        if d1 == 0.0 {
                            0.0
                        } else {
                            (PL_COEFF[1] * gv) / d1
                        }
                    }
                    KernelKind::Linear => gv,
                    KernelKind::Rbf => (gv * (-sq_dist_all(&q) / r).exp()) * (-2.0 / r),
                    KernelKind::Sigmoid => {
                        let t = (q.p[0] + q.p[1]).tanh();
                        gv * (1.0 - t * t)
                    }
                    KernelKind::Poly => gv * (2.0 * ((q.p[0] + q.p[1]) + 1.0)),
                };
            }
        });
    }

    /// aug (rows, d+1) = [x | 1].
    pub fn augment(aug: &mut [f32], x: &[f32], d: usize) {
        for (o, xr) in aug.chunks_mut(d + 1).zip(x.chunks(d)) {
            o[..d].copy_from_slice(xr);
            o[d] = 1.0;
        }
    }

    /// dx (rows, d) += x·t[:, d] − t[:, :d].
    pub fn dist_grad(dx: &mut [f32], x: &[f32], t: &[f32], d: usize) {
        for ((o, xr), tr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(t.chunks(d + 1)) {
            let rs = tr[d];
            for k in 0..d {
                o[k] += xr[k] * rs - tr[k];
            }
        }
    }
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
mod tests {
    use super::reference::mix_grads_f64;
    use super::*;
    use crate::ops::testing::*;
    use crate::runtime::{Backend, Device};

    const KINDS: [KernelKind; 5] =
        [KernelKind::PiecewiseLinear, KernelKind::Linear, KernelKind::Rbf, KernelKind::Sigmoid, KernelKind::Poly];

    /// The merge in f64 from the definitions (direct distances, no expanded form).
    fn merge_f64(
        kind: KernelKind,
        a: &[f64],
        b: &[f64],
        mix: Option<[f64; 3]>,
        n_in: usize,
        n_out: usize,
        d: usize,
    ) -> Vec<f64> {
        let r = (2 * d) as f64;
        let mut m = vec![0f64; n_in * n_out];
        for i in 0..n_in {
            for j in 0..n_out {
                let (mut sq, mut p) = ([0f64; 2], 0f64);
                for h in 0..2 {
                    for k in 0..d {
                        let (x, y) = (a[(h * n_in + i) * d + k], b[(h * n_out + j) * d + k]);
                        sq[h] += (x - y) * (x - y);
                        p += x * y;
                    }
                }
                m[i * n_out + j] = match kind {
                    KernelKind::PiecewiseLinear => 0.1 * sq[0].sqrt() - 0.1 * sq[1].sqrt(),
                    KernelKind::Linear => p,
                    KernelKind::Rbf => (-(sq[0] + sq[1]) / r).exp() - 1.0,
                    KernelKind::Sigmoid => p.tanh(),
                    KernelKind::Poly => (p + 1.0) * (p + 1.0) - 1.0,
                };
            }
        }
        if let Some([al, gm, be]) = mix {
            for row in m.chunks_mut(n_out) {
                let mx = row.iter().fold(f64::MIN, |x, &k| x.max(k / gm));
                let z: f64 = row.iter().map(|&k| (k / gm - mx).exp()).sum();
                for k in row.iter_mut() {
                    *k += al * (*k / gm - mx).exp() / z + be;
                }
            }
        }
        m
    }

    struct Setup {
        rt: Runtime,
        f: Factors,
        m: Tensor,
        g: Tensor,
        da: Tensor,
        db: Tensor,
        dmix: [Tensor; 3],
        s: MergeScratch,
    }

    fn setup(device: Device, n_in: usize, n_out: usize, d: usize, mix: bool) -> Setup {
        let mut plan = Plan::new();
        if device == Device::Cuda {
            plan.add_cublas_workspace();
        }
        let a = plan.f32("a", &[2, n_in, d], Pool::Trainable);
        let b = plan.f32("b", &[2, n_out, d], Pool::Trainable);
        let mixt = [0, 1, 2].map(|c| plan.f32(format!("mix{c}"), &[1], Pool::Trainable));
        let da = plan.f32("da", &[2, n_in, d], Pool::Grads);
        let db = plan.f32("db", &[2, n_out, d], Pool::Grads);
        let dmix = [0, 1, 2].map(|c| plan.f32(format!("dmix{c}"), &[1], Pool::Grads));
        let m = plan.f32("m", &[n_in, n_out], Pool::Scratch);
        let g = plan.f32("g", &[n_in, n_out], Pool::Scratch);
        let s = MergeScratch::plan(&mut plan, "t", n_in, n_out, d);
        let rt = Runtime::new(Backend::new(device).unwrap(), plan).unwrap();
        let f = Factors { a, b, mix: mix.then_some(mixt), n_in, n_out, d };
        Setup { rt, f, m, g, da, db, dmix, s }
    }

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    const MIX: [f32; 3] = [1.3, 0.7, -0.2];

    #[test]
    fn forward_matches_f64_for_every_kind() {
        let (n_in, n_out, d) = (13, 11, 3);
        for kind in KINDS {
            for mix in [false, true] {
                for scale in [0.6f32, 0.02] {
                    let st = setup(Device::Cpu, n_in, n_out, d, mix);
                    let a = randn(2 * n_in * d, 1, scale);
                    let b = randn(2 * n_out * d, 2, scale);
                    st.rt.upload(st.f.a, &a).unwrap();
                    st.rt.upload(st.f.b, &b).unwrap();
                    if let Some(mt) = st.f.mix {
                        for c in 0..3 {
                            st.rt.upload(mt[c], &[MIX[c]]).unwrap();
                        }
                    }
                    merge_forward(&st.rt, st.m, &st.f, kind, &st.s).unwrap();
                    let want =
                        merge_f64(kind, &to64(&a), &to64(&b), mix.then_some(MIX.map(|x| x as f64)), n_in, n_out, d);
                    // The expanded distance cancels: its error is ~eps·‖a‖², relative to K ~ ‖a‖.
                    let tol = if kind.is_distance() { 2e-6 } else { 1e-6 };
                    assert_close(
                        &format!("{kind:?} mix={mix} scale={scale} M"),
                        &st.rt.download(st.m).unwrap(),
                        &want,
                        tol,
                    );
                }
            }
        }
    }

    /// Analytic gradients (f32) against central differences of the f64 merge, for L = Σ G ⊙ M.
    fn check_backward(kind: KernelKind, mix: bool, scale: f32) {
        let (n_in, n_out, d) = (7, 9, 3);
        let st = setup(Device::Cpu, n_in, n_out, d, mix);
        let a = randn(2 * n_in * d, 11, scale);
        let b = randn(2 * n_out * d, 12, scale);
        let gv = randn(n_in * n_out, 13, 1.0);
        let da0 = randn(2 * n_in * d, 14, 1.0);
        let db0 = randn(2 * n_out * d, 15, 1.0);
        st.rt.upload(st.f.a, &a).unwrap();
        st.rt.upload(st.f.b, &b).unwrap();
        st.rt.upload(st.g, &gv).unwrap();
        // Start from non-zero gradients: the backward accumulates.
        st.rt.upload(st.da, &da0).unwrap();
        st.rt.upload(st.db, &db0).unwrap();
        for c in 0..3 {
            st.rt.upload(st.dmix[c], &[0.5]).unwrap();
            if let Some(mt) = st.f.mix {
                st.rt.upload(mt[c], &[MIX[c]]).unwrap();
            }
        }
        merge_backward(&st.rt, st.da, st.db, mix.then_some(st.dmix), st.g, &st.f, kind, &st.s).unwrap();

        let (a64, b64, g64) = (to64(&a), to64(&b), to64(&gv));
        let mix64 = MIX.map(|x| x as f64);
        let loss = |a: &[f64], b: &[f64], mx: [f64; 3]| -> f64 {
            merge_f64(kind, a, b, mix.then_some(mx), n_in, n_out, d).iter().zip(&g64).map(|(m, g)| m * g).sum()
        };
        let h = 1e-6 * scale as f64;
        let fd = |x: &[f64], which: usize| -> Vec<f64> {
            (0..x.len())
                .map(|e| {
                    let (mut p, mut q) = (x.to_vec(), x.to_vec());
                    p[e] += h;
                    q[e] -= h;
                    let (lp, lq) = match which {
                        0 => (loss(&p, &b64, mix64), loss(&q, &b64, mix64)),
                        _ => (loss(&a64, &p, mix64), loss(&a64, &q, mix64)),
                    };
                    (lp - lq) / (2.0 * h)
                })
                .collect()
        };
        let sub = |got: Vec<f32>, base: &[f32]| -> Vec<f32> { got.iter().zip(base).map(|(g, b)| g - b).collect() };
        let name = format!("{kind:?} mix={mix} scale={scale}");
        let tol = 5e-6;
        assert_close(&format!("{name} dIn_Qs"), &sub(st.rt.download(st.da).unwrap(), &da0), &fd(&a64, 0), tol);
        assert_close(&format!("{name} dOut_Qs"), &sub(st.rt.download(st.db).unwrap(), &db0), &fd(&b64, 1), tol);
        if mix {
            let (closed, scale) = mix_grads_f64(&merge_f64(kind, &a64, &b64, None, n_in, n_out, d), &g64, mix64, n_out);
            for c in 0..3 {
                let got = (st.rt.download(st.dmix[c]).unwrap()[0] - 0.5) as f64;
                assert!((got - closed[c]).abs() <= 1e-6 * scale[c].max(1.0), "{name} dmix[{c}] closed form");
            }
            for c in 0..3 {
                let hh = 1e-6;
                let (mut p, mut q) = (mix64, mix64);
                p[c] += hh;
                q[c] -= hh;
                let want = (loss(&a64, &b64, p) - loss(&a64, &b64, q)) / (2.0 * hh);
                let got = (st.rt.download(st.dmix[c]).unwrap()[0] - 0.5) as f64;
                // Σ over cancelling terms of size ~1 (and the += into 0.5): absolute floor 1e-6.
                assert!((got - want).abs() <= 1e-6 + 2e-5 * want.abs(), "{name} dmix[{c}]: got {got}, want {want}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_for_every_kind() {
        for kind in KINDS {
            for mix in [false, true] {
                check_backward(kind, mix, 0.5);
            }
        }
        // Kaiming-like scale for the official kernel.
        check_backward(KernelKind::PiecewiseLinear, true, 0.05);
        check_backward(KernelKind::PiecewiseLinear, false, 0.05);
    }

    /// Rows that coincide up to the last bits: cdist's expanded distance is then rounding noise (0 or a tiny
    /// positive value, depending on the last bit of a sum), so the ratio must be 0 rather than 0.1·g/noise.
    #[test]
    fn nearly_coincident_rows_have_zero_ratio() {
        let (n, d) = (1, 8);
        let base = randn(2 * d, 31, 0.7);
        let expanded = |a: &[f32], b: &[f32]| {
            let (an, bn) = (cpu::row_norms(a, n, d), cpu::row_norms(b, n, d));
            let q = cpu::pair(a, b, &an, &bn, 0, 0, n, n, d);
            (-2.0 * q.p[0] + q.a2[0]) + q.b2[0]
        };
        // b = a with one entry a few ulps away, chosen so that the expanded form leaves a positive residue.
        let (a, b) = (1..200u32)
            .map(|k| {
                let mut b = base.clone();
                b[k as usize % d] = f32::from_bits(b[k as usize % d].to_bits() + k % 7 + 1);
                (base.clone(), b)
            })
            .find(|(a, b)| expanded(a, b) > 0.0)
            .expect("some near-coincident pair leaves a positive expanded distance");
        let d2 = expanded(&a, &b);
        assert!(d2 < 1e-5, "the pair is not near-coincident: {d2}");
        let (mut g, mut r0) = (vec![1.0f32], vec![f32::NAN]);
        cpu::ratio(&mut g, &mut r0, &a, &b, n, n, d, KernelKind::PiecewiseLinear);
        assert_eq!((r0[0], g[0]), (0.0, 0.0), "0.1·g/sqrt({d2}) would be {}", 0.1 / d2.sqrt());
        // Rows apart keep their ratio.
        let far: Vec<f32> = b.iter().map(|x| x + 0.5).collect();
        let (mut g, mut r0) = (vec![1.0f32], vec![f32::NAN]);
        cpu::ratio(&mut g, &mut r0, &a, &far, n, n, d, KernelKind::PiecewiseLinear);
        assert!(r0[0] > 0.0 && r0[0].is_finite(), "{r0:?}");
    }

    /// The distance backward is 0 where D == 0 (torch `_euclidean_dist_backward`), not NaN.
    #[test]
    fn zero_distance_has_zero_ratio() {
        let (n_in, n_out, d) = (2, 2, 2);
        let st = setup(Device::Cpu, n_in, n_out, d, false);
        let a = vec![1.0, 2.0, 0.5, 0.5, 3.0, 1.0, 0.0, 0.0];
        st.rt.upload(st.f.a, &a).unwrap();
        st.rt.upload(st.f.b, &a).unwrap(); // b == a: D_h[i,i] = 0
        st.rt.upload(st.g, &[1.0; 4]).unwrap();
        merge_backward(&st.rt, st.da, st.db, None, st.g, &st.f, KernelKind::PiecewiseLinear, &st.s).unwrap();
        assert!(st.rt.download(st.da).unwrap().iter().all(|x| x.is_finite()));
        assert!(st.rt.download(st.db).unwrap().iter().all(|x| x.is_finite()));
    }
}
