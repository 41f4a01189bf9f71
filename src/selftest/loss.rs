//! Checks of `ops::loss`: cross-entropy with and without the logits' gradient.
use super::Case;
use super::Twin;
use crate::error::Result;
use crate::ops::loss as op;
use crate::runtime::{DType, Plan, Pool, Tensor};

/// Random logits (b, v) and the given labels on both sides, poisoned outputs; returns the twin and
/// [logits, labels, losses, dlogits].
fn setup(cx: &mut Case, b: usize, v: usize, labels: &[i32]) -> Result<(Twin, [Tensor; 4])> {
    let mut p = Plan::new();
    let logits = p.f32("logits", &[b, v], Pool::Activations);
    let lt = p.add("labels", &[b], DType::I32, Pool::Activations);
    let losses = p.f32("losses", &[b], Pool::Activations);
    let dlogits = p.f32("dlogits", &[b, v], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, logits, 3.0)?;
    tw.upload_i32(lt, labels)?;
    tw.poison(&[losses, dlogits])?;
    Ok((tw, [logits, lt, losses, dlogits]))
}

pub(super) fn cross_entropy(cx: &mut Case, with_grad: bool) -> Result<()> {
    let (b, v) = (13, 1003);
    // The first and last class always appear: the edges of the row.
    let mut lv: Vec<i32> = (0..b).map(|_| cx.below(v) as i32).collect();
    lv[0] = 0;
    lv[b - 1] = v as i32 - 1;
    let (tw, [logits, labels, losses, dlogits]) = setup(cx, b, v, &lv)?;
    tw.run(|rt| op::cross_entropy(rt, losses, with_grad.then_some(dlogits), logits, labels, v))?;
    cx.compare(&tw, losses)?;
    if with_grad {
        cx.compare(&tw, dlogits)?;
    }
    Ok(())
}

/// Labels outside 0..V (-1 and V): their rows are NaN on both devices, and nothing is read outside the
/// logits (the emulator's memcheck would report it); the other rows are as usual.
pub(super) fn cross_entropy_bad_labels(cx: &mut Case) -> Result<()> {
    let (b, v) = (5, 300);
    let lv = [2, -1, 0, v as i32, v as i32 - 1];
    let (tw, [logits, labels, losses, dlogits]) = setup(cx, b, v, &lv)?;
    tw.run(|rt| op::cross_entropy(rt, losses, Some(dlogits), logits, labels, v))?;
    let bad = |row: usize| lv[row] < 0 || lv[row] >= v as i32;
    for (t, width) in [(losses, 1), (dlogits, v)] {
        let name = &tw.cpu.plan.spec(t).name;
        let (want, got) = (tw.cpu.download(t)?, tw.dev.download(t)?);
        // NaN exactly in the rows with a bad label, on both sides (a count of misplaced values, must be 0).
        for (side, vals) in [("cpu", &want), ("device", &got)] {
            let misplaced = vals.iter().enumerate().filter(|(i, x)| x.is_nan() != bad(i / width)).count();
            cx.compare_values(format!("{name}: NaN rows ({side})"), &[0.0], &[misplaced as f32], Some(0.0));
        }
        let rows = |vals: &[f32]| -> Vec<f32> {
            vals.chunks(width).enumerate().filter(|(r, _)| !bad(*r)).flat_map(|(_, c)| c.to_vec()).collect()
        };
        cx.compare_values(format!("{name} (good rows)"), &rows(&want), &rows(&got), None);
    }
    Ok(())
}
