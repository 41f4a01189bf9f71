//! Multi-head self-attention with materialised probabilities, behind two functions (`attention_forward`,
//! `attention_backward`) that a fused flash-style kernel can replace. Head split/merge permutes are the
//! CUDA kernels of `cuda/attention.cu`; the products are `matmul`, the softmax is `softmax`.
use crate::error::Result;
use crate::ops::matmul::{matmul, Matmul};
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hd: usize,
}

impl Heads {
    pub fn d(&self) -> usize {
        self.h * self.hd
    }
}

/// dst (B,H,N,hd) = src viewed as (B,N,·) with row stride `ld`, columns [h·hd, (h+1)·hd) of each row
/// (`to_heads`); or the inverse scatter dst (B,N,·) ← src (B,H,N,hd) (`!to_heads`).
pub fn permute_heads(rt: &Runtime, dst: Tensor, src: Tensor, s: Heads, ld: usize, to_heads: bool) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => cpu::permute_heads(rt.f32_mut(dst), rt.f32(src), s, ld, to_heads),
        Backend::Cuda(cu) => cu.launch(
            "snella_permute_heads",
            grid_1d(s.b * s.n * s.d(), 256),
            &[
                KArg::Ptr(rt.ptr(dst)),
                KArg::Ptr(rt.ptr(src)),
                KArg::I32(s.b as i32),
                KArg::I32(s.n as i32),
                KArg::I32(s.h as i32),
                KArg::I32(s.hd as i32),
                KArg::I32(ld as i32),
                KArg::I32(to_heads as i32),
            ],
        )?,
    }
    Ok(())
}

/// Buffers of one attention layer.
/// qkv: (B, N, 3D) the fused projection output, rows [q | k | v]
/// q, k, v, o: (B, H, N, hd) head-major copies (scratch)      probs: (B, H, N, N) saved for backward
/// out: (B, N, D) the merged heads
pub struct AttentionBuffers {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub probs: Tensor,
}

/// out = merge_heads(softmax(q·kᵀ·hd^-½)·v); probs is kept for the backward.
pub fn attention_forward(rt: &Runtime, out: Tensor, qkv: Tensor, buf: &AttentionBuffers, s: Heads) -> Result<()> {
    let (d, bh, n, hd) = (s.d(), s.b * s.h, s.n, s.hd);
    permute_heads(rt, buf.q, qkv, s, 3 * d, true)?;
    permute_heads(rt, buf.k, qkv.slice(d, qkv.numel - d), s, 3 * d, true)?;
    permute_heads(rt, buf.v, qkv.slice(2 * d, qkv.numel - 2 * d), s, 3 * d, true)?;
    let scale = (hd as f32).powf(-0.5);
    // Scores go straight into probs and the softmax runs in place (a per-row op).
    matmul(rt, buf.probs, buf.q, buf.k, Matmul::new(n, n, hd, false, true).batched(bh).alpha(scale))?;
    softmax_forward(rt, buf.probs, buf.probs, n, 1.0)?;
    matmul(rt, buf.o, buf.probs, buf.v, Matmul::new(n, hd, n, false, false).batched(bh))?;
    permute_heads(rt, out, buf.o, s, d, false)
}

/// Gradients of attention: dqkv (B, N, 3D) from dout (B, N, D), given the forward's probs, q, k, v.
/// `dscores` (B,H,N,N) and `dtmp` (B,H,N,hd) are scratch; q, k, v must hold the forward's values.
pub fn attention_backward(
    rt: &Runtime,
    dqkv: Tensor,
    dout: Tensor,
    buf: &AttentionBuffers,
    dscores: Tensor,
    dtmp: Tensor,
    s: Heads,
) -> Result<()> {
    let (d, bh, n, hd) = (s.d(), s.b * s.h, s.n, s.hd);
    let scale = (hd as f32).powf(-0.5);
    permute_heads(rt, dtmp, dout, s, d, true)?; // dO (BH, N, hd)
                                                // dP = dO·vᵀ (BH,N,N); dv = Pᵀ·dO (BH,N,hd), written into buf.o (the forward output is no longer needed).
    matmul(rt, dscores, dtmp, buf.v, Matmul::new(n, n, hd, false, true).batched(bh))?;
    matmul(rt, buf.o, buf.probs, dtmp, Matmul::new(n, hd, n, true, false).batched(bh))?;
    permute_heads(rt, dqkv.slice(2 * d, dqkv.numel - 2 * d), buf.o, s, 3 * d, false)?;
    // dS = softmax'(dP), in place per row (the kernel reads a row fully before writing it).
    softmax_backward(rt, dscores, buf.probs, dscores, n, 1.0)?;
    // dq = scale·dS·k ; dk = scale·dSᵀ·q
    matmul(rt, dtmp, dscores, buf.k, Matmul::new(n, hd, n, false, false).batched(bh).alpha(scale))?;
    permute_heads(rt, dqkv, dtmp, s, 3 * d, false)?;
    matmul(rt, dtmp, dscores, buf.q, Matmul::new(n, hd, n, true, false).batched(bh).alpha(scale))?;
    permute_heads(rt, dqkv.slice(d, dqkv.numel - d), dtmp, s, 3 * d, false)
}

pub(crate) mod cpu {
    use super::Heads;
    use rayon::prelude::*;

    /// One task per head-major (image, head) block (`to_heads`) or per image (the scatter back): each writes
    /// its own rows of dst.
    pub fn permute_heads(dst: &mut [f32], src: &[f32], s: Heads, ld: usize, to_heads: bool) {
        let Heads { b, n, h, hd } = s;
        if to_heads {
            dst[..b * h * n * hd].par_chunks_mut(n * hd).enumerate().for_each(|(bh, blk)| {
                let (bi, hi) = (bh / h, bh % h);
                for (ni, out) in blk.chunks_mut(hd).enumerate() {
                    let rows = (bi * n + ni) * ld + hi * hd;
                    out.copy_from_slice(&src[rows..rows + hd]);
                }
            });
        } else {
            // The last image's block may end at its last row's [.., (h-1)·hd + hd) (a column slice of a wider
            // buffer), so dst's chunks are n·ld long but the last one may be shorter.
            dst.par_chunks_mut(n * ld).take(b).enumerate().for_each(|(bi, img)| {
                for hi in 0..h {
                    for ni in 0..n {
                        let heads = ((bi * h + hi) * n + ni) * hd;
                        let row = ni * ld + hi * hd;
                        img[row..row + hd].copy_from_slice(&src[heads..heads + hd]);
                    }
                }
            });
        }
    }
}
