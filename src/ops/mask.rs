//! Masked gradients (GPS-like sparse tuning): grad ⊙ mask with a fixed u8 mask. CUDA twin: `cuda/mask.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// `grad[i] = 0` where `mask[i] == 0`.                                    grad: (n) f32   mask: (n) u8
pub fn mask_grad(rt: &Runtime, grad: Tensor, mask: Tensor) -> Result<()> {
    assert_eq!(grad.numel, mask.numel);
    match &rt.backend {
        Backend::Cpu => {
            let m = rt.u8_mut(mask);
            rt.f32_mut(grad).iter_mut().zip(m.iter()).for_each(|(g, &k)| {
                if k == 0 {
                    *g = 0.0
                }
            });
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_mask_grad",
            grid_1d(grad.numel, 256),
            &[KArg::Ptr(rt.ptr(grad)), KArg::Ptr(rt.ptr(mask)), KArg::I64(grad.numel as i64)],
        )?,
    }
    Ok(())
}
