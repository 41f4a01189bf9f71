//! LayerNorm over the last dimension (eps given; the ViT uses 1e-6). CUDA twin: `cuda/layernorm.cu`.
use crate::error::Result;
use crate::ops::colsum::{column_sums, Terms};
use crate::runtime::cuda::{grid_rows, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// out = (inp - mean)·rstd·w + b per row; saves mean and rstd for the backward.
/// out, inp: (N, C)   mean, rstd: (N)   w, b: (C)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    rt: &Runtime,
    out: Tensor,
    mean: Tensor,
    rstd: Tensor,
    inp: Tensor,
    w: Tensor,
    b: Tensor,
    c: usize,
    eps: f32,
) -> Result<()> {
    let n = inp.numel / c;
    assert!(out.numel == inp.numel && mean.numel >= n && rstd.numel >= n && w.numel == c && b.numel == c);
    match &rt.backend {
        Backend::Cpu => {
            cpu::forward(rt.f32_mut(out), rt.f32_mut(mean), rt.f32_mut(rstd), rt.f32(inp), rt.f32(w), rt.f32(b), c, eps)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_layernorm_forward",
            grid_rows(n, 256, 0),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(mean)),
                KArg::Ptr(rt.ptr(rstd)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::Ptr(rt.ptr(w)),
                KArg::Ptr(rt.ptr(b)),
                KArg::I32(n as i32),
                KArg::I32(c as i32),
                KArg::F32(eps),
            ],
        )?,
    }
    Ok(())
}

/// Recomputes a forward's output from its saved statistics: out = (inp − mean)·rstd·w + b, bit-identical to
/// `layernorm_forward` (same expression), so the backward can drop the normalised activations.
/// out, inp: (N, C)   mean, rstd: (N)   w, b: (C)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_apply(
    rt: &Runtime,
    out: Tensor,
    inp: Tensor,
    mean: Tensor,
    rstd: Tensor,
    w: Tensor,
    b: Tensor,
    c: usize,
) -> Result<()> {
    let n = inp.numel / c;
    assert!(out.numel == inp.numel && mean.numel >= n && rstd.numel >= n && w.numel == c && b.numel == c);
    match &rt.backend {
        Backend::Cpu => cpu::apply(rt.f32_mut(out), rt.f32(inp), rt.f32(mean), rt.f32(rstd), rt.f32(w), rt.f32(b), c),
        Backend::Cuda(cu) => cu.launch(
            "snella_layernorm_apply",
            crate::runtime::cuda::grid_1d(inp.numel, 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::Ptr(rt.ptr(mean)),
                KArg::Ptr(rt.ptr(rstd)),
                KArg::Ptr(rt.ptr(w)),
                KArg::Ptr(rt.ptr(b)),
                KArg::I64(inp.numel as i64),
                KArg::I32(c as i32),
            ],
        )?,
    }
    Ok(())
}

/// dinp += LN'ᵀ·dout; dw += Σ_rows dout·x̂ and db += Σ_rows dout when given (trainable affine), in
/// `ops::colsum`'s two stages.
/// dinp, dout, inp: (N, C)   mean, rstd: (N)   w, dw, db: (C)   part: scratch of `colsum::partials_len(N, C, 2)`
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    rt: &Runtime,
    dinp: Tensor,
    dw: Option<Tensor>,
    db: Option<Tensor>,
    dout: Tensor,
    inp: Tensor,
    w: Tensor,
    mean: Tensor,
    rstd: Tensor,
    c: usize,
    part: Tensor,
) -> Result<()> {
    let n = inp.numel / c;
    assert!(dinp.numel == inp.numel && dout.numel == inp.numel);
    match &rt.backend {
        Backend::Cpu => {
            cpu::backward(rt.f32_mut(dinp), rt.f32(dout), rt.f32(inp), rt.f32(w), rt.f32(mean), rt.f32(rstd), c)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_layernorm_backward",
            grid_rows(n, 256, 0),
            &[
                KArg::Ptr(rt.ptr(dinp)),
                KArg::Ptr(rt.ptr(dout)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::Ptr(rt.ptr(w)),
                KArg::Ptr(rt.ptr(mean)),
                KArg::Ptr(rt.ptr(rstd)),
                KArg::I32(n as i32),
                KArg::I32(c as i32),
            ],
        )?,
    }
    if dw.is_some() || db.is_some() {
        column_sums(rt, [dw, db], part, Terms::LayerNorm { dout, x: inp, mean, rstd }, c)?;
    }
    Ok(())
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    /// Rows per rayon task: ~64k entries, far above rayon's hand-off cost. Each row is computed alone, so
    /// the split changes no bit.
    fn rows_per_task(c: usize) -> usize {
        ((1 << 16) / c.max(1)).max(1)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
        eps: f32,
    ) {
        let r = rows_per_task(c);
        let n = inp.len() / c;
        let (mean, rstd) = (&mut mean[..n], &mut rstd[..n]);
        out.par_chunks_mut(r * c)
            .zip(inp.par_chunks(r * c))
            .zip(mean.par_chunks_mut(r).zip(rstd.par_chunks_mut(r)))
            .for_each(|((out, inp), (mean, rstd))| forward_rows(out, mean, rstd, inp, w, b, c, eps));
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
        eps: f32,
    ) {
        for (r, (x, o)) in inp.chunks(c).zip(out.chunks_mut(c)).enumerate() {
            let m = x.iter().sum::<f32>() / c as f32;
            let v = x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / c as f32;
            let s = 1.0 / (v + eps).sqrt();
            for i in 0..c {
                o[i] = normalize(x[i], m, s, w[i], b[i]);
            }
            mean[r] = m;
            rstd[r] = s;
        }
    }

    /// The one expression both the forward and the recompute use, so they agree to the bit.
    #[inline(always)]
    fn normalize(x: f32, m: f32, s: f32, w: f32, b: f32) -> f32 {
        (x - m) * s * w + b
    }

    pub fn apply(out: &mut [f32], inp: &[f32], mean: &[f32], rstd: &[f32], w: &[f32], b: &[f32], c: usize) {
        let r = rows_per_task(c);
        out.par_chunks_mut(r * c).zip(inp.par_chunks(r * c)).zip(mean.par_chunks(r).zip(rstd.par_chunks(r))).for_each(
            |((out, inp), (mean, rstd))| {
                for (r, (x, o)) in inp.chunks(c).zip(out.chunks_mut(c)).enumerate() {
                    for i in 0..c {
                        o[i] = normalize(x[i], mean[r], rstd[r], w[i], b[i]);
                    }
                }
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    /// The input gradient (the affine's gradients are `ops::colsum`'s).
    pub fn backward(dinp: &mut [f32], dout: &[f32], inp: &[f32], w: &[f32], mean: &[f32], rstd: &[f32], c: usize) {
        let r = rows_per_task(c);
        let n = inp.len() / c;
        dinp[..n * c]
            .par_chunks_mut(r * c)
            .zip(dout.par_chunks(r * c).zip(inp.par_chunks(r * c)))
            .zip(mean.par_chunks(r).zip(rstd.par_chunks(r)))
            .for_each(|((dinp, (dout, inp)), (mean, rstd))| backward_rows(dinp, dout, inp, w, mean, rstd, c));
    }

    fn backward_rows(dinp: &mut [f32], dout: &[f32], inp: &[f32], w: &[f32], mean: &[f32], rstd: &[f32], c: usize) {
        for r in 0..inp.len() / c {
            let (x, g, dx) = (&inp[r * c..][..c], &dout[r * c..][..c], &mut dinp[r * c..][..c]);
            let (m, s) = (mean[r], rstd[r]);
            // dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂))
            let (mut dnorm_mean, mut dnorm_norm_mean) = (0f32, 0f32);
            for i in 0..c {
                let xh = (x[i] - m) * s;
                let dn = g[i] * w[i];
                dnorm_mean += dn;
                dnorm_norm_mean += dn * xh;
            }
            dnorm_mean /= c as f32;
            dnorm_norm_mean /= c as f32;
            for i in 0..c {
                let xh = (x[i] - m) * s;
                dx[i] += s * (g[i] * w[i] - dnorm_mean - xh * dnorm_norm_mean);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn layernorm_matches_f64() {
        let (n, c) = (5, 33);
        let x = randn(n * c, 1, 2.0);
        let w = randn(c, 2, 1.0);
        let b = randn(c, 3, 1.0);
        let g = randn(n * c, 4, 1.0);
        let (mut y, mut m, mut s) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        super::cpu::forward(&mut y, &mut m, &mut s, &x, &w, &b, c, 1e-6);
        let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
        super::cpu::backward(&mut dx, &g, &x, &w, &m, &s, c);
        crate::ops::colsum::cpu::column_sums(Some(&mut dw), Some(&mut db), &g, c, |r, i, g| g * ((x[i] - m[r]) * s[r]));
        // f64 reference: forward, and the backward by central differences of Σ g·y.
        let fwd = |x: &[f64], w: &[f64], b: &[f64]| -> Vec<f64> {
            let mut y = vec![0f64; n * c];
            for r in 0..n {
                let row = &x[r * c..][..c];
                let m = row.iter().sum::<f64>() / c as f64;
                let v = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
                for i in 0..c {
                    y[r * c + i] = (row[i] - m) / (v + 1e-6).sqrt() * w[i] + b[i];
                }
            }
            y
        };
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let (x64, w64, b64, g64) = (to64(&x), to64(&w), to64(&b), to64(&g));
        assert_close("layernorm out", &y, &fwd(&x64, &w64, &b64), 1e-6);
        let mut y2 = vec![0f32; n * c];
        super::cpu::apply(&mut y2, &x, &m, &s, &w, &b, c);
        assert_eq!(y, y2, "layernorm_apply must reproduce the forward bit for bit");
        let obj = |x: &[f64], w: &[f64], b: &[f64]| fwd(x, w, b).iter().zip(&g64).map(|(a, b)| a * b).sum::<f64>();
        let h = 1e-6;
        let num = |which: usize, len: usize| -> Vec<f64> {
            (0..len)
                .map(|i| {
                    let (mut xp, mut wp, mut bp) = (x64.clone(), w64.clone(), b64.clone());
                    let (mut xm, mut wm, mut bm) = (x64.clone(), w64.clone(), b64.clone());
                    match which {
                        0 => {
                            xp[i] += h;
                            xm[i] -= h
                        }
                        1 => {
                            wp[i] += h;
                            wm[i] -= h
                        }
                        _ => {
                            bp[i] += h;
                            bm[i] -= h
                        }
                    }
                    (obj(&xp, &wp, &bp) - obj(&xm, &wm, &bm)) / (2.0 * h)
                })
                .collect()
        };
        assert_close("layernorm dinp", &dx, &num(0, n * c), 1e-5);
        assert_close("layernorm dw", &dw, &num(1, c), 1e-5);
        assert_close("layernorm db", &db, &num(2, c), 1e-5);
    }
}
