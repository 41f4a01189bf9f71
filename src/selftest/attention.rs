//! Checks of `ops::attention`: the head permutations (dense and strided), the forward and the backward.
use super::Case;
use crate::error::Result;
use crate::ops::attention::{attention_backward, attention_forward, permute_heads, AttentionBuffers, Heads};
use crate::runtime::{Plan, Pool, Tensor};

/// Odd head size and token count (ViT-B/16 at 224 has N = 197).
const HEADS: Heads = Heads { b: 2, n: 197, h: 3, hd: 23 };

/// The k part of a fused qkv (row stride 3D, offset D) into head-major (B, H, N, hd).
pub(super) fn permute_to_heads(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let qkv = p.f32("qkv", &[s.b, s.n, 3 * d], Pool::Activations);
    let k = p.f32("k", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    tw.poison(&[k])?;
    tw.run(|rt| permute_heads(rt, k, qkv.slice(d, qkv.numel - d), s, 3 * d, true))?;
    cx.compare(&tw, k)
}

/// Head-major back to rows: into a dense (B, N, D), or into the v part of a (B, N, 3D) whose other
/// columns must stay untouched (so it starts from random values, not poison).
pub(super) fn permute_from_heads(cx: &mut Case, strided: bool) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let heads = p.f32("heads", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let rows = p.f32("rows", &[s.b, s.n, d], Pool::Activations);
    let dqkv = p.f32("dqkv", &[s.b, s.n, 3 * d], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, heads, 1.0)?;
    if strided {
        cx.input(&tw, dqkv, 1.0)?;
        tw.run(|rt| permute_heads(rt, dqkv.slice(2 * d, dqkv.numel - 2 * d), heads, s, 3 * d, false))?;
        cx.compare(&tw, dqkv)
    } else {
        tw.poison(&[rows])?;
        tw.run(|rt| permute_heads(rt, rows, heads, s, d, false))?;
        cx.compare(&tw, rows)
    }
}

fn attention_plan(p: &mut Plan, s: Heads) -> (Tensor, Tensor, AttentionBuffers) {
    p.add_cublas_workspace();
    let d = s.d();
    let qkv = p.f32("qkv", &[s.b, s.n, 3 * d], Pool::Activations);
    let out = p.f32("out", &[s.b, s.n, d], Pool::Activations);
    let buf = AttentionBuffers {
        q: p.f32("q", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        k: p.f32("k", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        v: p.f32("v", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        o: p.f32("o", &[s.b, s.h, s.n, s.hd], Pool::Activations),
        probs: p.f32("probs", &[s.b, s.h, s.n, s.n], Pool::Activations),
    };
    (qkv, out, buf)
}

pub(super) fn forward(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let mut p = Plan::new();
    let (qkv, out, buf) = attention_plan(&mut p, s);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    tw.poison(&[out, buf.q, buf.k, buf.v, buf.o, buf.probs])?;
    tw.run(|rt| attention_forward(rt, out, qkv, &buf, s))?;
    for t in [out, buf.probs, buf.q, buf.k, buf.v, buf.o] {
        cx.compare(&tw, t)?;
    }
    Ok(())
}

/// The backward in isolation: the forward runs on the CPU and its saved tensors are copied across.
pub(super) fn backward(cx: &mut Case) -> Result<()> {
    let s = HEADS;
    let d = s.d();
    let mut p = Plan::new();
    let (qkv, out, buf) = attention_plan(&mut p, s);
    let dout = p.f32("dout", &[s.b, s.n, d], Pool::Scratch);
    let dqkv = p.f32("dqkv", &[s.b, s.n, 3 * d], Pool::Scratch);
    let dscores = p.f32("dscores", &[s.b, s.h, s.n, s.n], Pool::Scratch);
    let dtmp = p.f32("dtmp", &[s.b, s.h, s.n, s.hd], Pool::Scratch);
    let tw = cx.twin(p)?;
    cx.input(&tw, qkv, 1.0)?;
    attention_forward(&tw.cpu, out, qkv, &buf, s)?;
    for t in [buf.q, buf.k, buf.v, buf.o, buf.probs] {
        tw.copy_to_dev(t)?;
    }
    cx.input(&tw, dout, 1.0)?;
    tw.poison(&[dqkv, dscores, dtmp])?;
    tw.run(|rt| attention_backward(rt, dqkv, dout, &buf, dscores, dtmp, s))?;
    cx.compare(&tw, dqkv)?;
    // dv lands in buf.o; dscores holds dS: both are part of the contract the model relies on.
    cx.compare_as(&tw, buf.o, "o (dv, head-major)")?;
    cx.compare(&tw, dscores)
}
