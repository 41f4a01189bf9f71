//! Checks of `ops::softmax`: forward and backward, each out of place and in place.
use super::Case;
use crate::error::Result;
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::runtime::{Plan, Pool};

/// Rows of 1001 (four passes of a 256-thread block, ragged), scale ≠ 1.
const SOFTMAX_ROWS: usize = 41;
const SOFTMAX_COLS: usize = 1001;
const SOFTMAX_SCALE: f32 = 0.37;

pub(super) fn forward(cx: &mut Case, in_place: bool) -> Result<()> {
    let (r, c) = (SOFTMAX_ROWS, SOFTMAX_COLS);
    let mut p = Plan::new();
    let x = p.f32("x", &[r, c], Pool::Activations);
    let out = p.f32("out", &[r, c], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 4.0)?;
    if in_place {
        tw.run(|rt| softmax_forward(rt, x, x, c, SOFTMAX_SCALE))?;
        cx.compare_as(&tw, x, "out (in place)")
    } else {
        tw.poison(&[out])?;
        tw.run(|rt| softmax_forward(rt, out, x, c, SOFTMAX_SCALE))?;
        cx.compare(&tw, out)
    }
}

/// The backward in isolation: the probabilities come from the CPU forward, copied to the device.
pub(super) fn backward(cx: &mut Case, in_place: bool) -> Result<()> {
    let (r, c) = (SOFTMAX_ROWS, SOFTMAX_COLS);
    let mut p = Plan::new();
    let x = p.f32("x", &[r, c], Pool::Activations);
    let y = p.f32("probs", &[r, c], Pool::Activations);
    let dout = p.f32("dout", &[r, c], Pool::Scratch);
    let dinp = p.f32("dinp", &[r, c], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, x, 4.0)?;
    softmax_forward(&tw.cpu, y, x, c, SOFTMAX_SCALE)?;
    tw.copy_to_dev(y)?;
    cx.input(&tw, dout, 1.0)?;
    if in_place {
        tw.run(|rt| softmax_backward(rt, dout, y, dout, c, SOFTMAX_SCALE))?;
        cx.compare_as(&tw, dout, "dinp (in place)")
    } else {
        tw.poison(&[dinp])?;
        tw.run(|rt| softmax_backward(rt, dinp, y, dout, c, SOFTMAX_SCALE))?;
        cx.compare(&tw, dinp)
    }
}
