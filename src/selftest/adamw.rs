//! Checks of `ops::adamw`: three optimizer steps with fresh gradients.
use super::{Case, ELEMENTS};
use crate::error::Result;
use crate::ops::adamw::{adamw, AdamWStep};
use crate::runtime::{Plan, Pool};

pub(super) fn three_steps(cx: &mut Case) -> Result<()> {
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
