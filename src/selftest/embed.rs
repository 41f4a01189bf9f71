//! Checks of `ops::embed`: patchify, the token embedding and its backward, the cls row gather and scatter.
use super::Case;
use crate::error::Result;
use crate::ops::embed::{cls_gather, cls_scatter, embed_backward, embed_forward, PatchGeom};
use crate::runtime::{Plan, Pool};

/// Odd image sizes whose height and width are not multiples of the patch (the remainder is ignored).
const GEOM: PatchGeom = PatchGeom { b: 2, c: 3, h: 37, w: 50, p: 7 };

pub(super) fn patchify(cx: &mut Case) -> Result<()> {
    let g = GEOM;
    let mut p = Plan::new();
    let img = p.f32("img", &[g.b, g.c, g.h, g.w], Pool::Activations);
    let out = p.f32("patches", &[g.b * g.patches(), g.patch_dim()], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, img, 1.0)?;
    tw.poison(&[out])?;
    tw.run(|rt| crate::ops::embed::patchify(rt, out, img, g))?;
    cx.compare(&tw, out)
}

/// Tokens of the embedding checks: batch 3, cls + 35 patches, width 771.
const EMB: (usize, usize, usize) = (3, 36, 771);

pub(super) fn forward(cx: &mut Case) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let patch_out = p.f32("patch_out", &[b * (t - 1), d], Pool::Activations);
    let cls = p.f32("cls", &[d], Pool::Frozen);
    let pos = p.f32("pos", &[t, d], Pool::Frozen);
    let x = p.f32("x", &[b, t, d], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, patch_out, 1.0)?;
    cx.input(&tw, cls, 1.0)?;
    cx.input(&tw, pos, 1.0)?;
    tw.poison(&[x])?;
    tw.run(|rt| embed_forward(rt, x, patch_out, cls, pos, b, t, d))?;
    cx.compare(&tw, x)
}

/// dcls and dpos accumulate (random start); dpatch is written. `all`: every gradient, else dpos alone.
pub(super) fn backward(cx: &mut Case, all: bool) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let dx = p.f32("dx", &[b, t, d], Pool::Scratch);
    let dcls = p.f32("dcls", &[d], Pool::Grads);
    let dpos = p.f32("dpos", &[t, d], Pool::Grads);
    let dpatch = p.f32("dpatch", &[b * (t - 1), d], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, dx, 1.0)?;
    cx.input(&tw, dcls, 1.0)?;
    cx.input(&tw, dpos, 1.0)?;
    tw.poison(&[dpatch])?;
    if all {
        tw.run(|rt| embed_backward(rt, Some(dcls), Some(dpos), Some(dpatch), dx, b, t, d))?;
        for t in [dcls, dpos, dpatch] {
            cx.compare(&tw, t)?;
        }
        Ok(())
    } else {
        tw.run(|rt| embed_backward(rt, None, Some(dpos), None, dx, b, t, d))?;
        cx.compare(&tw, dpos)?;
        cx.compare_as(&tw, dcls, "dcls (untouched)")
    }
}

pub(super) fn cls_rows(cx: &mut Case, scatter: bool) -> Result<()> {
    let (b, t, d) = EMB;
    let mut p = Plan::new();
    let x = p.f32("x", &[b, t, d], Pool::Activations);
    let feat = p.f32("cls_rows", &[b, d], Pool::Activations);
    let tw = cx.twin(p)?;
    if scatter {
        cx.input(&tw, feat, 1.0)?;
        tw.poison(&[x])?; // every row is written: the cls rows, zeros elsewhere
        tw.run(|rt| cls_scatter(rt, x, feat, b, t, d))?;
        cx.compare_as(&tw, x, "dx")
    } else {
        cx.input(&tw, x, 1.0)?;
        tw.poison(&[feat])?;
        tw.run(|rt| cls_gather(rt, feat, x, b, t, d))?;
        cx.compare(&tw, feat)
    }
}
