//! Row softmax with an input scale: out = softmax(scale·inp) over the last dimension.
//! CUDA twin: `cuda/softmax.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_rows, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// out = softmax(scale · inp) per row; out may be inp (in place).    out, inp: (rows, cols)
pub fn softmax_forward(rt: &Runtime, out: Tensor, inp: Tensor, cols: usize, scale: f32) -> Result<()> {
    assert_eq!(out.numel, inp.numel);
    match &rt.backend {
        Backend::Cpu if out == inp => cpu::forward_inplace(rt.f32_mut(out), cols, scale),
        Backend::Cpu => cpu::forward(rt.f32_mut(out), rt.f32(inp), cols, scale),
        Backend::Cuda(cu) => cu.launch(
            "snella_softmax_forward",
            grid_rows(inp.numel / cols, 256, 0),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::I32((inp.numel / cols) as i32),
                KArg::I32(cols as i32),
                KArg::F32(scale),
            ],
        )?,
    }
    Ok(())
}

/// dinp = scale · out ⊙ (dout − Σ_row dout⊙out) (overwrites; dinp may be dout, in place).
/// dinp, out, dout: (rows, cols)
pub fn softmax_backward(rt: &Runtime, dinp: Tensor, out: Tensor, dout: Tensor, cols: usize, scale: f32) -> Result<()> {
    assert!(dinp.numel == out.numel && dout.numel == out.numel && dinp != out);
    match &rt.backend {
        Backend::Cpu if dinp == dout => cpu::backward_inplace(rt.f32_mut(dinp), rt.f32(out), cols, scale),
        Backend::Cpu => cpu::backward(rt.f32_mut(dinp), rt.f32(out), rt.f32(dout), cols, scale),
        Backend::Cuda(cu) => cu.launch(
            "snella_softmax_backward",
            grid_rows(out.numel / cols, 256, 0),
            &[
                KArg::Ptr(rt.ptr(dinp)),
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(dout)),
                KArg::I32((out.numel / cols) as i32),
                KArg::I32(cols as i32),
                KArg::F32(scale),
            ],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use crate::ops::lanes::{exp_lanes, sum_lanes, widest_vectors};
    use rayon::prelude::*;

    pub fn forward(out: &mut [f32], inp: &[f32], cols: usize, scale: f32) {
        out.par_chunks_mut(cols).zip(inp.par_chunks(cols)).for_each(|(o, x)| row_forward(o, x, scale));
    }

    pub fn forward_inplace(x: &mut [f32], cols: usize, scale: f32) {
        // One copy of the input row per task, reused (the row is overwritten while it is read).
        x.par_chunks_mut(cols).for_each_init(
            || vec![0f32; cols],
            |tmp, row| {
                tmp.copy_from_slice(row);
                row_forward(row, tmp, scale)
            },
        );
    }

    pub fn backward_inplace(g: &mut [f32], out: &[f32], cols: usize, scale: f32) {
        g.par_chunks_mut(cols).zip(out.par_chunks(cols)).for_each(|(g, y)| {
            let dot: f32 = y.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
            for i in 0..g.len() {
                g[i] = scale * y[i] * (g[i] - dot);
            }
        });
    }

    pub fn row_forward(o: &mut [f32], x: &[f32], scale: f32) {
        let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        let inv = 1.0 / exps(o, x, scale, mx);
        o.iter_mut().for_each(|o| *o *= inv);
    }

    widest_vectors! {
        /// o_i = exp(x_i·scale − mx) and Σo, in vector lanes.
        fn exps(o: &mut [f32], x: &[f32], scale: f32, mx: f32) -> f32 => exps_lanes
    }

    #[inline(always)]
    fn exps_lanes(o: &mut [f32], x: &[f32], scale: f32, mx: f32) -> f32 {
        let x = &x[..o.len()];
        for (o, &v) in o.iter_mut().zip(x) {
            *o = exp_lanes(v * scale - mx);
        }
        sum_lanes(o)
    }

    pub fn backward(dinp: &mut [f32], out: &[f32], dout: &[f32], cols: usize, scale: f32) {
        dinp.par_chunks_mut(cols).zip(out.par_chunks(cols)).zip(dout.par_chunks(cols)).for_each(|((d, y), g)| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for i in 0..d.len() {
                d[i] = scale * y[i] * (g[i] - dot);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn softmax_matches_f64() {
        let (rows, cols, scale) = (6, 17, 0.37);
        let x = randn(rows * cols, 1, 3.0);
        let g = randn(rows * cols, 2, 1.0);
        let mut y = vec![0f32; rows * cols];
        let mut dx = vec![0f32; rows * cols];
        super::cpu::forward(&mut y, &x, cols, scale);
        super::cpu::backward(&mut dx, &y, &g, cols, scale);
        let mut y64 = vec![0f64; rows * cols];
        let mut dx64 = vec![0f64; rows * cols];
        for r in 0..rows {
            let xs: Vec<f64> = x[r * cols..][..cols].iter().map(|&v| v as f64 * scale as f64).collect();
            let mx = xs.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = xs.iter().map(|v| (v - mx).exp()).sum();
            for i in 0..cols {
                y64[r * cols + i] = (xs[i] - mx).exp() / z;
            }
            let dot: f64 = (0..cols).map(|i| y64[r * cols + i] * g[r * cols + i] as f64).sum();
            for i in 0..cols {
                dx64[r * cols + i] = scale as f64 * y64[r * cols + i] * (g[r * cols + i] as f64 - dot);
            }
        }
        assert_close("softmax out", &y, &y64, 1e-6);
        assert_close("softmax dinp", &dx, &dx64, 1e-6);
    }
}
