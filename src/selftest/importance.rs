//! Checks of `ops::importance`: three EMA steps of the allocator's importance and uncertainty.
use super::{Case, ELEMENTS};
use crate::error::Result;
use crate::ops::importance::importance_update;
use crate::runtime::{Plan, Pool};

/// Three EMA steps (fresh gradients each) from a non-zero state; a few NaN parameters count as 0.
pub(super) fn three_steps(cx: &mut Case) -> Result<()> {
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
