//! Checks of `ops::loss`: cross-entropy with and without the logits' gradient.
use super::Case;
use crate::error::Result;
use crate::ops::loss as op;
use crate::runtime::{DType, Plan, Pool};

pub(super) fn cross_entropy(cx: &mut Case, with_grad: bool) -> Result<()> {
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
    tw.run(|rt| op::cross_entropy(rt, losses, with_grad.then_some(dlogits), logits, labels, v))?;
    cx.compare(&tw, losses)?;
    if with_grad {
        cx.compare(&tw, dlogits)?;
    }
    Ok(())
}
