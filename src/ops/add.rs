//! Elementwise and broadcast adds: bias add and its backward, residual (axpy) add, and the per-channel
//! scale of LayerScale. CUDA twin: `cuda/add.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// `out[r, c] += bias[c]`.                                              out: (rows, cols)   bias: (cols)
pub fn add_bias(rt: &Runtime, out: Tensor, bias: Tensor) -> Result<()> {
    let cols = bias.numel;
    assert_eq!(out.numel % cols, 0);
    match &rt.backend {
        Backend::Cpu => cpu::add_bias(rt.f32_mut(out), rt.f32(bias)),
        Backend::Cuda(cu) => cu.launch(
            "snella_add_bias",
            grid_1d(out.numel, 256),
            &[KArg::Ptr(rt.ptr(out)), KArg::Ptr(rt.ptr(bias)), KArg::I64(out.numel as i64), KArg::I32(cols as i32)],
        )?,
    }
    Ok(())
}

/// `dbias[c] += Σ_r dout[r, c]`.                                        dout: (rows, cols)   dbias: (cols)
pub fn bias_backward(rt: &Runtime, dbias: Tensor, dout: Tensor) -> Result<()> {
    let cols = dbias.numel;
    match &rt.backend {
        Backend::Cpu => cpu::bias_backward(rt.f32_mut(dbias), rt.f32(dout)),
        Backend::Cuda(cu) => cu.launch(
            "snella_bias_backward",
            grid_1d(cols, 128),
            &[
                KArg::Ptr(rt.ptr(dbias)),
                KArg::Ptr(rt.ptr(dout)),
                KArg::I32((dout.numel / cols) as i32),
                KArg::I32(cols as i32),
            ],
        )?,
    }
    Ok(())
}

/// dst += alpha · src.                                                  dst, src: (n)
pub fn axpy(rt: &Runtime, dst: Tensor, src: Tensor, alpha: f32) -> Result<()> {
    assert_eq!(dst.numel, src.numel);
    match &rt.backend {
        Backend::Cpu => cpu::axpy(rt.f32_mut(dst), rt.f32(src), alpha),
        Backend::Cuda(cu) => cu.launch(
            "snella_axpy",
            grid_1d(dst.numel, 256),
            &[KArg::Ptr(rt.ptr(dst)), KArg::Ptr(rt.ptr(src)), KArg::F32(alpha), KArg::I64(dst.numel as i64)],
        )?,
    }
    Ok(())
}

/// `out[r, c] (+)= inp[r, c] · gamma[c]` (LayerScale; `accumulate` adds into out, e.g. the residual stream).
/// out, inp: (rows, cols)   gamma: (cols)
pub fn mul_cols(rt: &Runtime, out: Tensor, inp: Tensor, gamma: Tensor, accumulate: bool) -> Result<()> {
    assert_eq!(out.numel, inp.numel);
    match &rt.backend {
        Backend::Cpu => cpu::mul_cols(rt.f32_mut(out), rt.f32(inp), rt.f32(gamma), accumulate),
        Backend::Cuda(cu) => cu.launch(
            "snella_mul_cols",
            grid_1d(out.numel, 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::Ptr(rt.ptr(gamma)),
                KArg::I64(out.numel as i64),
                KArg::I32(gamma.numel as i32),
                KArg::I32(accumulate as i32),
            ],
        )?,
    }
    Ok(())
}

/// `dgamma[c] += Σ_r dout[r, c] · inp[r, c]`.                          dout, inp: (rows, cols)   dgamma: (cols)
pub fn mul_cols_backward_gamma(rt: &Runtime, dgamma: Tensor, dout: Tensor, inp: Tensor) -> Result<()> {
    let cols = dgamma.numel;
    match &rt.backend {
        Backend::Cpu => cpu::mul_cols_backward_gamma(rt.f32_mut(dgamma), rt.f32(dout), rt.f32(inp)),
        Backend::Cuda(cu) => cu.launch(
            "snella_mul_cols_backward_gamma",
            grid_1d(cols, 128),
            &[
                KArg::Ptr(rt.ptr(dgamma)),
                KArg::Ptr(rt.ptr(dout)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::I32((dout.numel / cols) as i32),
                KArg::I32(cols as i32),
            ],
        )?,
    }
    Ok(())
}

/// dst = alpha · src (copy with scale).                                 dst, src: (n)
pub fn scale_copy(rt: &Runtime, dst: Tensor, src: Tensor, alpha: f32) -> Result<()> {
    assert_eq!(dst.numel, src.numel);
    match &rt.backend {
        Backend::Cpu => rt.f32_mut(dst).iter_mut().zip(rt.f32(src)).for_each(|(d, &s)| *d = alpha * s),
        Backend::Cuda(cu) => cu.launch(
            "snella_scale_copy",
            grid_1d(dst.numel, 256),
            &[KArg::Ptr(rt.ptr(dst)), KArg::Ptr(rt.ptr(src)), KArg::F32(alpha), KArg::I64(dst.numel as i64)],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    pub fn add_bias(out: &mut [f32], bias: &[f32]) {
        for row in out.chunks_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
        }
    }
    pub fn bias_backward(dbias: &mut [f32], dout: &[f32]) {
        let cols = dbias.len();
        for (c, d) in dbias.iter_mut().enumerate() {
            // Sum in row order, as the CUDA kernel does, so both are reproducible.
            *d += dout.iter().skip(c).step_by(cols).sum::<f32>();
        }
    }
    pub fn axpy(dst: &mut [f32], src: &[f32], alpha: f32) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += alpha * s);
    }
    pub fn mul_cols(out: &mut [f32], inp: &[f32], gamma: &[f32], accumulate: bool) {
        let cols = gamma.len();
        for (o, x) in out.chunks_mut(cols).zip(inp.chunks(cols)) {
            for i in 0..cols {
                let v = x[i] * gamma[i];
                o[i] = if accumulate { o[i] + v } else { v };
            }
        }
    }
    pub fn mul_cols_backward_gamma(dgamma: &mut [f32], dout: &[f32], inp: &[f32]) {
        let cols = dgamma.len();
        for (c, d) in dgamma.iter_mut().enumerate() {
            *d += dout
                .iter()
                .skip(c)
                .step_by(cols)
                .zip(inp.iter().skip(c).step_by(cols))
                .map(|(g, x)| g * x)
                .sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn broadcast_ops_match_f64() {
        let (rows, cols) = (7, 5);
        let x = randn(rows * cols, 1, 1.0);
        let b = randn(cols, 2, 1.0);
        let mut y = x.clone();
        super::cpu::add_bias(&mut y, &b);
        let want: Vec<f64> = (0..rows * cols).map(|i| x[i] as f64 + b[i % cols] as f64).collect();
        assert_close("add_bias", &y, &want, 1e-7);
        let mut db = vec![1f32; cols];
        super::cpu::bias_backward(&mut db, &x);
        let want: Vec<f64> = (0..cols).map(|c| 1.0 + (0..rows).map(|r| x[r * cols + c] as f64).sum::<f64>()).collect();
        assert_close("bias_backward", &db, &want, 1e-6);
        let mut o = vec![0f32; rows * cols];
        super::cpu::mul_cols(&mut o, &x, &b, false);
        let want: Vec<f64> = (0..rows * cols).map(|i| x[i] as f64 * b[i % cols] as f64).collect();
        assert_close("mul_cols", &o, &want, 1e-7);
        let mut dg = vec![0f32; cols];
        super::cpu::mul_cols_backward_gamma(&mut dg, &x, &x);
        let want: Vec<f64> =
            (0..cols).map(|c| (0..rows).map(|r| (x[r * cols + c] as f64).powi(2)).sum::<f64>()).collect();
        assert_close("mul_cols_backward_gamma", &dg, &want, 1e-6);
    }
}
