//! Fused softmax + cross-entropy, forward and backward in one pass (mean over the batch).
//! CUDA twin: `cuda/loss.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_rows, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// `losses[b] = −log softmax(logits[b])[labels[b]]`; dlogits = (softmax − onehot) / B when given. A label
/// outside `0..v` makes its row NaN (the loss and the gradient), never a read outside the logits.
/// logits, dlogits: (B, V)   labels: (B) i32   losses: (B)
pub fn cross_entropy(
    rt: &Runtime,
    losses: Tensor,
    dlogits: Option<Tensor>,
    logits: Tensor,
    labels: Tensor,
    v: usize,
) -> Result<()> {
    let b = logits.numel / v;
    assert!(losses.numel >= b && labels.numel >= b);
    match &rt.backend {
        Backend::Cpu => {
            cpu::cross_entropy(rt.f32_mut(losses), dlogits.map(|t| rt.f32_mut(t)), rt.f32(logits), rt.i32(labels), v)
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_cross_entropy",
            grid_rows(b, 256, 0),
            &[
                KArg::Ptr(rt.ptr(losses)),
                KArg::Ptr(rt.ptr_or_null(dlogits)),
                KArg::Ptr(rt.ptr(logits)),
                KArg::Ptr(rt.ptr(labels)),
                KArg::I32(b as i32),
                KArg::I32(v as i32),
            ],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    pub fn cross_entropy(
        losses: &mut [f32],
        mut dlogits: Option<&mut [f32]>,
        logits: &[f32],
        labels: &[i32],
        v: usize,
    ) {
        let b = logits.len() / v;
        for r in 0..b {
            let x = &logits[r * v..][..v];
            let mx = x.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
            let z: f32 = x.iter().map(|&a| (a - mx).exp()).sum();
            // A label outside 0..v (Model::set_batch refuses them) gives a NaN row, as on CUDA.
            let y = usize::try_from(labels[r]).ok().filter(|&y| y < v);
            losses[r] = y.map_or(f32::NAN, |y| (z.ln() + mx) - x[y]);
            if let Some(d) = dlogits.as_deref_mut() {
                let d = &mut d[r * v..][..v];
                for i in 0..v {
                    let p = (x[i] - mx).exp() / z;
                    d[i] = y.map_or(f32::NAN, |y| (p - if i == y { 1.0 } else { 0.0 }) / b as f32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn cross_entropy_matches_f64() {
        let (b, v) = (4, 11);
        let x = randn(b * v, 1, 2.0);
        let labels = [3, 0, 10, 7];
        let mut l = vec![0f32; b];
        let mut d = vec![0f32; b * v];
        super::cpu::cross_entropy(&mut l, Some(&mut d), &x, &labels, v);
        let (mut l64, mut d64) = (vec![0f64; b], vec![0f64; b * v]);
        for r in 0..b {
            let row: Vec<f64> = x[r * v..][..v].iter().map(|&a| a as f64).collect();
            let z: f64 = row.iter().map(|a| a.exp()).sum();
            l64[r] = z.ln() - row[labels[r] as usize];
            for i in 0..v {
                d64[r * v + i] = (row[i].exp() / z - (i == labels[r] as usize) as i32 as f64) / b as f64;
            }
        }
        assert_close("cross_entropy loss", &l, &l64, 1e-6);
        assert_close("cross_entropy dlogits", &d, &d64, 1e-6);
    }
}
