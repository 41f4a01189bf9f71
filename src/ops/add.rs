//! Elementwise and broadcast adds: bias add and its backward, residual (axpy) add, and the per-channel
//! scale of LayerScale. CUDA twin: `cuda/add.cu` (the column sums of the backwards: `ops::colsum`).
use crate::error::Result;
use crate::ops::colsum::{column_sums, Terms};
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

/// `dbias[c] += Σ_r dout[r, c]`, in `ops::colsum`'s two stages.   dout: (rows, cols)   dbias: (cols)
/// part: scratch of `colsum::partials_len(rows, cols, 1)`
pub fn bias_backward(rt: &Runtime, dbias: Tensor, dout: Tensor, part: Tensor) -> Result<()> {
    column_sums(rt, [Some(dbias), None], part, Terms::Plain { a: dout }, dbias.numel)
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

/// `dgamma[c] += Σ_r dout[r, c] · inp[r, c]`, in `ops::colsum`'s two stages.
/// dout, inp: (rows, cols)   dgamma: (cols)   part: scratch of `colsum::partials_len(rows, cols, 1)`
pub fn mul_cols_backward_gamma(rt: &Runtime, dgamma: Tensor, dout: Tensor, inp: Tensor, part: Tensor) -> Result<()> {
    column_sums(rt, [Some(dgamma), None], part, Terms::Product { a: dout, b: inp }, dgamma.numel)
}

/// dst = alpha · src (copy with scale).                                 dst, src: (n)
pub fn scale_copy(rt: &Runtime, dst: Tensor, src: Tensor, alpha: f32) -> Result<()> {
    assert_eq!(dst.numel, src.numel);
    match &rt.backend {
        Backend::Cpu => cpu::scale_copy(rt.f32_mut(dst), rt.f32(src), alpha),
        Backend::Cuda(cu) => cu.launch(
            "snella_scale_copy",
            grid_1d(dst.numel, 256),
            &[KArg::Ptr(rt.ptr(dst)), KArg::Ptr(rt.ptr(src)), KArg::F32(alpha), KArg::I64(dst.numel as i64)],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    /// Entries per rayon task (whole rows for the broadcast ops): ~64k, far above rayon's hand-off cost.
    /// Each entry is computed alone, so the split changes no bit.
    const TASK: usize = 1 << 16;

    /// Whole rows of `cols` per task.
    fn task_len(cols: usize) -> usize {
        (TASK / cols.max(1)).max(1) * cols
    }

    pub fn add_bias(out: &mut [f32], bias: &[f32]) {
        out.par_chunks_mut(task_len(bias.len())).for_each(|rows| {
            for row in rows.chunks_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
            }
        });
    }
    pub fn axpy(dst: &mut [f32], src: &[f32], alpha: f32) {
        dst.par_chunks_mut(TASK).zip(src.par_chunks(TASK)).for_each(|(dst, src)| {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += alpha * s);
        });
    }
    pub fn scale_copy(dst: &mut [f32], src: &[f32], alpha: f32) {
        dst.par_chunks_mut(TASK).zip(src.par_chunks(TASK)).for_each(|(dst, src)| {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = alpha * s);
        });
    }
    pub fn mul_cols(out: &mut [f32], inp: &[f32], gamma: &[f32], accumulate: bool) {
        let cols = gamma.len();
        out.par_chunks_mut(task_len(cols)).zip(inp.par_chunks(task_len(cols))).for_each(|(out, inp)| {
            for (o, x) in out.chunks_mut(cols).zip(inp.chunks(cols)) {
                for i in 0..cols {
                    let v = x[i] * gamma[i];
                    o[i] = if accumulate { o[i] + v } else { v };
                }
            }
        });
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
        let mut o = vec![0f32; rows * cols];
        super::cpu::mul_cols(&mut o, &x, &b, false);
        let want: Vec<f64> = (0..rows * cols).map(|i| x[i] as f64 * b[i % cols] as f64).collect();
        assert_close("mul_cols", &o, &want, 1e-7);
    }
}
