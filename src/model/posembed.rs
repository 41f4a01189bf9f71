//! Resizing of absolute position tables `(1, 1 + gh·gw, D)` (cls row first) to another patch grid.
//!
//! The grid part is viewed as a `(D, gh, gw)` image (row-major over the grid, as timm and DINOv2 lay it
//! out) and resampled per channel; the cls row is copied unchanged. Three variants are offered because the
//! reference code bases differ, and the differences are visible in the numbers:
//!
//! * [`PosResize::Torch`]: `F.interpolate(mode="bicubic", align_corners=False, size=(th, tw))`, i.e. Keys'
//!   cubic convolution with `A = -0.75`, source coordinate `(dst + 0.5)·(g/t) − 0.5`, and out-of-range taps
//!   clamped to the border. This is timm ≤ 0.6's `resize_pos_embed` (the timm 0.5.4 that SNELL uses, also
//!   in `_load_weights` for the Google `.npz` checkpoints).
//! * [`PosResize::TorchAntialias`]: `F.interpolate(mode="bicubic", antialias=True, size=(th, tw))`, the
//!   default of newer timm's `resample_abs_pos_embed` (timm ≥ 0.9 `checkpoint_filter_fn`). PyTorch's
//!   antialiased path is PIL-style: cubic kernel with `A = -0.5`, widened by the scale when downsampling,
//!   taps outside the grid dropped and the remaining weights renormalised (no border clamp).
//! * [`PosResize::Dinov2Offset`]: DINOv2's own `interpolate_pos_encoding` (`interpolate_offset = 0.1`,
//!   `interpolate_antialias = False`): plain bicubic as in `Torch`, but called with
//!   `scale_factor = ((t + 0.1) / g)` instead of a size. The output still has `t` cells per side (floor of
//!   `g·(t+0.1)/g`), but PyTorch maps coordinates with the given scale, so the source coordinate is
//!   `(dst + 0.5)·g/(t + 0.1) − 0.5`: the sampled grid is very slightly compressed towards the origin
//!   compared with `Torch`. (DINOv2 passes `(w0, h0)` to the `(rows, cols)` axes; for the square grids it
//!   supports this is the same thing; here rows always pair with rows.)
//!
//! All arithmetic is done in f64 and rounded once to f32, so results agree with PyTorch's float32 kernels
//! to about 1e-6 relative.
use crate::error::{Error, Result};

/// Which interpolation reproduces which reference code; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PosResize {
    /// `F.interpolate(mode="bicubic", align_corners=False)` with an output size (timm 0.5.4, SNELL).
    #[default]
    Torch,
    /// `F.interpolate(mode="bicubic", antialias=True)` with an output size (timm ≥ 0.9 default).
    TorchAntialias,
    /// DINOv2's `interpolate_pos_encoding`: bicubic with `scale_factor = (t + 0.1) / g`.
    Dinov2Offset,
}

impl PosResize {
    /// A human-readable description of the interpolation, for notes and logs.
    pub fn name(self) -> &'static str {
        match self {
            PosResize::Torch => "bicubic (torch, align_corners=False, A=-0.75)",
            PosResize::TorchAntialias => "bicubic antialias (torch, A=-0.5)",
            PosResize::Dinov2Offset => "bicubic with DINOv2's +0.1 scale-factor offset",
        }
    }
}

impl std::str::FromStr for PosResize {
    type Err = Error;
    /// `torch`, `torch-antialias` (alias `antialias`), `dinov2-offset` (alias `dinov2`), case-insensitive, `-`
    /// or `_`. Error: `Invalid { option: "pos_resize" }`.
    fn from_str(s: &str) -> Result<PosResize> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "torch" => Ok(PosResize::Torch),
            "torch-antialias" | "antialias" => Ok(PosResize::TorchAntialias),
            "dinov2-offset" | "dinov2" => Ok(PosResize::Dinov2Offset),
            _ => Err(Error::invalid(
                "pos_resize",
                format!("unknown position-table resize '{s}' (torch, torch-antialias, dinov2-offset)"),
            )),
        }
    }
}

/// `(index, weight)` taps of one output cell along one axis.
type Taps = Vec<Vec<(usize, f64)>>;

fn cubic1(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}
fn cubic2(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// Plain bicubic taps (`upsample_bicubic2d`): `scale` is source cells per output cell.
fn bicubic_taps(input: usize, output: usize, scale: f64) -> Taps {
    const A: f64 = -0.75;
    (0..output)
        .map(|o| {
            let real = scale * (o as f64 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let c = [cubic2(t + 1.0, A), cubic1(t, A), cubic1(1.0 - t, A), cubic2(2.0 - t, A)];
            let mut taps: Vec<(usize, f64)> = Vec::with_capacity(4);
            for (k, &w) in c.iter().enumerate() {
                let idx = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                match taps.iter_mut().find(|(i, _)| *i == idx) {
                    Some(e) => e.1 += w,
                    None => taps.push((idx, w)),
                }
            }
            taps
        })
        .collect()
}

/// PyTorch's antialiased bicubic taps (`_compute_weights_aa`, PIL's filter with `A = -0.5`).
fn antialias_taps(input: usize, output: usize) -> Taps {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            cubic1(x, A)
        } else if x < 2.0 {
            cubic2(x, A)
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            // C++ truncates towards zero, then clamps at 0; for negatives both give 0.
            let xmin = ((center - support + 0.5).trunc().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).trunc().max(0.0) as usize).min(input);
            let mut taps: Vec<(usize, f64)> =
                (xmin..xmax).map(|j| (j, filter((j as f64 - center + 0.5) * invscale))).collect();
            let total: f64 = taps.iter().map(|t| t.1).sum();
            if total != 0.0 {
                taps.iter_mut().for_each(|t| t.1 /= total);
            }
            taps
        })
        .collect()
}

fn taps_for(input: usize, output: usize, mode: PosResize) -> Taps {
    match mode {
        PosResize::Torch => bicubic_taps(input, output, input as f64 / output as f64),
        PosResize::TorchAntialias => antialias_taps(input, output),
        PosResize::Dinov2Offset => {
            // torch: scale_factor s = (t + 0.1) / g; the source index uses 1 / s.
            let s = (output as f64 + 0.1) / input as f64;
            bicubic_taps(input, output, 1.0 / s)
        }
    }
}

/// Resizes a position table `(1, 1+gh*gw, D)` (cls row first) to a new grid with bicubic interpolation.
///
/// With `mode = PosResize::Torch` this matches
/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` (A = -0.75, border clamp) on the
/// `(D, gh, gw)` grid, which is timm's `resize_pos_embed`; see the module documentation for
/// [`PosResize::TorchAntialias`] (newer timm) and [`PosResize::Dinov2Offset`] (DINOv2's own +0.1 offset).
/// The cls row is kept as is. An unchanged grid returns the table unchanged (bit for bit).
///
/// `table` is `(1 + from.0·from.1) · d` f32 values; the result is `(1 + to.0·to.1) · d`.
///
/// # Errors
/// `Invalid { option: "pos_embed" }` when a grid side or `d` is zero, or `table.len()` does not match
/// `from` and `d`.
pub fn resize_pos_embed(
    table: &[f32],
    d: usize,
    from: (usize, usize),
    to: (usize, usize),
    mode: PosResize,
) -> Result<Vec<f32>> {
    let (gh, gw) = from;
    let (th, tw) = to;
    if gh == 0 || gw == 0 || th == 0 || tw == 0 || d == 0 {
        return Err(Error::invalid("pos_embed", format!("cannot resize a {from:?} grid of width {d} to {to:?}")));
    }
    let want = gh.checked_mul(gw).and_then(|n| n.checked_add(1)).and_then(|n| n.checked_mul(d));
    if want != Some(table.len()) {
        return Err(Error::invalid(
            "pos_embed",
            format!("{} values do not form a (1, 1 + {gh}·{gw}, {d}) table", table.len()),
        ));
    }
    if from == to {
        return Ok(table.to_vec());
    }
    let rows = taps_for(gh, th, mode);
    let cols = taps_for(gw, tw, mode);
    let grid = &table[d..];
    let mut out = Vec::with_capacity((1 + th * tw) * d);
    out.extend_from_slice(&table[..d]);
    let mut acc = vec![0f64; d];
    for rt in &rows {
        for ct in &cols {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for &(r, wr) in rt {
                for &(c, wc) in ct {
                    let w = wr * wc;
                    let src = &grid[(r * gw + c) * d..(r * gw + c + 1) * d];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a += w * v as f64;
                    }
                }
            }
            out.extend(acc.iter().map(|&a| a as f32));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_identity_is_exact() {
        for mode in [PosResize::Torch, PosResize::TorchAntialias, PosResize::Dinov2Offset] {
            for (i, o) in [(3, 5), (5, 3), (14, 16), (37, 16), (1, 4), (4, 1)] {
                for taps in taps_for(i, o, mode) {
                    let s: f64 = taps.iter().map(|t| t.1).sum();
                    assert!((s - 1.0).abs() < 1e-12, "{mode:?} {i}->{o}: sum {s}");
                    assert!(taps.iter().all(|t| t.0 < i));
                }
            }
        }
        let d = 3;
        let table: Vec<f32> = (0..(1 + 4 * 5) * d).map(|x| (x as f32 * 0.37).sin()).collect();
        for mode in [PosResize::Torch, PosResize::TorchAntialias, PosResize::Dinov2Offset] {
            assert_eq!(resize_pos_embed(&table, d, (4, 5), (4, 5), mode).unwrap(), table);
        }
        // The plain kernel at integer positions is a unit impulse, so same-size sampling is exact, too.
        let taps = bicubic_taps(6, 6, 1.0);
        for (o, t) in taps.iter().enumerate() {
            let w: f64 = t.iter().filter(|x| x.0 == o).map(|x| x.1).sum();
            assert!((w - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn matches_torch_bicubic_on_a_ramp() {
        // torch: F.interpolate(torch.arange(12.).reshape(1,1,3,4), size=(5,2), mode='bicubic', align_corners=False)
        let want = [[0.0223f32, 2.2098], [1.6703, 3.8578], [4.4062, 6.5938], [7.1422, 9.3298], [8.7903, 10.9778]];
        let mut table = vec![-1.0f32];
        table.extend((0..12).map(|x| x as f32));
        let out = resize_pos_embed(&table, 1, (3, 4), (5, 2), PosResize::Torch).unwrap();
        assert_eq!(out[0], -1.0);
        for r in 0..5 {
            for c in 0..2 {
                let got = out[1 + r * 2 + c];
                assert!((got - want[r][c]).abs() < 1e-4, "({r},{c}): {got} vs {}", want[r][c]);
            }
        }
    }
}
