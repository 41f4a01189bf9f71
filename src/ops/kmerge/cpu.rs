//! The readable reference of every step; the CUDA kernels compute the same expressions in the same order
//! (up to fused multiply-adds in the d-long dot products).
//!
//! The work goes row by row: one input index i against every output index j. The d-long dot products of a
//! row run across j, one j per vector lane in the widest vector unit of the host ([`Rows::dots`]); each
//! lane sums its own products in order, with a separate rounding per product and per sum, so the bits are
//! those of the scalar loop `s = s + a·b`. The kernel value, the mixture and the backward's ratio are then
//! taken on that row while it is in cache, and each exponential of the mixture is computed once per entry.
use super::{KernelKind, PIECES, PL_COEFF};
use crate::ops::lanes::{add_tile_transposed, exp_lanes, sum_lanes, widest_vectors, TILE};
use crate::ops::sparsify::cpu::kept_mag;
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

/// The per-piece dot products of (A_h,i, B_h,j), with the squared norms from `row_norms` (one pair at a
/// time: the definition [`Rows::dots`] computes a row of at once).
#[cfg(test)]
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

/// ‖a − b‖² by cdist's expanded form, [−2a, ‖a‖², 1]·[b, 1, ‖b‖²], clamped at 0, from p = a·b.
#[inline(always)]
fn expanded_sq_dist(p: f32, a2: f32, b2: f32) -> f32 {
    clamp0((-2.0 * p + a2) + b2)
}

/// ‖A_h,i − B_h,j‖² of one pair.
#[inline]
fn sq_dist(q: &Pair, h: usize) -> f32 {
    expanded_sq_dist(q.p[h], q.a2[h], q.b2[h])
}

/// ‖A_h,i − B_h,j‖ for the backward's ratio, 0 where the expanded form cannot tell the rows apart: its
/// rounding error is about (2d + 2)·ε·(‖a‖² + ‖b‖²), and below that 0.1·g/D would divide by rounding noise
/// (R jumping between 0 and 0.1·g/tiny with the last bit of a sum). The forward keeps cdist's value.
#[inline(always)]
fn dist_or_zero(p: f32, a2: f32, b2: f32, d: usize) -> f32 {
    let d2 = expanded_sq_dist(p, a2, b2);
    let noise = ((2 * d + 2) as f32 * f32::EPSILON) * (a2 + b2);
    if d2 <= noise {
        0.0
    } else {
        d2.sqrt()
    }
}

/// The piecewise-linear kernel from its two pieces' squared distances.
#[inline(always)]
fn pl_value(sq0: f32, sq1: f32) -> f32 {
    PL_COEFF[0] * sq0.sqrt() + PL_COEFF[1] * sq1.sqrt()
}

/// (R_1, R_0) of the piecewise-linear kernel from dK = gv and the pieces' distances ([`dist_or_zero`]).
#[inline(always)]
fn pl_ratio_of(d0: f32, d1: f32, gv: f32) -> (f32, f32) {
    let r0 = if d0 == 0.0 { 0.0 } else { (PL_COEFF[0] * gv) / d0 };
    (if d1 == 0.0 { 0.0 } else { (PL_COEFF[1] * gv) / d1 }, r0)
}

/// ‖a_i − b_j‖² over both pieces (r values).
#[inline]
fn sq_dist_all(q: &Pair) -> f32 {
    clamp0(((-2.0 * q.p[0] + q.a2[0]) + q.b2[0]) + ((-2.0 * q.p[1] + q.a2[1]) + q.b2[1]))
}

#[inline]
pub fn value(kind: KernelKind, q: &Pair, d: usize) -> f32 {
    match kind {
        KernelKind::PiecewiseLinear => pl_value(sq_dist(q, 0), sq_dist(q, 1)),
        KernelKind::Linear => q.p[0] + q.p[1],
        KernelKind::Rbf => (-sq_dist_all(q) / (2 * d) as f32).exp_m1(),
        KernelKind::Sigmoid => (q.p[0] + q.p[1]).tanh(),
        KernelKind::Poly => {
            let p = q.p[0] + q.p[1];
            p * (p + 2.0)
        }
    }
}

/// R from dK = gv at one pair (method.md §7); the piecewise-linear kernel also returns R_0 (R_1 first).
#[inline]
fn ratio_at(kind: KernelKind, q: &Pair, gv: f32, d: usize) -> (f32, f32) {
    let r = (2 * d) as f32;
    match kind {
        KernelKind::PiecewiseLinear => {
            let dist = |h: usize| dist_or_zero(q.p[h], q.a2[h], q.b2[h], d);
            pl_ratio_of(dist(0), dist(1), gv)
        }
        KernelKind::Linear => (gv, 0.0),
        KernelKind::Rbf => ((gv * (-sq_dist_all(q) / r).exp()) * (-2.0 / r), 0.0),
        KernelKind::Sigmoid => {
            let t = (q.p[0] + q.p[1]).tanh();
            (gv * (1.0 - t * t), 0.0)
        }
        KernelKind::Poly => (gv * (2.0 * ((q.p[0] + q.p[1]) + 1.0)), 0.0),
    }
}

/// Rows handed to one rayon task: at least ~16k entries, so short rows do not cost a task each.
fn rows_per_task(n_out: usize) -> usize {
    (16384 / n_out.max(1)).max(1)
}

/// The same in groups of [`GROUP`] rows.
fn groups_per_task(n_out: usize) -> usize {
    rows_per_task(n_out).div_ceil(GROUP)
}

/// The factors of one merge, prepared for row-wise work: A as it is, the squared row norms, and the pieces
/// of B transposed to (2, d, n_out), so that the k-th values of every B_h,j are contiguous.
pub struct Rows<'a> {
    a: &'a [f32],
    an: Vec<[f32; PIECES]>,
    bt: Vec<f32>,
    bn: Vec<[f32; PIECES]>,
    /// The same norms piece by piece, each contiguous over j.
    bn_t: [Vec<f32>; PIECES],
    n_in: usize,
    n_out: usize,
    d: usize,
}

/// Rows whose dot products are taken together: each loaded vector of B serves all of them, so B (which
/// does not fit in L1) is streamed once per group instead of once per row.
const GROUP: usize = 4;

/// Per-task buffers: the two pieces' dot products of a group of rows (GROUP, n_out) each, and K or the
/// mixture's exponentials of one row.
pub struct RowBuf {
    p: [Vec<f32>; PIECES],
    tmp: Vec<f32>,
}

impl RowBuf {
    fn new(n_out: usize) -> RowBuf {
        RowBuf { p: [vec![0.0; GROUP * n_out], vec![0.0; GROUP * n_out]], tmp: vec![0.0; n_out] }
    }
}

impl<'a> Rows<'a> {
    pub fn new(a: &'a [f32], b: &[f32], n_in: usize, n_out: usize, d: usize) -> Rows<'a> {
        let mut bt = vec![0f32; PIECES * d * n_out];
        for h in 0..PIECES {
            for j in 0..n_out {
                for k in 0..d {
                    bt[(h * d + k) * n_out + j] = b[(h * n_out + j) * d + k];
                }
            }
        }
        let bn = row_norms(b, n_out, d);
        let bn_t = [bn.iter().map(|n| n[0]).collect(), bn.iter().map(|n| n[1]).collect()];
        Rows { a, an: row_norms(a, n_in, d), bt, bn, bn_t, n_in, n_out, d }
    }

    /// buf.p[h][r·n_out + j] = A_h,i0+r · B_h,j for every j and the g ≤ GROUP rows from i0 (each summed in
    /// order over k).
    fn dots(&self, i0: usize, g: usize, buf: &mut RowBuf) {
        let d = self.d;
        let ai = |h: usize, i: usize| &self.a[(h * self.n_in + i) * d..][..d];
        let [p0, p1] = &mut buf.p;
        let mut r = 0;
        while r < g {
            let i = i0 + r;
            if r + GROUP <= g {
                let rows: [[&[f32]; 2]; GROUP] = std::array::from_fn(|q| [ai(0, i + q), ai(1, i + q)]);
                dots4(rows, &self.bt, self.n_out, d, &mut p0[r * self.n_out..], &mut p1[r * self.n_out..]);
                r += GROUP;
            } else {
                dots1(
                    [[ai(0, i), ai(1, i)]],
                    &self.bt,
                    self.n_out,
                    d,
                    &mut p0[r * self.n_out..],
                    &mut p1[r * self.n_out..],
                );
                r += 1;
            }
        }
    }

    #[inline]
    fn pair(&self, p: [&[f32]; PIECES], i: usize, j: usize) -> Pair {
        Pair { p: [p[0][j], p[1][j]], a2: self.an[i], b2: self.bn[j] }
    }

    /// row[j] = K(i, j) for every j, from row i's dot products p.
    fn kernel_row(&self, kind: KernelKind, i: usize, p: [&[f32]; PIECES], row: &mut [f32]) {
        if kind == KernelKind::PiecewiseLinear {
            return pl_row(p[0], p[1], self.an[i], &self.bn_t[0], &self.bn_t[1], row);
        }
        for (j, o) in row.iter_mut().enumerate() {
            *o = value(kind, &self.pair(p, i, j), self.d);
        }
    }
}

/// The dot products of G rows across j, W lanes at a time (the compiler maps the lanes onto vector
/// registers; each lane is its own in-order sum, so any vector width and any grouping give the scalar
/// loop's bits). p_h is (G, n_out).
#[inline(always)]
fn dots_lanes<const G: usize>(
    ai: [[&[f32]; 2]; G],
    bt: &[f32],
    n_out: usize,
    d: usize,
    p0: &mut [f32],
    p1: &mut [f32],
) {
    const W: usize = 32;
    let (bt0, bt1) = bt.split_at(d * n_out);
    let mut j0 = 0;
    while j0 + W <= n_out {
        let mut s = [[[0f32; W]; 2]; G];
        for k in 0..d {
            let (y0, y1) = (&bt0[k * n_out + j0..][..W], &bt1[k * n_out + j0..][..W]);
            for (s, a) in s.iter_mut().zip(&ai) {
                let (x0, x1) = (a[0][k], a[1][k]);
                for l in 0..W {
                    s[0][l] += x0 * y0[l];
                    s[1][l] += x1 * y1[l];
                }
            }
        }
        for (r, s) in s.iter().enumerate() {
            p0[r * n_out + j0..][..W].copy_from_slice(&s[0]);
            p1[r * n_out + j0..][..W].copy_from_slice(&s[1]);
        }
        j0 += W;
    }
    for (r, a) in ai.iter().enumerate() {
        for j in j0..n_out {
            let (mut s0, mut s1) = (0f32, 0f32);
            for k in 0..d {
                s0 += a[0][k] * bt0[k * n_out + j];
                s1 += a[1][k] * bt1[k * n_out + j];
            }
            p0[r * n_out + j] = s0;
            p1[r * n_out + j] = s1;
        }
    }
}

#[inline(always)]
fn dots4_lanes(ai: [[&[f32]; 2]; GROUP], bt: &[f32], n_out: usize, d: usize, p0: &mut [f32], p1: &mut [f32]) {
    dots_lanes(ai, bt, n_out, d, p0, p1)
}

#[inline(always)]
fn dots1_lanes(ai: [[&[f32]; 2]; 1], bt: &[f32], n_out: usize, d: usize, p0: &mut [f32], p1: &mut [f32]) {
    dots_lanes(ai, bt, n_out, d, p0, p1)
}

widest_vectors! {
    /// p_h[r, j] = A_h,i_r · B_h,j for a group of rows (`ai`) against B transposed (`bt`, (2, d, n_out)).
    fn dots4(ai: [[&[f32]; 2]; GROUP], bt: &[f32], n_out: usize, d: usize, p0: &mut [f32], p1: &mut [f32]) => dots4_lanes
}

widest_vectors! {
    /// The same for one row (the rows after the last full group).
    fn dots1(ai: [[&[f32]; 2]; 1], bt: &[f32], n_out: usize, d: usize, p0: &mut [f32], p1: &mut [f32]) => dots1_lanes
}

widest_vectors! {
    /// One row of the piecewise-linear kernel from its dot products and squared norms (`value`'s expression).
    fn pl_row(p0: &[f32], p1: &[f32], a2: [f32; 2], b20: &[f32], b21: &[f32], row: &mut [f32]) => pl_row_lanes
}

widest_vectors! {
    /// One row of the piecewise-linear ratio: g := R_1, r0 := R_0 (`ratio_at`'s expressions).
    fn pl_ratio(p0: &[f32], p1: &[f32], a2: [f32; 2], b20: &[f32], b21: &[f32], d: usize, g: &mut [f32], r0: &mut [f32]) => pl_ratio_lanes
}

#[inline(always)]
fn pl_row_lanes(p0: &[f32], p1: &[f32], a2: [f32; 2], b20: &[f32], b21: &[f32], row: &mut [f32]) {
    let n = row.len();
    let (p0, p1, b20, b21) = (&p0[..n], &p1[..n], &b20[..n], &b21[..n]);
    for j in 0..n {
        row[j] = pl_value(expanded_sq_dist(p0[j], a2[0], b20[j]), expanded_sq_dist(p1[j], a2[1], b21[j]));
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pl_ratio_lanes(
    p0: &[f32],
    p1: &[f32],
    a2: [f32; 2],
    b20: &[f32],
    b21: &[f32],
    d: usize,
    g: &mut [f32],
    r0: &mut [f32],
) {
    let n = g.len();
    let (p0, p1, b20, b21, r0) = (&p0[..n], &p1[..n], &b20[..n], &b21[..n], &mut r0[..n]);
    for j in 0..n {
        let (d0, d1) = (dist_or_zero(p0[j], a2[0], b20[j], d), dist_or_zero(p1[j], a2[1], b21[j], d));
        (g[j], r0[j]) = pl_ratio_of(d0, d1, g[j]);
    }
}

/// m (n_in, n_out) = K(A, B), and with `mix` = [α, γ, β] the mixture on each row as it is built.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    m: &mut [f32],
    a: &[f32],
    b: &[f32],
    n_in: usize,
    n_out: usize,
    d: usize,
    kind: KernelKind,
    mix: Option<[f32; 3]>,
) {
    let rows = Rows::new(a, b, n_in, n_out, d);
    m.par_chunks_mut(GROUP * n_out).with_min_len(groups_per_task(n_out)).enumerate().for_each_init(
        || RowBuf::new(n_out),
        |buf, (grp, block)| {
            let i0 = grp * GROUP;
            rows.dots(i0, block.len() / n_out, buf);
            let RowBuf { p, tmp } = buf;
            for (r, row) in block.chunks_mut(n_out).enumerate() {
                let p = [&p[0][r * n_out..][..n_out], &p[1][r * n_out..][..n_out]];
                rows.kernel_row(kind, i0 + r, p, row);
                if let Some([al, gm, be]) = mix {
                    mix_row(row, al, gm, be, tmp);
                }
            }
        },
    );
}

/// The exponentials of one row's softmax over x/γ, e_j = exp(x_j/γ − max), and 1/Σe: the softmax of the
/// row is e_j·inv.
#[inline]
fn softmax_exps(row: &[f32], gm: f32, e: &mut [f32]) -> f32 {
    let mx = scaled_max(row, gm);
    1.0 / scaled_exps(row, gm, mx, e)
}

widest_vectors! {
    /// max_j row_j/γ (f32::max in any order is the same maximum, NaN ignored as by a fold).
    fn scaled_max(row: &[f32], gm: f32) -> f32 => scaled_max_lanes
}

#[inline(always)]
fn scaled_max_lanes(row: &[f32], gm: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            acc[l] = acc[l].max(c[l] / gm);
        }
    }
    tail.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a)), |m, &k| m.max(k / gm))
}

widest_vectors! {
    /// e_j = exp(row_j/γ − mx) for every j, and Σe (vector lanes: the exps dominate a merge's element-wise work).
    fn scaled_exps(row: &[f32], gm: f32, mx: f32, e: &mut [f32]) -> f32 => scaled_exps_lanes
}

#[inline(always)]
fn scaled_exps_lanes(row: &[f32], gm: f32, mx: f32, e: &mut [f32]) -> f32 {
    let row = &row[..e.len()];
    for (e, &k) in e.iter_mut().zip(row) {
        *e = exp_lanes(k / gm - mx);
    }
    sum_lanes(e)
}

/// row := row + α·softmax(row/γ) + β.                                  row, e: (n_out)
#[inline]
fn mix_row(row: &mut [f32], al: f32, gm: f32, be: f32, e: &mut [f32]) {
    let inv = softmax_exps(row, gm, e);
    add_mixture(row, e, al, inv, be);
}

/// m := m + α·softmax_row(m/γ) + β, in place.                       m: (rows, n_out)
pub fn mix_forward(m: &mut [f32], al: f32, gm: f32, be: f32, n_out: usize) {
    m.par_chunks_mut(n_out)
        .with_min_len(rows_per_task(n_out))
        .for_each_init(|| vec![0f32; n_out], |e, row| mix_row(row, al, gm, be, e));
}

/// One row of the mixture backward: gr := dK = G + u/γ with u = S·(αG − Σ αG·S); returns ΣG, ΣG·S, Σu·K.
#[inline]
fn mix_backward_row(gr: &mut [f32], kr: &[f32], al: f32, gm: f32, e: &mut [f32]) -> [f32; 3] {
    let inv = softmax_exps(kr, gm, e);
    mix_backward_row_from(gr, kr, al, gm, e, inv)
}

/// [`mix_backward_row`] with the row's softmax exponentials and 1/Σe already taken (S = e·inv).
#[inline]
fn mix_backward_row_from(gr: &mut [f32], kr: &[f32], al: f32, gm: f32, e: &[f32], inv: f32) -> [f32; 3] {
    let [s_g, s_gs, dot] = mix_sums(gr, e, al, inv);
    let s_uk = mix_dk(gr, kr, e, al, gm, inv, dot as f32);
    [s_g as f32, s_gs as f32, s_uk as f32]
}

widest_vectors! {
    /// ΣG, ΣG·S and Σ αG·S over a row (S = e·inv), in f64 ([`F64_LANES`] interleaved partial sums).
    fn mix_sums(gr: &[f32], e: &[f32], al: f32, inv: f32) -> [f64; 3] => mix_sums_lanes
}

widest_vectors! {
    /// gr := dK = G + u/γ with u = S·(αG − dot), and Σu·K in f64 (interleaved partial sums).
    fn mix_dk(gr: &mut [f32], kr: &[f32], e: &[f32], al: f32, gm: f32, inv: f32, dot: f32) -> f64 => mix_dk_lanes
}

/// Partial sums of the mixture backward's long row sums: the CUDA twin reduces in trees, and the CPU sums in
/// f64 so closely to the exact sum that their f32 roundings (what the step uses) do not depend on the order.
const F64_LANES: usize = 8;

/// Σ over the lanes, then the tail, in order.
#[inline(always)]
fn fold_lanes(acc: &[f64; F64_LANES], tail: impl Iterator<Item = f64>) -> f64 {
    tail.fold(acc.iter().sum::<f64>(), |s, x| s + x)
}

#[inline(always)]
fn mix_sums_lanes(gr: &[f32], e: &[f32], al: f32, inv: f32) -> [f64; 3] {
    const L: usize = F64_LANES;
    let e = &e[..gr.len()];
    let (mut a_g, mut a_gs, mut a_dot) = ([0f64; L], [0f64; L], [0f64; L]);
    let (gc, ec) = (gr.chunks_exact(L), e.chunks_exact(L));
    let (gt, et) = (gc.remainder(), ec.remainder());
    for (g, e) in gc.zip(ec) {
        for l in 0..L {
            let s = e[l] * inv;
            a_g[l] += g[l] as f64;
            a_gs[l] += (g[l] * s) as f64;
            a_dot[l] += ((al * g[l]) * s) as f64;
        }
    }
    let tail = || gt.iter().zip(et).map(|(&g, &e)| (g, e * inv));
    [
        fold_lanes(&a_g, tail().map(|(g, _)| g as f64)),
        fold_lanes(&a_gs, tail().map(|(g, s)| (g * s) as f64)),
        fold_lanes(&a_dot, tail().map(|(g, s)| ((al * g) * s) as f64)),
    ]
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mix_dk_lanes(gr: &mut [f32], kr: &[f32], e: &[f32], al: f32, gm: f32, inv: f32, dot: f32) -> f64 {
    const L: usize = F64_LANES;
    let n = gr.len();
    let (kr, e) = (&kr[..n], &e[..n]);
    let step = |g: &mut f32, k: f32, e: f32| {
        let u = (e * inv) * (al * *g - dot);
        *g += u / gm;
        (u * k) as f64
    };
    let mut acc = [0f64; L];
    let body = n / L * L;
    for ((g, k), e) in gr[..body].chunks_exact_mut(L).zip(kr.chunks_exact(L)).zip(e.chunks_exact(L)) {
        for l in 0..L {
            acc[l] += step(&mut g[l], k[l], e[l]);
        }
    }
    let mut sum = acc.iter().sum::<f64>();
    for j in body..n {
        sum += step(&mut gr[j], kr[j], e[j]);
    }
    sum
}

/// Writes the per-row sums (n_in rows of [ΣG, ΣG·S, Σu·K]) as part (3, n_in).
fn store_parts(part: &mut [f32], sums: &[[f32; 3]], n_in: usize) {
    for (i, s) in sums.iter().enumerate() {
        for (c, &v) in s.iter().enumerate() {
            part[c * n_in + i] = v;
        }
    }
}

/// g := dK = G + u/γ with u = S·(αG − Σ_row αG·S); part (3, n_in) := per-row ΣG, ΣG·S, Σu·K.
pub fn mix_backward(g: &mut [f32], k: &[f32], al: f32, gm: f32, part: &mut [f32], n_in: usize, n_out: usize) {
    let sums: Vec<[f32; 3]> = g
        .par_chunks_mut(n_out)
        .zip(k.par_chunks(n_out))
        .with_min_len(rows_per_task(n_out))
        .map_init(|| vec![0f32; n_out], |e, (gr, kr)| mix_backward_row(gr, kr, al, gm, e))
        .collect();
    store_parts(part, &sums, n_in);
}

/// [ΣΣG, ΣΣG·S, ΣΣu·K] from the per-row sums.                       part: (3, n_in)
pub fn mix_reduce(part: &[f32], n_in: usize) -> [f32; 3] {
    let s = |c: usize| part[c * n_in..(c + 1) * n_in].iter().map(|&x| x as f64).sum::<f64>() as f32;
    [s(0), s(1), s(2)]
}

/// dK -> R in place in g; the piecewise-linear kernel writes R_0 to r0 and R_1 to g (the ratio alone:
/// [`backward`] takes it row by row).                                    g, r0: (n_in, n_out)
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
    let rows = Rows::new(a, b, n_in, n_out, d);
    let mut buf = RowBuf::new(n_out);
    for (i, (gr, r0r)) in g.chunks_mut(n_out).zip(r0.chunks_mut(n_out)).enumerate() {
        rows.dots(i, 1, &mut buf);
        rows.ratio_row(kind, i, [&buf.p[0][..n_out], &buf.p[1][..n_out]], gr, r0r);
    }
}

impl Rows<'_> {
    /// dK → R on row i (`ratio_at`'s expressions): gr := R (R_1 for the piecewise-linear kernel, whose R_0
    /// goes to r0); `Linear` leaves dK, which is its R.
    fn ratio_row(&self, kind: KernelKind, i: usize, p: [&[f32]; PIECES], gr: &mut [f32], r0: &mut [f32]) {
        match kind {
            KernelKind::PiecewiseLinear => {
                pl_ratio(p[0], p[1], self.an[i], &self.bn_t[0], &self.bn_t[1], self.d, gr, r0)
            }
            KernelKind::Linear => {}
            _ => {
                for (j, gv) in gr.iter_mut().enumerate() {
                    *gv = ratio_at(kind, &self.pair(p, i, j), *gv, self.d).0;
                }
            }
        }
    }
}

/// The merged weight a backward writes on its way: W (n_out, n_in) := src + M_sᵀ, column i from row i of
/// M_s. Raw pointers, because each task of [`backward`] writes the columns of its own rows, which are not
/// one slice; src may be W itself.
#[derive(Clone, Copy)]
pub struct WeightOut {
    pub dst: *mut f32,
    pub src: *const f32,
}

// SAFETY: the tasks of one `backward` write disjoint columns of dst, and read src only at those entries.
unsafe impl Send for WeightOut {}
unsafe impl Sync for WeightOut {}

/// The merge backward's elementwise part (method.md §5–§7) in one pass over the rows of M, which is never
/// stored: per group of rows the dot products once, then per row
/// 1. K of the row (when the mixture or M needs it) and, with `mix` = [α, γ, β], its softmax;
/// 2. M = K + α·S + β; with `t` (a sparse branch's threshold) g is ∂L/∂M_s and becomes
///    ∂L/∂M = g·|M|·1[|M| > t] (`ops::sparsify`'s expressions); with `w` the row of M_s (M without `t`)
///    goes into column i of the merged weight;
/// 3. with the mixture, g := dK and the row's sums into part (3, n_in) (see [`mix_backward`]);
/// 4. (every kind but `Linear`) dK → R as [`ratio`] does: g := R (R_1), r0 := R_0 (piecewise-linear).
///
/// The factor products of R follow as GEMMs (`merge_backward`).                 g, r0: (n_in, n_out)
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &mut [f32],
    r0: &mut [f32],
    w: Option<WeightOut>,
    a: &[f32],
    b: &[f32],
    n_in: usize,
    n_out: usize,
    d: usize,
    kind: KernelKind,
    mix: Option<[f32; 3]>,
    t: Option<f32>,
    part: &mut [f32],
) {
    let rows = Rows::new(a, b, n_in, n_out, d);
    let need_m = t.is_some() || w.is_some();
    let need_k = need_m || mix.is_some();
    let need_dots = need_k || kind != KernelKind::Linear;
    let blocks: Vec<[[f32; 3]; BLOCK]> = g
        .par_chunks_mut(BLOCK * n_out)
        .zip(r0.par_chunks_mut(BLOCK * n_out))
        .with_min_len(rows_per_task(n_out).div_ceil(BLOCK))
        .enumerate()
        .map_init(
            || (RowBuf::new(n_out), vec![0f32; n_out], vec![0f32; BLOCK * n_out]),
            |(buf, e, msb), (blk, (gb, r0b))| {
                let i_blk = blk * BLOCK;
                let mut sums = [[0f32; 3]; BLOCK];
                for (q, (gq, r0q)) in gb.chunks_mut(GROUP * n_out).zip(r0b.chunks_mut(GROUP * n_out)).enumerate() {
                    let i0 = i_blk + q * GROUP;
                    if need_dots {
                        rows.dots(i0, gq.len() / n_out, buf);
                    }
                    let RowBuf { p, tmp: k } = &mut *buf;
                    for (r, (gr, r0r)) in gq.chunks_mut(n_out).zip(r0q.chunks_mut(n_out)).enumerate() {
                        let i = i0 + r;
                        let p = [&p[0][r * n_out..][..n_out], &p[1][r * n_out..][..n_out]];
                        if need_k {
                            rows.kernel_row(kind, i, p, k);
                        }
                        let soft = mix.map(|[_, gm, _]| softmax_exps(k, gm, e));
                        if need_m {
                            // Row i of M, then M_s in place: kept for the block's W tiles below.
                            let m = &mut msb[(i - i_blk) * n_out..][..n_out];
                            match (mix, soft) {
                                (Some([al, _, be]), Some(inv)) => mixture_of(m, k, e, al, inv, be),
                                _ => m.copy_from_slice(k),
                            }
                            if let Some(t) = t {
                                mask_row(m, t, gr);
                            }
                        }
                        if let (Some([al, gm, _]), Some(inv)) = (mix, soft) {
                            sums[i - i_blk] = mix_backward_row_from(gr, k, al, gm, e, inv);
                        }
                        rows.ratio_row(kind, i, p, gr, r0r);
                    }
                }
                if let Some(w) = w {
                    // SAFETY: columns i_blk.. of W belong to this task's rows.
                    unsafe { add_columns(w, &msb[..gb.len()], i_blk, n_in, n_out) };
                }
                sums
            },
        )
        .collect();
    if mix.is_some() {
        let sums: Vec<[f32; 3]> = blocks.into_iter().flatten().take(n_in).collect();
        store_parts(part, &sums, n_in);
    }
}

/// Rows of the backward's tasks: BLOCK rows of M_s are kept so that W's columns i.. are written a cache line
/// (16 floats of a row of W) at a time ([`add_tile_transposed`]). A write per entry down column i (one line
/// and, at a stride of n_in floats, nearly one page per entry) was ~40% of the row pass.
const BLOCK: usize = TILE;

/// W[j, i0 + r] = src[j, i0 + r] + ms[r, j] for the g = ms.len() / n_out ≤ BLOCK rows of ms, a tile of 16
/// columns of ms at a time.                                   ms: (g, n_out)   W, src: (n_out, n_in)
///
/// # Safety
/// `w.dst` and `w.src` hold n_out·n_in floats, and no other thread touches columns i0..i0 + g of W.
unsafe fn add_columns(w: WeightOut, ms: &[f32], i0: usize, n_in: usize, n_out: usize) {
    let g = ms.len() / n_out;
    assert!(g <= BLOCK && ms.len() == g * n_out && i0 + g <= n_in);
    for j0 in (0..n_out).step_by(TILE) {
        let at = j0 * n_in + i0;
        // SAFETY: rows j0.. of W and src, columns i0..i0 + g (caller); ms[r, j0 + c] for r < g, c < 16.
        unsafe {
            add_tile_transposed(w.dst.add(at), w.src.add(at), n_in, ms[j0..].as_ptr(), n_out, g, TILE.min(n_out - j0))
        };
    }
}

/// m := m + α·S + β with S = e·inv (M from K, on a row): the forward's and the backward's one expression.
///                                                                       m, e: (n_out)
#[inline(always)]
fn add_mixture_lanes(m: &mut [f32], e: &[f32], al: f32, inv: f32, be: f32) {
    let e = &e[..m.len()];
    for (m, &e) in m.iter_mut().zip(e) {
        *m = mixed(*m, e, al, inv, be);
    }
}

/// M = K + α·S + β at one entry, S = e·inv.
#[inline(always)]
fn mixed(k: f32, e: f32, al: f32, inv: f32, be: f32) -> f32 {
    (k + al * (e * inv)) + be
}

/// A sparse row: g := g·|M|·1[|M| > t] (∂L/∂M_s → ∂L/∂M) and m := M_s = M·|M|·1[|M| > t] in place
/// (`ops::sparsify`'s expressions).
#[inline(always)]
fn mask_row_lanes(m: &mut [f32], t: f32, g: &mut [f32]) {
    let g = &mut g[..m.len()];
    for (m, g) in m.iter_mut().zip(g) {
        let kept = kept_mag(*m, t);
        *g *= kept;
        *m *= kept;
    }
}

widest_vectors! {
    /// The mixture added to a row of K (see [`add_mixture_lanes`]).
    fn add_mixture(m: &mut [f32], e: &[f32], al: f32, inv: f32, be: f32) => add_mixture_lanes
}

widest_vectors! {
    /// m := k + α·S + β, the same expression from a row of K kept apart (the backward needs both).
    fn mixture_of(m: &mut [f32], k: &[f32], e: &[f32], al: f32, inv: f32, be: f32) => mixture_of_lanes
}

#[inline(always)]
fn mixture_of_lanes(m: &mut [f32], k: &[f32], e: &[f32], al: f32, inv: f32, be: f32) {
    let (k, e) = (&k[..m.len()], &e[..m.len()]);
    for ((m, &k), &e) in m.iter_mut().zip(k).zip(e) {
        *m = mixed(k, e, al, inv, be);
    }
}

widest_vectors! {
    /// A sparse row's gradient mask and M_s (see [`mask_row_lanes`]).
    fn mask_row(m: &mut [f32], t: f32, g: &mut [f32]) => mask_row_lanes
}

/// aug (rows, d+1) = [x | 1].
pub fn augment(aug: &mut [f32], x: &[f32], d: usize) {
    for (o, xr) in aug.chunks_mut(d + 1).zip(x.chunks(d)) {
        o[..d].copy_from_slice(xr);
        o[d] = 1.0;
    }
}

/// t[:, d] = rowsum(R), the last column of t = R·[B | 1] (16 interleaved partial sums per row, in order).
///                                                          t: (n_in, d+1)   R: (n_in, n_out)
pub fn row_sums(t: &mut [f32], r: &[f32], n_out: usize, d: usize) {
    t.par_chunks_mut(d + 1).zip(r.par_chunks(n_out)).with_min_len(rows_per_task(n_out)).for_each(|(t, r)| {
        t[d] = sum_lanes(r);
    });
}

/// dx (rows, d) += x·tt[d, :] − tt[:d, :]ᵀ: [`dist_grad`] from t stored transposed, tt (d+1, rows).
pub fn dist_grad_t(dx: &mut [f32], x: &[f32], tt: &[f32], d: usize) {
    let rows = dx.len() / d;
    for (i, (o, xr)) in dx.chunks_mut(d).zip(x.chunks(d)).enumerate() {
        let rs = tt[d * rows + i];
        for k in 0..d {
            o[k] += xr[k] * rs - tt[k * rows + i];
        }
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
