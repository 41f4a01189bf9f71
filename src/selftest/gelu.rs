//! Checks of `ops::gelu`: forward, backward, backward in place.
use super::{Case, ELEMENTS};
use crate::error::Result;
use crate::ops::gelu::{gelu_backward, gelu_forward};
use crate::runtime::{Plan, Pool};

pub(super) fn forward(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let x = p.f32("x", &[ELEMENTS], Pool::Activations);
    let out = p.f32("out", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 3.0)?;
    tw.poison(&[out])?;
    tw.run(|rt| gelu_forward(rt, out, x))?;
    cx.compare(&tw, out)
}

pub(super) fn backward(cx: &mut Case, in_place: bool) -> Result<()> {
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
