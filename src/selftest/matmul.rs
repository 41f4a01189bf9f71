//! Checks of `ops::matmul` (cuBLAS on the device): every transpose, batches, alpha, accumulation, a
//! broadcast B, row strides, and the TF32 and bf16 GEMM modes.
use super::Case;
use crate::error::Result;
use crate::ops::{matmul, Matmul};
use crate::runtime::GemmPrecision;
use crate::runtime::{Plan, Pool};

pub(super) const ALL_TRANSPOSES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn tn(t: bool) -> char {
    if t {
        't'
    } else {
        'n'
    }
}

/// For each (ta, tb): a single product, a batched one with alpha, and a batched one accumulating into C.
pub(super) fn variants(cx: &mut Case, transposes: &[(bool, bool)], prec: GemmPrecision) -> Result<()> {
    let (m, n, k, batch) = (173, 95, 131, 3);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let a = p.f32("a", &[batch, m, k], Pool::Activations);
    let b = p.f32("b", &[batch, k, n], Pool::Activations);
    let mut outs = Vec::new();
    for &(ta, tb) in transposes {
        let tag = format!("{}{}", tn(ta), tn(tb));
        let single = p.f32(format!("c_{tag}"), &[m, n], Pool::Activations);
        let alpha = p.f32(format!("c_{tag}_batched_alpha"), &[batch, m, n], Pool::Activations);
        let acc = p.f32(format!("c_{tag}_batched_accumulate"), &[batch, m, n], Pool::Activations);
        outs.push((ta, tb, single, alpha, acc));
    }
    let tw = cx.twin(p)?;
    tw.set_gemm_precision(prec);
    cx.input(&tw, a, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    for &(ta, tb, single, alpha, acc) in &outs {
        tw.poison(&[single, alpha])?;
        cx.input(&tw, acc, 1.0)?;
        let s = Matmul::new(m, n, k, ta, tb);
        tw.run(|rt| {
            matmul(rt, single, a, b, s)?;
            matmul(rt, alpha, a, b, s.batched(batch).alpha(0.37))?;
            matmul(rt, acc, a, b, s.batched(batch).alpha(-1.25).accumulate())
        })?;
        for t in [single, alpha, acc] {
            cx.compare(&tw, t)?;
        }
    }
    Ok(())
}

/// One B for every product of the batch (the frozen weight times a batch of activations).
pub(super) fn broadcast_b(cx: &mut Case) -> Result<()> {
    let (m, n, k, batch) = (67, 143, 97, 5);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let a = p.f32("a", &[batch, m, k], Pool::Activations);
    let b = p.f32("b", &[k, n], Pool::Frozen);
    let c_nn = p.f32("c_nn", &[batch, m, n], Pool::Activations);
    let c_nt_acc = p.f32("c_nt_accumulate", &[batch, m, n], Pool::Activations);
    let tw = cx.twin(p)?;
    cx.input(&tw, a, 1.0)?;
    cx.input(&tw, b, 1.0)?;
    tw.poison(&[c_nn])?;
    cx.input(&tw, c_nt_acc, 1.0)?;
    tw.run(|rt| {
        matmul(rt, c_nn, a, b, Matmul::new(m, n, k, false, false).batched(batch).broadcast_b())?;
        matmul(
            rt,
            c_nt_acc,
            a,
            b,
            Matmul::new(m, n, k, false, true).batched(batch).broadcast_b().alpha(0.5).accumulate(),
        )
    })?;
    cx.compare(&tw, c_nn)?;
    cx.compare(&tw, c_nt_acc)
}

/// Row strides: op(A), op(B) read as column blocks of wider buffers, C written into a column block of
/// a wider buffer whose other columns must stay untouched (e.g. q of a fused qkv). Batch 1 only.
pub(super) fn strided(cx: &mut Case) -> Result<()> {
    let (m, n, k) = (131, 77, 95);
    let mut p = Plan::new();
    p.add_cublas_workspace();
    let mut cases = Vec::new();
    for (ta, tb) in ALL_TRANSPOSES {
        let tag = format!("{}{}", tn(ta), tn(tb));
        // Stored shapes (rows, cols) of A and B; each sits at a column offset of a wider buffer.
        let (ra, ca) = if ta { (k, m) } else { (m, k) };
        let (rb, cb) = if tb { (n, k) } else { (k, n) };
        let (lda, ldb, ldc) = (ca + 17, cb + 11, n + 9);
        let a = p.f32(format!("a_{tag}"), &[ra, lda], Pool::Activations);
        let b = p.f32(format!("b_{tag}"), &[rb, ldb], Pool::Frozen);
        let c = p.f32(format!("c_{tag}_column_block"), &[m, ldc], Pool::Activations);
        cases.push((ta, tb, a, b, c, lda, ldb, ldc));
    }
    let tw = cx.twin(p)?;
    for (ta, tb, a, b, c, lda, ldb, ldc) in cases {
        cx.input(&tw, a, 1.0)?;
        cx.input(&tw, b, 1.0)?;
        cx.input(&tw, c, 1.0)?;
        let (a_off, b_off, c_off) = (7, 3, 4);
        let (av, bv, cv) =
            (a.slice(a_off, a.numel - a_off), b.slice(b_off, b.numel - b_off), c.slice(c_off, c.numel - c_off));
        let s = Matmul::new(m, n, k, ta, tb).ld(lda, ldb, ldc).alpha(0.83);
        // Half the products accumulate, so both C = and C += are exercised.
        let s = if ta == tb { s.accumulate() } else { s };
        tw.run(|rt| matmul(rt, cv, av, bv, s))?;
        cx.compare(&tw, c)?;
    }
    Ok(())
}
