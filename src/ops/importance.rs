//! The SNELLA allocator's per-entry importance: EMA of the sensitivity |θ·∇θ| and of its uncertainty.
//! CUDA twin: `cuda/importance.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// The allocator's EMA rates: β1 of the importance Ī, β2 of the uncertainty Ū (method.md §8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaBetas {
    /// Rate of the importance EMA Ī (the recipe: 0.85).
    pub beta1: f64,
    /// Rate of the uncertainty EMA Ū (the recipe: 0.85).
    pub beta2: f64,
}

/// I = |p·g| (NaN → 0);  Ī = β1·Ī + (1−β1)·I;  Ū = β2·Ū + (1−β2)·|I − Ī| (with the new Ī).
/// Each product and sum is rounded separately (no fused multiply-add), as PyTorch's tensor-scalar ops do.
/// ipt, unc, p, g: (n)
pub fn importance_update(
    rt: &Runtime,
    ipt: Tensor,
    unc: Tensor,
    p: Tensor,
    g: Tensor,
    beta1: f64,
    beta2: f64,
) -> Result<()> {
    assert!(ipt.numel == p.numel && unc.numel == p.numel && g.numel == p.numel);
    let s = [beta1 as f32, (1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32];
    match &rt.backend {
        Backend::Cpu => cpu::importance_update(rt.f32_mut(ipt), rt.f32_mut(unc), rt.f32(p), rt.f32(g), s),
        Backend::Cuda(cu) => cu.launch(
            "snella_importance_update",
            grid_1d(p.numel, 256),
            &[
                KArg::Ptr(rt.ptr(ipt)),
                KArg::Ptr(rt.ptr(unc)),
                KArg::Ptr(rt.ptr(p)),
                KArg::Ptr(rt.ptr(g)),
                KArg::I64(p.numel as i64),
                KArg::F32(s[0]),
                KArg::F32(s[1]),
                KArg::F32(s[2]),
                KArg::F32(s[3]),
            ],
        )?,
    }
    Ok(())
}

/// Σ ipt·unc over a tensor, in f64 (the layer score is its mean).
pub fn importance_sum(rt: &Runtime, ipt: Tensor, unc: Tensor) -> Result<f64> {
    let (a, b) = (rt.download(ipt)?, rt.download(unc)?);
    Ok(a.iter().zip(&b).map(|(&x, &y)| (x * y) as f64).sum())
}

pub(crate) mod cpu {
    pub fn importance_update(ipt: &mut [f32], unc: &mut [f32], p: &[f32], g: &[f32], s: [f32; 4]) {
        let [b1, one_m_b1, b2, one_m_b2] = s;
        for i in 0..p.len() {
            let mut x = (p[i] * g[i]).abs();
            if x.is_nan() {
                x = 0.0;
            }
            ipt[i] = b1 * ipt[i] + one_m_b1 * x;
            unc[i] = b2 * unc[i] + one_m_b2 * (x - ipt[i]).abs();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ema_matches_f64_and_drops_nan() {
        let p = [1.0f32, -2.0, f32::NAN, 0.5];
        let g = [0.5f32, 0.25, 1.0, -4.0];
        let (mut i, mut u) = ([0.1f32; 4], [0.2f32; 4]);
        super::cpu::importance_update(&mut i, &mut u, &p, &g, [0.85, 0.15, 0.85, 0.15]);
        for k in 0..4 {
            let x = if k == 2 { 0.0 } else { (p[k] as f64 * g[k] as f64).abs() };
            let ie = 0.85 * 0.1 + 0.15 * x;
            let ue = 0.85 * 0.2 + 0.15 * (x - ie).abs();
            assert!((i[k] as f64 - ie).abs() < 1e-6 && (u[k] as f64 - ue).abs() < 1e-6, "entry {k}: {} {}", i[k], u[k]);
        }
    }
}
