//! Column sums of (rows, cols) matrices into per-column gradients: a bias (Σ_r dout), LayerScale's γ
//! (Σ_r dout·x) and LayerNorm's γ and β (Σ_r dout·x̂, Σ_r dout). CUDA twin: `cuda/colsum.cu`.
//!
//! Two stages, so that the GPU spreads a reduction over 12,608 rows (ViT-B, batch 64) across all its SMs
//! instead of one thread per column walking every row: the rows are cut into chunks of [`CHUNK`]; inside a
//! chunk, [`LANES`] interleaved lanes sum their rows in order and the lane sums are added in lane order
//! (stage 1, one partial per chunk and column, in the `part` scratch); then the partials are added in chunk
//! order and that total is added to the gradient (stage 2). The CPU performs the same additions in the same
//! order, so both devices agree to the bit (see build.rs: the kernels are compiled without FMA contraction).
use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, Runtime, Tensor};
use cudarc::driver::LaunchConfig;

/// Rows per partial sum.
pub(crate) const CHUNK: usize = 128;
/// Interleaved row lanes inside a chunk.
pub(crate) const LANES: usize = 8;

/// Elements of the `part` scratch that [`column_sums`] needs for `planes` sums over (rows, cols).
pub fn partials_len(rows: usize, cols: usize, planes: usize) -> usize {
    planes * rows.div_ceil(CHUNK) * cols
}

/// What is summed down the columns; every matrix is (rows, cols).
#[derive(Clone, Copy)]
pub enum Terms {
    /// Σ_r a: a bias gradient from the output gradient.
    Plain { a: Tensor },
    /// Σ_r a·b: LayerScale's γ from the output gradient and the scaled input.
    Product { a: Tensor, b: Tensor },
    /// Σ_r dout·x̂ and Σ_r dout, x̂ = (x − mean_r)·rstd_r: LayerNorm's γ and β.
    LayerNorm { dout: Tensor, x: Tensor, mean: Tensor, rstd: Tensor },
}

impl Terms {
    fn code(&self) -> i32 {
        match self {
            Terms::Plain { .. } => 0,
            Terms::Product { .. } => 1,
            Terms::LayerNorm { .. } => 2,
        }
    }
    fn a(&self) -> Tensor {
        match *self {
            Terms::Plain { a } | Terms::Product { a, .. } => a,
            Terms::LayerNorm { dout, .. } => dout,
        }
    }
}

/// dst[0][c] += Σ_r term₀(r, c), and for LayerNorm dst[1][c] += Σ_r dout (either may be None: not wanted).
/// dst: (cols) each   part: at least `partials_len(rows, cols, planes)`, scratch (the CPU does not use it)
pub fn column_sums(rt: &Runtime, dst: [Option<Tensor>; 2], part: Tensor, terms: Terms, cols: usize) -> Result<()> {
    let a = terms.a();
    assert!(cols > 0 && a.numel.is_multiple_of(cols), "column_sums: {} values are not rows of {cols}", a.numel);
    let rows = a.numel / cols;
    let planes = if matches!(terms, Terms::LayerNorm { .. }) { 2 } else { 1 };
    assert!(part.numel >= partials_len(rows, cols, planes), "column_sums: part too small");
    assert!(dst.iter().flatten().all(|d| d.numel == cols), "column_sums: a gradient is not (cols)");
    match &rt.backend {
        Backend::Cpu => {
            let (b, mean, rstd) = match terms {
                Terms::Plain { .. } => (None, None, None),
                Terms::Product { b, .. } => (Some(rt.f32(b)), None, None),
                Terms::LayerNorm { x, mean, rstd, .. } => (Some(rt.f32(x)), Some(rt.f32(mean)), Some(rt.f32(rstd))),
            };
            let term = |r: usize, i: usize, g: f32| -> f32 {
                match (b, mean, rstd) {
                    (None, _, _) => g,
                    (Some(b), None, _) => g * b[i],
                    (Some(x), Some(m), Some(s)) => g * ((x[i] - m[r]) * s[r]),
                    _ => unreachable!("LayerNorm terms come with mean and rstd"),
                }
            };
            cpu::column_sums(dst[0].map(|t| rt.f32_mut(t)), dst[1].map(|t| rt.f32_mut(t)), rt.f32(a), cols, term);
        }
        Backend::Cuda(cu) => {
            let chunks = rows.div_ceil(CHUNK);
            let (b, mean, rstd) = match terms {
                Terms::Plain { .. } => (None, None, None),
                Terms::Product { b, .. } => (Some(b), None, None),
                Terms::LayerNorm { x, mean, rstd, .. } => (Some(x), Some(mean), Some(rstd)),
            };
            cu.launch(
                "snella_colsum_partial",
                LaunchConfig {
                    grid_dim: (chunks as u32, cols.div_ceil(32) as u32, 1),
                    block_dim: (32, LANES as u32, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    KArg::Ptr(rt.ptr(part)),
                    KArg::Ptr(rt.ptr(a)),
                    KArg::Ptr(rt.ptr_or_null(b)),
                    KArg::Ptr(rt.ptr_or_null(mean)),
                    KArg::Ptr(rt.ptr_or_null(rstd)),
                    KArg::I32(rows as i32),
                    KArg::I32(cols as i32),
                    KArg::I32(terms.code()),
                ],
            )?;
            for (p, d) in dst.iter().enumerate() {
                if let Some(d) = d {
                    cu.launch(
                        "snella_colsum_finish",
                        grid_1d(cols, 256),
                        &[
                            KArg::Ptr(rt.ptr(*d)),
                            KArg::Ptr(rt.ptr(part.slice(p * chunks * cols, chunks * cols))),
                            KArg::I32(chunks as i32),
                            KArg::I32(cols as i32),
                        ],
                    )?;
                }
            }
        }
    }
    Ok(())
}

pub(crate) mod cpu {
    use super::{CHUNK, LANES};
    use rayon::prelude::*;

    /// The two stages of the module docs, column block by column block (rows read in order, so the inner loop
    /// runs along a row). `term(r, i, g)` is plane 0's term of element i = r·cols + c with g = a[i]; plane 1
    /// sums g itself.
    pub fn column_sums(
        d0: Option<&mut [f32]>,
        d1: Option<&mut [f32]>,
        a: &[f32],
        cols: usize,
        term: impl Fn(usize, usize, f32) -> f32 + Sync,
    ) {
        const BLOCK: usize = 256;
        let rows = a.len() / cols;
        // (plane 0, plane 1) totals per column.
        let mut totals = vec![(0f32, 0f32); cols];
        totals.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, tot)| {
            let c0 = blk * BLOCK;
            let width = tot.len();
            let mut lanes = vec![(0f32, 0f32); LANES * width];
            for k in 0..rows.div_ceil(CHUNK) {
                lanes.fill((0.0, 0.0));
                for r in k * CHUNK..rows.min((k + 1) * CHUNK) {
                    let lane = &mut lanes[(r - k * CHUNK) % LANES * width..][..width];
                    for (j, l) in lane.iter_mut().enumerate() {
                        let i = r * cols + c0 + j;
                        let g = a[i];
                        l.0 += term(r, i, g);
                        l.1 += g;
                    }
                }
                for (j, t) in tot.iter_mut().enumerate() {
                    let (mut s0, mut s1) = (0f32, 0f32);
                    for l in 0..LANES {
                        s0 += lanes[l * width + j].0;
                        s1 += lanes[l * width + j].1;
                    }
                    t.0 += s0;
                    t.1 += s1;
                }
            }
        });
        if let Some(d) = d0 {
            d.iter_mut().zip(&totals).for_each(|(d, t)| *d += t.0);
        }
        if let Some(d) = d1 {
            d.iter_mut().zip(&totals).for_each(|(d, t)| *d += t.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    #[test]
    fn column_sums_match_f64_across_chunks_and_lanes() {
        // 301 rows: two full chunks and a ragged one; 37 columns: not a multiple of the block.
        let (rows, cols) = (301, 37);
        let a = randn(rows * cols, 1, 1.0);
        let b = randn(rows * cols, 2, 1.0);
        let (mut d0, mut d1) = (vec![0.5f32; cols], vec![-0.25f32; cols]);
        super::cpu::column_sums(Some(&mut d0), Some(&mut d1), &a, cols, |_, i, g| g * b[i]);
        let col = |c: usize, f: &dyn Fn(usize) -> f64| (0..rows).map(|r| f(r * cols + c)).sum::<f64>();
        let want0: Vec<f64> = (0..cols).map(|c| 0.5 + col(c, &|i| a[i] as f64 * b[i] as f64)).collect();
        let want1: Vec<f64> = (0..cols).map(|c| -0.25 + col(c, &|i| a[i] as f64)).collect();
        assert_close("Σ a·b", &d0, &want0, 1e-6);
        assert_close("Σ a", &d1, &want1, 1e-6);
    }
}
