//! Exact-erf GELU (torch `F.gelu`, approximate='none'). CUDA twin: `cuda/gelu.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// out = GELU(inp), elementwise.                                      out, inp: (n)
pub fn gelu_forward(rt: &Runtime, out: Tensor, inp: Tensor) -> Result<()> {
    assert_eq!(out.numel, inp.numel);
    match &rt.backend {
        Backend::Cpu => cpu::forward(rt.f32_mut(out), rt.f32(inp)),
        Backend::Cuda(c) => c.launch(
            "snella_gelu_forward",
            grid_1d(out.numel, 256),
            &[KArg::Ptr(rt.ptr(out)), KArg::Ptr(rt.ptr(inp)), KArg::I64(out.numel as i64)],
        )?,
    }
    Ok(())
}

/// dinp = GELU'(inp) * dout (overwrites dinp; dinp may be dout, in place).  dinp, inp, dout: (n)
pub fn gelu_backward(rt: &Runtime, dinp: Tensor, inp: Tensor, dout: Tensor) -> Result<()> {
    assert!(dinp.numel == inp.numel && dinp.numel == dout.numel && dinp != inp);
    match &rt.backend {
        Backend::Cpu if dinp == dout => cpu::backward_inplace(rt.f32_mut(dinp), rt.f32(inp)),
        Backend::Cpu => cpu::backward(rt.f32_mut(dinp), rt.f32(inp), rt.f32(dout)),
        Backend::Cuda(c) => c.launch(
            "snella_gelu_backward",
            grid_1d(dinp.numel, 256),
            &[KArg::Ptr(rt.ptr(dinp)), KArg::Ptr(rt.ptr(inp)), KArg::Ptr(rt.ptr(dout)), KArg::I64(dinp.numel as i64)],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use crate::ops::lanes::{erf_lanes, exp_lanes, widest_vectors};
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    /// Entries per rayon task: ~16k entries, far above rayon's overhead. Each entry is computed alone, so
    /// the split changes no bit.
    const CHUNK: usize = 1 << 14;

    pub fn forward(out: &mut [f32], inp: &[f32]) {
        out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(out, inp)| forward_chunk(out, inp));
    }

    widest_vectors! {
        fn forward_chunk(out: &mut [f32], inp: &[f32]) => forward_lanes
    }

    #[inline(always)]
    fn forward_lanes(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = x * cdf(x);
        }
    }

    /// Φ(x), the standard normal CDF: GELU(x) = x·Φ(x).
    #[inline(always)]
    fn cdf(x: f32) -> f32 {
        0.5 * (1.0 + erf_lanes(x * FRAC_1_SQRT_2))
    }

    /// Φ(x) + x·φ(x), GELU's derivative.
    #[inline(always)]
    fn slope(x: f32) -> f32 {
        let pdf = INV_SQRT_2PI * exp_lanes(-0.5 * x * x);
        cdf(x) + x * pdf
    }

    pub fn backward_inplace(g: &mut [f32], inp: &[f32]) {
        g.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(g, inp)| backward_inplace_chunk(g, inp));
    }

    widest_vectors! {
        fn backward_inplace_chunk(g: &mut [f32], inp: &[f32]) => backward_inplace_lanes
    }

    #[inline(always)]
    fn backward_inplace_lanes(g: &mut [f32], inp: &[f32]) {
        for (d, &x) in g.iter_mut().zip(inp) {
            *d *= slope(x);
        }
    }

    pub fn backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        dinp.par_chunks_mut(CHUNK)
            .zip(inp.par_chunks(CHUNK))
            .zip(dout.par_chunks(CHUNK))
            .for_each(|((d, x), g)| backward_chunk(d, x, g));
    }

    widest_vectors! {
        fn backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) => backward_lanes
    }

    #[inline(always)]
    fn backward_lanes(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        for ((d, &x), &g) in dinp.iter_mut().zip(inp).zip(dout) {
            *d = g * slope(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn gelu_matches_f64() {
        let x = randn(1000, 1, 3.0);
        let g = randn(1000, 2, 1.0);
        let mut y = vec![0f32; 1000];
        let mut dx = vec![0f32; 1000];
        super::cpu::forward(&mut y, &x);
        super::cpu::backward(&mut dx, &x, &g);
        let y64: Vec<f64> = x
            .iter()
            .map(|&x| {
                let x = x as f64;
                0.5 * x * (1.0 + libm_erf(x / 2f64.sqrt()))
            })
            .collect();
        let dx64: Vec<f64> = x
            .iter()
            .zip(&g)
            .map(|(&x, &g)| {
                let x = x as f64;
                let cdf = 0.5 * (1.0 + libm_erf(x / 2f64.sqrt()));
                g as f64 * (cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt())
            })
            .collect();
        assert_close("gelu out", &y, &y64, 1e-6);
        assert_close("gelu dinp", &dx, &dx64, 1e-6);
    }
}
