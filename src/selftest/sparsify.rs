//! Checks of `ops::sparsify`, the magnitude competition of SNELLA: the threshold select, M_s, the kept count
//! and the backward at several sparsities on a large M with ties and zeros; the select's edge cases (n = 1,
//! n = 2, ties, all zeros, a NaN, a large M), each bit for bit at every sparsity of [`EDGE_SPARSITIES`];
//! and the merged weight W0 + M_sᵀ.
use super::Case;
use crate::error::Result;
use crate::ops::sparsify as op;
use crate::ops::sparsify::{kept_count, sparsify_backward, sparsify_forward, SparsifyScratch};
use crate::runtime::{Plan, Pool};

/// About 300k entries (a ViT-B fc1 branch is 768x3072 = 2.4M; this keeps the CPU side quick).
const COMPETE_SHAPE: (usize, usize) = (587, 511);

/// Threshold, M_s (out of place and in place), kept count, and the backward (out of place and in
/// place) at sparsity s, on an M with exact ties and zeros (the strict > must agree on them).
pub(super) fn sparsify(cx: &mut Case, s: f32) -> Result<()> {
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
    let sc = SparsifyScratch::plan(&mut p, "selftest", n);
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
pub(super) fn add_transposed(cx: &mut Case) -> Result<()> {
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
        op::add_transposed(rt, w, w0, ms, n_in, n_out)?;
        op::add_transposed(rt, w_in_place, w_in_place, ms, n_in, n_out)
    })?;
    cx.compare(&tw, w)?;
    cx.compare(&tw, w_in_place)
}

/// The sparsities of the edge-case checks: both ends, the middle, and ranks between two entries.
pub(super) const EDGE_SPARSITIES: [f32; 7] = [0.0, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0];

/// Entries of the large edge case: the histogram kernel's grid is capped at 1024 blocks of 256 threads, so
/// each of its four radix passes loops over M four times in every thread and a fifth time in the first 7.
const LARGE: usize = 4 * 1024 * 256 + 7;

/// The inputs of the select's edge cases.
#[derive(Clone, Copy, Debug)]
pub(super) enum Edge {
    /// One entry: t = |x|, nothing kept at any s.
    One,
    /// Two entries: every rank falls between them or on one.
    Two,
    /// 1001 N(0, 0.01²) values.
    Random,
    /// 4099 values, ~315 copies each of the 13 multiples of 0.125 in [−0.75, 0.75] (7 magnitudes, 0 one of
    /// them) and one more zero: t lands on tied values, which the strict > drops as a whole.
    Ties,
    /// 300 zeros: t = 0, nothing kept.
    Zeros,
    /// 5000 values and one NaN: t = NaN, nothing kept, M_s NaN where M is.
    Nan,
    /// [`LARGE`] N(0, (1e-3)²) values: every radix pass narrows among many candidates.
    Large,
}

fn edge_values(cx: &mut Case, edge: Edge) -> Vec<f32> {
    match edge {
        Edge::One => cx.randn(1, 1.0),
        Edge::Two => cx.randn(2, 1.0),
        Edge::Random => cx.randn(1001, 0.01),
        Edge::Ties => {
            let phase = cx.below(13);
            let mut v: Vec<f32> = (0..4099).map(|i| (((i + phase) % 13) as f32 - 6.0) * 0.125).collect();
            let i = cx.below(v.len());
            v[i] = 0.0;
            v
        }
        Edge::Zeros => vec![0.0; 300],
        Edge::Nan => {
            let mut v = cx.randn(5000, 1.0);
            let i = cx.below(v.len());
            v[i] = f32::NAN;
            v
        }
        Edge::Large => cx.randn(LARGE, 1e-3),
    }
}

/// The threshold, M_s and the kept count of one edge case at every sparsity of [`EDGE_SPARSITIES`], all
/// bit-exact; a NaN only matches a NaN where the input has one (elsewhere it is a poisoned output).
pub(super) fn edge_case(cx: &mut Case, edge: Edge) -> Result<()> {
    let mv = edge_values(cx, edge);
    let n = mv.len();
    let mut p = Plan::new();
    let m = p.f32("M", &[n], Pool::Scratch);
    let ms = p.f32("M_s", &[n], Pool::Scratch);
    let t = p.f32("t", &[1], Pool::Scratch);
    let sc = SparsifyScratch::plan(&mut p, "selftest", n);
    let tw = cx.twin(p)?;
    tw.upload(m, &mv)?;
    let any_nan = mv.iter().any(|x| x.is_nan());
    for s in EDGE_SPARSITIES {
        tw.poison(&[ms, t, sc.hist, sc.state])?;
        tw.run(|rt| sparsify_forward(rt, ms, t, m, s, &sc))?;
        let (tc, td) = (tw.cpu.download(t)?, tw.dev.download(t)?);
        cx.compare_exact(format!("t (s={s})"), &tc, &td, |_| any_nan);
        let (mc, md) = (tw.cpu.download(ms)?, tw.dev.download(ms)?);
        cx.compare_exact(format!("M_s (s={s})"), &mc, &md, |i| mv[i].is_nan());
        let (kc, kd) = (kept_count(&tw.cpu, m, t)?, kept_count(&tw.dev, m, t)?);
        cx.compare_values(format!("kept_count (s={s})"), &[kc as f32], &[kd as f32], Some(0.0));
    }
    Ok(())
}

/// The backward (out of place and in place) at a fixed t and W = W0 + Mᵀ (into a fresh tensor and in place)
/// on a branch narrower than two tiles of the transpose (n_out = 45 < 64) with a ragged row of tiles.
pub(super) fn backward_add_transposed_67x45(cx: &mut Case) -> Result<()> {
    let (n_in, n_out) = (67, 45);
    let mut p = Plan::new();
    let m = p.f32("M", &[n_in, n_out], Pool::Scratch);
    let t = p.f32("t", &[1], Pool::Scratch);
    let dms = p.f32("dM_s", &[n_in, n_out], Pool::Scratch);
    let dm = p.f32("dM", &[n_in, n_out], Pool::Scratch);
    let dm_in_place = p.f32("dM (in place)", &[n_in, n_out], Pool::Scratch);
    let w0 = p.f32("W0", &[n_out, n_in], Pool::Frozen);
    let w = p.f32("W", &[n_out, n_in], Pool::Scratch);
    let w_in_place = p.f32("W (in place)", &[n_out, n_in], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, m, 1.0)?;
    tw.upload(t, &[0.5])?; // about 38% of N(0, 1) entries dropped
    let gv = cx.input(&tw, dms, 1.0)?;
    tw.upload(dm_in_place, &gv)?;
    let w0v = cx.input(&tw, w0, 1.0)?;
    tw.upload(w_in_place, &w0v)?;
    tw.poison(&[dm, w])?;
    tw.run(|rt| {
        sparsify_backward(rt, dm, dms, m, t)?;
        sparsify_backward(rt, dm_in_place, dm_in_place, m, t)?;
        op::add_transposed(rt, w, w0, m, n_in, n_out)?;
        op::add_transposed(rt, w_in_place, w_in_place, m, n_in, n_out)
    })?;
    for out in [dm, dm_in_place, w, w_in_place] {
        cx.compare(&tw, out)?;
    }
    Ok(())
}
