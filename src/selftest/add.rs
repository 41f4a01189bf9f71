//! Checks of `ops::add`: bias add and its backward, axpy, column scaling (LayerScale) and its gamma
//! gradient, scaled copy. The backwards' column sums (`ops::colsum`) add in the same order on both devices:
//! bit-exact.
use super::{Case, CHANNELS, ELEMENTS, ROWS};
use crate::error::Result;
use crate::ops::add as op;
use crate::ops::colsum::{partials_len, CHUNK};
use crate::runtime::{Plan, Pool};

pub(super) fn add_bias(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let out = p.f32("out", &[ROWS, CHANNELS], Pool::Activations);
    let bias = p.f32("bias", &[CHANNELS], Pool::Frozen);
    let tw = cx.twin(p)?;
    cx.input(&tw, out, 1.0)?;
    cx.input(&tw, bias, 1.0)?;
    tw.run(|rt| op::add_bias(rt, out, bias))?;
    cx.compare(&tw, out)
}

/// Rows of the column-sum checks: two full chunks of `ops::colsum` and a ragged one.
pub(super) const SUM_ROWS: usize = 2 * CHUNK + 45;

pub(super) fn bias_backward(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dout = p.f32("dout", &[SUM_ROWS, CHANNELS], Pool::Scratch);
    let dbias = p.f32("dbias", &[CHANNELS], Pool::Grads);
    let part = p.f32("part", &[partials_len(SUM_ROWS, CHANNELS, 1)], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, dout, 1.0)?;
    cx.input(&tw, dbias, 1.0)?; // accumulates
    tw.poison(&[part])?;
    tw.run(|rt| op::bias_backward(rt, dbias, dout, part))?;
    cx.compare(&tw, dbias)
}

pub(super) fn axpy(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dst = p.f32("dst", &[ELEMENTS], Pool::Activations);
    let src = p.f32("src", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, dst, 1.0)?;
    cx.input(&tw, src, 1.0)?;
    tw.run(|rt| op::axpy(rt, dst, src, -0.71))?;
    cx.compare(&tw, dst)
}

pub(super) fn mul_cols(cx: &mut Case, accumulate: bool) -> Result<()> {
    let mut p = Plan::new();
    let out = p.f32("out", &[ROWS, CHANNELS], Pool::Activations);
    let inp = p.f32("inp", &[ROWS, CHANNELS], Pool::Activations);
    let gamma = p.f32("gamma", &[CHANNELS], Pool::Trainable);
    let tw = cx.twin(p)?;
    cx.input(&tw, inp, 1.0)?;
    cx.input(&tw, gamma, 1.0)?;
    if accumulate {
        cx.input(&tw, out, 1.0)?;
    } else {
        tw.poison(&[out])?;
    }
    tw.run(|rt| op::mul_cols(rt, out, inp, gamma, accumulate))?;
    cx.compare(&tw, out)
}

pub(super) fn mul_cols_backward_gamma(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dout = p.f32("dout", &[SUM_ROWS, CHANNELS], Pool::Scratch);
    let inp = p.f32("inp", &[SUM_ROWS, CHANNELS], Pool::Activations);
    let dgamma = p.f32("dgamma", &[CHANNELS], Pool::Grads);
    let part = p.f32("part", &[partials_len(SUM_ROWS, CHANNELS, 1)], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, dout, 1.0)?;
    cx.input(&tw, inp, 1.0)?;
    cx.input(&tw, dgamma, 1.0)?; // accumulates
    tw.poison(&[part])?;
    tw.run(|rt| op::mul_cols_backward_gamma(rt, dgamma, dout, inp, part))?;
    cx.compare(&tw, dgamma)
}

pub(super) fn scale_copy(cx: &mut Case) -> Result<()> {
    let mut p = Plan::new();
    let dst = p.f32("dst", &[ELEMENTS], Pool::Activations);
    let src = p.f32("src", &[ELEMENTS], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, src, 1.0)?;
    tw.poison(&[dst])?;
    tw.run(|rt| op::scale_copy(rt, dst, src, 1.7))?;
    cx.compare(&tw, dst)
}
