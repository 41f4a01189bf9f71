//! Checks of `ops::mask`: gradient masking by a byte mask.
use super::{Case, ELEMENTS};
use crate::error::Result;
use crate::ops::mask as op;
use crate::runtime::{DType, Plan, Pool};

pub(super) fn mask_grad(cx: &mut Case) -> Result<()> {
    let n = ELEMENTS;
    let mut p = Plan::new();
    let grad = p.f32("grad", &[n], Pool::Grads);
    let mask = p.add("mask", &[n], DType::U8, Pool::Frozen);
    let tw = cx.twin(p)?;
    cx.input(&tw, grad, 1.0)?;
    // Half zeros; any non-zero byte keeps the entry, not only 1.
    let mv: Vec<u8> = (0..n).map(|_| if cx.below(2) == 0 { 0 } else { 1 + cx.below(255) as u8 }).collect();
    tw.upload_u8(mask, &mv)?;
    tw.run(|rt| op::mask_grad(rt, grad, mask))?;
    cx.compare(&tw, grad)
}
