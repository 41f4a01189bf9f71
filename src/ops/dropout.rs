//! Dropout and drop-path (stochastic depth) with masks that are never stored: each keep decision is a hash
//! of (seed, stream, index), so the backward regenerates exactly the forward's mask. CUDA twin:
//! `cuda/dropout.cu` (the same SplitMix64 hash on the device).
use crate::error::Result;
use crate::rng::{mix, GOLDEN_GAMMA};
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// Whether element `i` of mask `stream` survives a drop rate `p` under `seed`: u ≥ p with u uniform on
/// (0, 1] in steps of 2⁻²⁴ (so p ≤ 2⁻²⁴ keeps everything). The (seed, stream) pair picks a SplitMix64
/// state and `i` indexes its output sequence.
#[inline]
pub fn keep(seed: u64, stream: u64, i: u64, p: f32) -> bool {
    let state = mix(mix(seed ^ 0x243F_6A88_85A3_08D3).wrapping_add(stream) ^ 0x1319_8A2E_0370_7344);
    let z = mix(state.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (((z >> 40) + 1) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

/// out[i] = inp[i]·keep(i)/(1 − p): dropout, and also its backward (same seed and stream give the same
/// mask). out may be inp (in place).                                   out, inp: (n)
pub fn dropout(rt: &Runtime, out: Tensor, inp: Tensor, p: f32, seed: u64, stream: u64) -> Result<()> {
    assert_eq!(out.numel, inp.numel);
    let scale = 1.0 / (1.0 - p);
    match &rt.backend {
        Backend::Cpu if out == inp => cpu::dropout_inplace(rt.f32_mut(out), p, scale, seed, stream, 1),
        Backend::Cpu => cpu::dropout(rt.f32_mut(out), rt.f32(inp), p, scale, seed, stream, 1),
        Backend::Cuda(cu) => cu.launch(
            "snella_dropout",
            grid_1d(out.numel, 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::I64(out.numel as i64),
                KArg::I64(1),
                KArg::F32(p),
                KArg::F32(scale),
                KArg::I64(seed as i64),
                KArg::I64(stream as i64),
            ],
        )?,
    }
    Ok(())
}

/// Drop-path: every row of sample b is kept (× 1/(1 − p)) or zeroed together, one decision per sample;
/// `per_sample` = elements of one sample. Its own backward with the same seed and stream; out may be inp.
/// out, inp: (B, per_sample)
pub fn drop_path(
    rt: &Runtime,
    out: Tensor,
    inp: Tensor,
    per_sample: usize,
    p: f32,
    seed: u64,
    stream: u64,
) -> Result<()> {
    assert!(out.numel == inp.numel && out.numel.is_multiple_of(per_sample));
    let scale = 1.0 / (1.0 - p);
    match &rt.backend {
        Backend::Cpu if out == inp => cpu::dropout_inplace(rt.f32_mut(out), p, scale, seed, stream, per_sample),
        Backend::Cpu => cpu::dropout(rt.f32_mut(out), rt.f32(inp), p, scale, seed, stream, per_sample),
        Backend::Cuda(cu) => cu.launch(
            "snella_dropout",
            grid_1d(out.numel, 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(inp)),
                KArg::I64(out.numel as i64),
                KArg::I64(per_sample as i64),
                KArg::F32(p),
                KArg::F32(scale),
                KArg::I64(seed as i64),
                KArg::I64(stream as i64),
            ],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use super::keep;

    /// One keep decision per `group` consecutive elements (1: dropout; a sample's size: drop-path).
    pub fn dropout(out: &mut [f32], inp: &[f32], p: f32, scale: f32, seed: u64, stream: u64, group: usize) {
        for (i, (o, &x)) in out.iter_mut().zip(inp).enumerate() {
            *o = if keep(seed, stream, (i / group) as u64, p) { x * scale } else { 0.0 };
        }
    }

    pub fn dropout_inplace(x: &mut [f32], p: f32, scale: f32, seed: u64, stream: u64, group: usize) {
        for (i, v) in x.iter_mut().enumerate() {
            *v = if keep(seed, stream, (i / group) as u64, p) { *v * scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_right_fraction_and_repeat() {
        let n = 100_000u64;
        let kept = (0..n).filter(|&i| keep(7, 3, i, 0.1)).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!((0..1000).all(|i| keep(7, 3, i, 0.1) == keep(7, 3, i, 0.1)));
        assert!((0..1000).any(|i| keep(7, 3, i, 0.5) != keep(7, 4, i, 0.5)), "streams differ");
        assert!((0..1000).all(|i| keep(1, 1, i, 0.0)), "p = 0 keeps everything");
        assert!((0..1_000_000).all(|i| keep(0, 0, i, 1e-12)), "p below 2^-24 keeps everything");
        assert!((0..1000).all(|i| !keep(3, 9, i, 1.0)), "p = 1 drops everything");
        let x = vec![1.0f32; 12];
        let mut y = vec![0.0f32; 12];
        cpu::dropout(&mut y, &x, 0.5, 2.0, 11, 0, 4);
        for g in y.chunks(4) {
            assert!(g.iter().all(|&v| v == g[0]) && (g[0] == 0.0 || g[0] == 2.0), "one decision per sample: {g:?}");
        }
    }
}
