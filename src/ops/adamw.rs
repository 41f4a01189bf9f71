//! AdamW with decoupled weight decay, exactly torch.optim.AdamW's single-tensor path (amsgrad off).
//! CUDA twin: `cuda/adamw.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// Hyper-parameters of one AdamW step; `t` is the 1-based step count.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of this tensor (0 for tensors that are not decayed).
    pub weight_decay: f64,
    pub t: u64,
}

impl AdamWStep {
    /// The training step's AdamW (torch's defaults β = 0.9, 0.999, ε = 1e-8, as the official recipe) at step
    /// `t`, with decoupled decay `weight_decay` (0 for a tensor that does not decay).
    pub fn torch(lr: f64, weight_decay: f64, t: u64) -> AdamWStep {
        AdamWStep { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t }
    }

    /// The f32 scalars the kernel uses, rounded from double as torch rounds its Python scalars:
    /// (1 − lr·wd, 1 − β1, β2, 1 − β2, lr / bc1, sqrt(bc2), eps).
    fn scalars(&self) -> [f32; 7] {
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        [
            (1.0 - self.lr * self.weight_decay) as f32,
            (1.0 - self.beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            (self.lr / bc1) as f32,
            bc2.sqrt() as f32,
            self.eps as f32,
        ]
    }
}

/// One AdamW step in place.                                             param, grad, m, v: (n)
pub fn adamw(rt: &Runtime, param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: AdamWStep) -> Result<()> {
    assert!(param.numel == grad.numel && param.numel == m.numel && param.numel == v.numel);
    let s = step.scalars();
    match &rt.backend {
        Backend::Cpu => cpu::adamw(rt.f32_mut(param), rt.f32(grad), rt.f32_mut(m), rt.f32_mut(v), s),
        Backend::Cuda(cu) => {
            let [decay, one_m_b1, b2, one_m_b2, step_size, bc2_sqrt, eps] = s;
            cu.launch(
                "snella_adamw",
                grid_1d(param.numel, 256),
                &[
                    KArg::Ptr(rt.ptr(param)),
                    KArg::Ptr(rt.ptr(grad)),
                    KArg::Ptr(rt.ptr(m)),
                    KArg::Ptr(rt.ptr(v)),
                    KArg::I64(param.numel as i64),
                    KArg::F32(decay),
                    KArg::F32(one_m_b1),
                    KArg::F32(b2),
                    KArg::F32(one_m_b2),
                    KArg::F32(step_size),
                    KArg::F32(bc2_sqrt),
                    KArg::F32(eps),
                ],
            )?
        }
    }
    Ok(())
}

pub(crate) mod cpu {
    pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: [f32; 7]) {
        let [decay, one_m_b1, b2, one_m_b2, step_size, bc2_sqrt, eps] = s;
        for i in 0..p.len() {
            p[i] *= decay;
            m[i] += one_m_b1 * (g[i] - m[i]); // torch lerp with weight < 0.5
            v[i] = v[i] * b2 + one_m_b2 * g[i] * g[i];
            let denom = v[i].sqrt() / bc2_sqrt + eps;
            // torch's addcdiv computes self + (value·t1)/t2, in that order.
            p[i] += (-step_size * m[i]) / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;

    #[test]
    fn three_steps_match_f64() {
        let n = 50;
        let p0 = randn(n, 1, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|k| randn(n, 10 + k, 1.0)).collect();
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let (mut p64, mut m64, mut v64): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (p0.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
        for (k, g) in grads.iter().enumerate() {
            let st = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, t: k as u64 + 1 };
            cpu::adamw(&mut p, g, &mut m, &mut v, st.scalars());
            let (bc1, bc2) = (1.0 - 0.9f64.powi(k as i32 + 1), 1.0 - 0.999f64.powi(k as i32 + 1));
            for i in 0..n {
                let g = g[i] as f64;
                p64[i] *= 1.0 - 1e-2 * 0.05;
                m64[i] = 0.9 * m64[i] + 0.1 * g;
                v64[i] = 0.999 * v64[i] + 0.001 * g * g;
                p64[i] -= 1e-2 / bc1 * m64[i] / (v64[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        assert_close("adamw param", &p, &p64, 1e-6);
    }
}
