//! Checks of `ops::kmerge`, the kernelized merge of SNELL / SNELLA: the forward and the backward of every
//! kernel, with and without the mixture, on every shape of [`MERGE_SHAPES`]. The backward also checks the
//! mixture scalars' gradients of both devices against the f64 closed form.
use super::{Case, Twin};
use crate::error::Result;
use crate::ops::kmerge::reference::mix_grads_f64;
use crate::ops::kmerge::{merge_backward, merge_forward, Along, Factors, KernelKind, MergeScratch};
use crate::runtime::{Plan, Pool, Tensor};

/// Shapes (n_in, n_out, d) and factor scales (0: kaiming-like, 1/sqrt(n_in·d)) of the merge checks: a
/// ViT-like branch at the initial scale; an odd d > 32 (wider than a tile row) at a trained-like scale;
/// partial tiles in both directions, a wide one, d = 16; the degenerate d = 1 of a tiny branch; a single row
/// and a single column (a softmax over one entry). The tiny ones get small explicit scales: at 1/sqrt(n_in·d)
/// their products a_i·b_j reach ~1, the softmax of K/γ can saturate, and the f64 check of dα, dγ, dβ would
/// measure f32 cancellation instead of the kernels (see `backward`).
const MERGE_SHAPES: [(usize, usize, usize, f32); 8] = [
    (173, 301, 8, 0.0),
    (67, 45, 33, 0.3),
    (37, 45, 4, 0.0),
    (200, 333, 8, 0.0),
    (96, 384, 16, 0.0),
    (5, 3, 1, 0.2),
    (1, 45, 4, 0.1),
    (37, 1, 4, 0.0),
];

fn merge_scale(n_in: usize, d: usize, scale: f32) -> f32 {
    if scale > 0.0 {
        scale
    } else {
        1.0 / ((n_in * d) as f32).sqrt()
    }
}

/// Whether the products a_i·b_j (std scale²·sqrt(2d)) stay well below 1 at this shape's factor scale, so K/γ
/// stays small.
fn small_products(n_in: usize, d: usize, scale: f32) -> bool {
    let s = merge_scale(n_in, d, scale);
    s * s * ((2 * d) as f32).sqrt() < 0.1
}

/// The three mixture scalars [alpha, gamma, beta], drawn around the official initial values.
fn mix_values(cx: &mut Case) -> [f32; 3] {
    [cx.uniform(0.5, 1.5) as f32, cx.uniform(0.5, 1.0) as f32, cx.uniform(-0.3, 0.3) as f32]
}

struct MergeSetup {
    f: Factors,
    mix: [Tensor; 3],
    s: MergeScratch,
}

fn merge_plan(p: &mut Plan, n_in: usize, n_out: usize, d: usize) -> MergeSetup {
    p.add_cublas_workspace();
    let in_qs = p.f32("in_qs", &[2, n_in, d], Pool::Trainable);
    let out_qs = p.f32("out_qs", &[2, n_out, d], Pool::Trainable);
    let mix = ["alpha", "gamma", "beta"].map(|n| p.f32(n, &[1], Pool::Trainable));
    let s = MergeScratch::plan(p, "selftest", n_in, n_out, d);
    MergeSetup { f: Factors { in_qs, out_qs, mix: None, n_in, n_out, half_rank: d }, mix, s }
}

/// Random factors and mixture scalars on both sides, poisoned scratch; returns [α, γ, β].
fn merge_inputs(cx: &mut Case, tw: &Twin, st: &MergeSetup, scale: f32) -> Result<[f32; 3]> {
    cx.input(tw, st.f.in_qs, scale)?;
    cx.input(tw, st.f.out_qs, scale)?;
    let mv = mix_values(cx);
    for (t, v) in st.mix.iter().zip(mv) {
        tw.upload(*t, &[v])?;
    }
    let s = &st.s;
    tw.poison(&[s.k, s.aug_a, s.aug_b, s.tmp_a, s.tmp_b, s.mix_part])?;
    Ok(mv)
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// M = K(A, B), and M = K + α·softmax(K/γ) + β, for each shape.
pub(super) fn forward(cx: &mut Case, kind: KernelKind) -> Result<()> {
    for (n_in, n_out, d, scale) in MERGE_SHAPES {
        let mut p = Plan::new();
        let st = merge_plan(&mut p, n_in, n_out, d);
        let m = p.f32(format!("M ({n_in}x{n_out}, d {d})"), &[n_in, n_out], Pool::Scratch);
        let m_mix = p.f32(format!("M mixture ({n_in}x{n_out}, d {d})"), &[n_in, n_out], Pool::Scratch);
        let tw = cx.twin(p)?;
        merge_inputs(cx, &tw, &st, merge_scale(n_in, d, scale))?;
        tw.poison(&[m, m_mix])?;
        let mixed = Factors { mix: Some(st.mix), ..st.f };
        tw.run(|rt| {
            merge_forward(rt, m, &st.f, kind, &st.s)?;
            merge_forward(rt, m_mix, &mixed, kind, &st.s)
        })?;
        cx.compare(&tw, m)?;
        cx.compare(&tw, m_mix)?;
    }
    Ok(())
}

/// The merge backward from a random dL/dM, for each shape: without the mixture, with it (dα, dγ, dβ
/// too), and with a frozen mixture (no scalar gradients). Factor gradients accumulate from random values.
/// dα, dγ, dβ are compared between the devices and, on each device, with the f64 closed form relative to
/// the Σ|term| of their sums (which cancel), within 1e-5, on the shapes whose products stay small.
pub(super) fn backward(cx: &mut Case, kind: KernelKind) -> Result<()> {
    for (n_in, n_out, d, scale) in MERGE_SHAPES {
        let mut p = Plan::new();
        let st = merge_plan(&mut p, n_in, n_out, d);
        let g = p.f32("dM", &[n_in, n_out], Pool::Scratch);
        let variants = ["plain", "mixture", "frozen mixture"].map(|v| {
            let da = p.f32(format!("d_in_qs {v} ({n_in}x{n_out}, d {d})"), &[2, n_in, d], Pool::Grads);
            let db = p.f32(format!("d_out_qs {v} ({n_in}x{n_out}, d {d})"), &[2, n_out, d], Pool::Grads);
            (da, db)
        });
        let dmix =
            ["d_alpha", "d_gamma", "d_beta"].map(|n| p.f32(format!("{n} ({n_in}x{n_out}, d {d})"), &[1], Pool::Grads));
        let k = p.f32("K (for dM)", &[n_in, n_out], Pool::Scratch);
        let tw = cx.twin(p)?;
        let mv = merge_inputs(cx, &tw, &st, merge_scale(n_in, d, scale))?;
        // dM = 1 + noise + 2·K/std(K). With a zero-mean dM the three scalar gradients are sums that
        // cancel to ~0 by chance, and a relative comparison of them would fail at random; the offset
        // gives dβ = ΣdM and dα = ΣdM·S a size, the part along K gives dγ (a covariance with K) one.
        merge_forward(&tw.cpu, k, &st.f, kind, &st.s)?;
        let kv = tw.cpu.download(k)?;
        let mean = kv.iter().map(|&x| x as f64).sum::<f64>() / kv.len() as f64;
        let std = (kv.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / kv.len() as f64).sqrt().max(1e-30);
        let noise = cx.randn(n_in * n_out, 1.0);
        let gv: Vec<f32> =
            noise.iter().zip(&kv).map(|(&z, &kx)| 1.0 + z + (2.0 * (kx as f64 - mean) / std) as f32).collect();
        for (da, db) in variants {
            cx.input(&tw, da, 1.0)?;
            cx.input(&tw, db, 1.0)?;
        }
        for t in dmix {
            tw.upload(t, &[0.0])?;
        }
        let mixed = Factors { mix: Some(st.mix), ..st.f };
        for (v, (da, db)) in variants.into_iter().enumerate() {
            tw.upload(g, &gv)?; // the backward overwrites dM
            let (f, dm) = match v {
                0 => (st.f, None),
                1 => (mixed, Some(dmix)),
                _ => (mixed, None),
            };
            tw.run(|rt| merge_backward(rt, da, db, dm, g, &f, kind, &st.s, Along::default()))?;
            cx.compare(&tw, da)?;
            cx.compare(&tw, db)?;
        }
        // Scalars summed over every entry of M (in another order on each side): looser than the factors.
        for t in dmix {
            cx.compare_tol(&tw, t, 1e-4)?;
        }
        // Each device against the f64 closed form from the CPU's K (the same f32 values, exact in f64), where
        // K/γ stays small: a large one makes the softmax nearly one-hot, and then u = S·(αG − Σ αG·S) cancels
        // in f32 on both devices beyond what Σ|terms| measures.
        if small_products(n_in, d, scale) {
            let (want, sums) = mix_grads_f64(&to64(&kv), &to64(&gv), mv.map(|x| x as f64), n_out);
            for (side, rt) in [("cpu", &tw.cpu), ("device", &tw.dev)] {
                for (c, name) in ["d_alpha", "d_gamma", "d_beta"].iter().enumerate() {
                    let got = rt.download(dmix[c])?[0];
                    let label = format!("{name} {side} vs f64, |err| / sum |terms| ({n_in}x{n_out}, d {d})");
                    cx.compare_scaled(label, want[c], got, sums[c], 1e-5);
                }
            }
        }
    }
    Ok(())
}

/// The piecewise-linear backward where rows of B nearly coincide with rows of A (B = A with a few ulps
/// changed): cdist's expanded distance is rounding noise there, and both devices must treat it as 0 (the
/// ratio 0.1·g/D would otherwise divide by the last bits of a sum, and the devices would disagree).
pub(super) fn backward_coincident_rows(cx: &mut Case) -> Result<()> {
    let (n, d) = (41, 8);
    let mut p = Plan::new();
    let st = merge_plan(&mut p, n, n, d);
    let g = p.f32("dM", &[n, n], Pool::Scratch);
    let da = p.f32("d_in_qs (coincident rows)", &[2, n, d], Pool::Grads);
    let db = p.f32("d_out_qs (coincident rows)", &[2, n, d], Pool::Grads);
    let tw = cx.twin(p)?;
    let a = cx.input(&tw, st.f.in_qs, 0.7)?;
    let b: Vec<f32> = a.iter().map(|&x| f32::from_bits(x.to_bits() + (cx.below(4) as u32))).collect();
    tw.upload(st.f.out_qs, &b)?;
    cx.input(&tw, g, 1.0)?;
    tw.upload(da, &vec![0.0; 2 * n * d])?;
    tw.upload(db, &vec![0.0; 2 * n * d])?;
    let s = &st.s;
    tw.poison(&[s.k, s.aug_a, s.aug_b, s.tmp_a, s.tmp_b, s.mix_part])?;
    tw.run(|rt| merge_backward(rt, da, db, None, g, &st.f, KernelKind::PiecewiseLinear, &st.s, Along::default()))?;
    cx.compare(&tw, da)?;
    cx.compare(&tw, db)
}
