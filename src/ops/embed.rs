//! Patch embedding pieces: patchify (the convolution with stride = patch becomes patchify + GEMM), the
//! token assembly with cls token and position table, its backward, and the cls-row gather/scatter of the
//! classification head. CUDA twin: `cuda/embed.cu`.
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};

/// Image and patch sizes of one batch.
#[derive(Clone, Copy, Debug)]
pub struct PatchGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
}

impl PatchGeom {
    pub fn grid(&self) -> (usize, usize) {
        (self.h / self.p, self.w / self.p)
    }
    pub fn patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }
    pub fn patch_dim(&self) -> usize {
        self.c * self.p * self.p
    }
}

/// out[b·Np + gy·gw + gx, (c, py, px)] = img[b, c, gy·P + py, gx·P + px]: rows in the conv's output order
/// (row-major over the grid), columns in the order of the flattened (D, C, P, P) conv weight.
/// out: (B·Np, C·P·P)   img: (B, C, H, W)
pub fn patchify(rt: &Runtime, out: Tensor, img: Tensor, g: PatchGeom) -> Result<()> {
    assert!(out.numel >= g.b * g.patches() * g.patch_dim() && img.numel >= g.b * g.c * g.h * g.w);
    match &rt.backend {
        Backend::Cpu => cpu::patchify(rt.f32_mut(out), rt.f32(img), g),
        Backend::Cuda(cu) => cu.launch(
            "snella_patchify",
            grid_1d(g.b * g.patches() * g.patch_dim(), 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(img)),
                KArg::I32(g.b as i32),
                KArg::I32(g.c as i32),
                KArg::I32(g.h as i32),
                KArg::I32(g.w as i32),
                KArg::I32(g.p as i32),
            ],
        )?,
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// `x[b, 0] = cls + pos[0]`;  `x[b, 1 + p] = patch_out[b·Np + p] + pos[1 + p]`.
/// x: (B, T, D)   patch_out: (B·Np, D)   cls: (D)   pos: (T, D)
pub fn embed_forward(
    rt: &Runtime,
    x: Tensor,
    patch_out: Tensor,
    cls: Tensor,
    pos: Tensor,
    b: usize,
    t: usize,
    d: usize,
) -> Result<()> {
    assert!(x.numel >= b * t * d && pos.numel == t * d && cls.numel == d);
    match &rt.backend {
        Backend::Cpu => cpu::embed_forward(rt.f32_mut(x), rt.f32(patch_out), rt.f32(cls), rt.f32(pos), b, t, d),
        Backend::Cuda(cu) => cu.launch(
            "snella_embed_forward",
            grid_1d(b * t * d, 256),
            &[
                KArg::Ptr(rt.ptr(x)),
                KArg::Ptr(rt.ptr(patch_out)),
                KArg::Ptr(rt.ptr(cls)),
                KArg::Ptr(rt.ptr(pos)),
                KArg::I32(b as i32),
                KArg::I32(t as i32),
                KArg::I32(d as i32),
            ],
        )?,
    }
    Ok(())
}

/// `dcls += Σ_b dx[b, 0]`;  `dpos += Σ_b dx[b]`;  `dpatch[b·Np + p] = dx[b, 1 + p]` (each when given).
/// dx: (B, T, D)   dcls: (D)   dpos: (T, D)   dpatch: (B·Np, D)
#[allow(clippy::too_many_arguments)]
pub fn embed_backward(
    rt: &Runtime,
    dcls: Option<Tensor>,
    dpos: Option<Tensor>,
    dpatch: Option<Tensor>,
    dx: Tensor,
    b: usize,
    t: usize,
    d: usize,
) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => cpu::embed_backward(
            dcls.map(|x| rt.f32_mut(x)),
            dpos.map(|x| rt.f32_mut(x)),
            dpatch.map(|x| rt.f32_mut(x)),
            rt.f32(dx),
            b,
            t,
            d,
        ),
        Backend::Cuda(cu) => {
            let p = |x: Option<Tensor>| rt.ptr_or_null(x); // null: not wanted
            cu.launch(
                "snella_embed_backward",
                grid_1d(t * d, 256),
                &[
                    KArg::Ptr(p(dcls)),
                    KArg::Ptr(p(dpos)),
                    KArg::Ptr(p(dpatch)),
                    KArg::Ptr(rt.ptr(dx)),
                    KArg::I32(b as i32),
                    KArg::I32(t as i32),
                    KArg::I32(d as i32),
                ],
            )?
        }
    }
    Ok(())
}

/// `out[b] = x[b, 0]` (the cls rows).                                   out: (B, D)   x: (B, T, D)
pub fn cls_gather(rt: &Runtime, out: Tensor, x: Tensor, b: usize, t: usize, d: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => {
            let (o, x) = (rt.f32_mut(out), rt.f32(x));
            for i in 0..b {
                o[i * d..(i + 1) * d].copy_from_slice(&x[i * t * d..i * t * d + d]);
            }
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_cls_rows",
            grid_1d(b * t * d, 256),
            &[
                KArg::Ptr(rt.ptr(out)),
                KArg::Ptr(rt.ptr(x)),
                KArg::I32(b as i32),
                KArg::I32(t as i32),
                KArg::I32(d as i32),
                KArg::I32(0),
            ],
        )?,
    }
    Ok(())
}

/// `dx[b, 0] = dfeat[b]`, every other row of dx = 0.                     dx: (B, T, D)   dfeat: (B, D)
pub fn cls_scatter(rt: &Runtime, dx: Tensor, dfeat: Tensor, b: usize, t: usize, d: usize) -> Result<()> {
    match &rt.backend {
        Backend::Cpu => {
            let (dx, f) = (rt.f32_mut(dx), rt.f32(dfeat));
            dx[..b * t * d].fill(0.0);
            for i in 0..b {
                dx[i * t * d..i * t * d + d].copy_from_slice(&f[i * d..(i + 1) * d]);
            }
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_cls_rows",
            grid_1d(b * t * d, 256),
            &[
                KArg::Ptr(rt.ptr(dfeat)),
                KArg::Ptr(rt.ptr(dx)),
                KArg::I32(b as i32),
                KArg::I32(t as i32),
                KArg::I32(d as i32),
                KArg::I32(1),
            ],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use super::PatchGeom;

    pub fn patchify(out: &mut [f32], img: &[f32], g: PatchGeom) {
        let (gh, gw) = g.grid();
        let (np, pd, p) = (g.patches(), g.patch_dim(), g.p);
        for b in 0..g.b {
            for gy in 0..gh {
                for gx in 0..gw {
                    let row = &mut out[(b * np + gy * gw + gx) * pd..][..pd];
                    for c in 0..g.c {
                        for py in 0..p {
                            let src = ((b * g.c + c) * g.h + gy * p + py) * g.w + gx * p;
                            row[(c * p + py) * p..][..p].copy_from_slice(&img[src..src + p]);
                        }
                    }
                }
            }
        }
    }

    pub fn embed_forward(x: &mut [f32], patch_out: &[f32], cls: &[f32], pos: &[f32], b: usize, t: usize, d: usize) {
        for bi in 0..b {
            for ti in 0..t {
                let dst = &mut x[(bi * t + ti) * d..][..d];
                let src = if ti == 0 { cls } else { &patch_out[(bi * (t - 1) + ti - 1) * d..][..d] };
                for i in 0..d {
                    dst[i] = src[i] + pos[ti * d + i];
                }
            }
        }
    }

    pub fn embed_backward(
        mut dcls: Option<&mut [f32]>,
        mut dpos: Option<&mut [f32]>,
        mut dpatch: Option<&mut [f32]>,
        dx: &[f32],
        b: usize,
        t: usize,
        d: usize,
    ) {
        for ti in 0..t {
            for i in 0..d {
                let mut s = 0f32;
                for bi in 0..b {
                    let g = dx[(bi * t + ti) * d + i];
                    s += g;
                    if ti > 0 {
                        if let Some(dp) = dpatch.as_deref_mut() {
                            dp[(bi * (t - 1) + ti - 1) * d + i] = g;
                        }
                    }
                }
                if let Some(dp) = dpos.as_deref_mut() {
                    dp[ti * d + i] += s;
                }
                if ti == 0 {
                    if let Some(dc) = dcls.as_deref_mut() {
                        dc[i] += s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_matches_conv_layout() {
        let g = PatchGeom { b: 2, c: 3, h: 4, w: 6, p: 2 };
        let img: Vec<f32> = (0..2 * 3 * 4 * 6).map(|i| i as f32).collect();
        let mut out = vec![0f32; 2 * 6 * 12];
        cpu::patchify(&mut out, &img, g);
        // patch (b=1, gy=1, gx=2), element (c=2, py=1, px=0) = img[1, 2, 3, 4]
        let row = 6 + 3 + 2;
        assert_eq!(out[row * 12 + (2 * 2 + 1) * 2], img[((3 + 2) * 4 + 3) * 6 + 4]);
    }
}
