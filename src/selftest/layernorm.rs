//! Checks of `ops::layernorm`: the forward, the apply from saved statistics, the backward.
use super::{Case, CHANNELS, ROWS};
use crate::error::Result;
use crate::ops::colsum::partials_len;
use crate::ops::layernorm::{layernorm_apply, layernorm_backward, layernorm_forward};
use crate::runtime::{Plan, Pool};

const LN_EPS: f32 = 1e-6;

pub(super) fn forward(cx: &mut Case) -> Result<()> {
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
pub(super) fn apply(cx: &mut Case) -> Result<()> {
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

/// The backward in isolation: mean and rstd are computed here (f64) and given to both sides. Rows over
/// several chunks of the affine gradients' column sums, which add in the same order on both devices: dw and
/// db are compared bit for bit.
pub(super) fn backward(cx: &mut Case, affine: bool) -> Result<()> {
    let (n, c) = (super::add::SUM_ROWS, CHANNELS);
    let mut p = Plan::new();
    let x = p.f32("x", &[n, c], Pool::Activations);
    let w = p.f32("w", &[c], Pool::Frozen);
    let mean = p.f32("mean", &[n], Pool::Activations);
    let rstd = p.f32("rstd", &[n], Pool::Activations);
    let dout = p.f32("dout", &[n, c], Pool::Scratch);
    let dinp = p.f32("dinp", &[n, c], Pool::Scratch);
    let dw = p.f32("dw", &[c], Pool::Grads);
    let db = p.f32("db", &[c], Pool::Grads);
    let part = p.f32("part", &[partials_len(n, c, 2)], Pool::Scratch);
    let tw = cx.twin(p)?;
    tw.poison(&[part])?;
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
    tw.run(|rt| layernorm_backward(rt, dinp, dwo, dbo, dout, x, w, mean, rstd, c, part))?;
    cx.compare(&tw, dinp)?;
    // Without the affine gradients, dw and db must come back untouched (and equal on both sides).
    let (wt, bt) = (tw.cpu.download(dw)?, tw.cpu.download(db)?);
    cx.compare_exact(if affine { "dw" } else { "dw (untouched)" }, &wt, &tw.dev.download(dw)?, |_| false);
    cx.compare_exact(if affine { "db" } else { "db (untouched)" }, &bt, &tw.dev.download(db)?, |_| false);
    Ok(())
}
