//! Checks of `ops::convert`: bf16 round to nearest even and widening, bit for bit.
use super::Case;
use crate::error::Result;
use crate::ops::convert as op;
use crate::runtime::{DType, Plan, Pool};

/// Odd, spanning many blocks of 256.
const BF16_ELEMENTS: usize = 37 * 1013;

/// f32 values that exercise bf16 rounding, all of which round to finite bf16 values (an infinity would
/// fail the comparison): exact ties of every exponent, their neighbours one f32 step off, values from the
/// f32 subnormals up to 2^120, N(0, 1) values, signed zeros and the largest values short of overflow.
fn bf16_test_values(cx: &mut Case, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            let sign = if cx.below(2) == 0 { 0 } else { 0x8000_0000u32 };
            // Kept parts up to 0x7F7E: even at the top, so no tie there rounds up to infinity.
            let tie = sign | (cx.below(0x7F7F) as u32) << 16 | 0x8000;
            match i % 4 {
                0 => f32::from_bits(tie),
                1 => f32::from_bits(if cx.below(2) == 0 { tie + 1 } else { tie - 1 }),
                2 => cx.randn(1, 1.0)[0] * 2f32.powi(cx.below(266) as i32 - 145),
                _ => cx.randn(1, 1.0)[0],
            }
        })
        .collect();
    let edges = [
        0.0,
        -0.0,
        f32::from_bits(0x0000_0001),
        f32::from_bits(0x8000_8000),
        f32::from_bits(0x0001_8000),
        f32::from_bits(0x007F_FFFF),
        f32::from_bits(0x7F7F_0000),
        f32::from_bits(0x7F7F_7FFF),
        f32::from_bits(0xFF7F_7FFF),
    ];
    for (i, e) in edges.into_iter().enumerate() {
        v[n - 1 - 97 * i] = e; // spread over the last blocks, the tail included
    }
    v
}

/// dst = f32(src) from bf16 values uploaded (rounded on the host) to both sides.
pub(super) fn bf16_widen(cx: &mut Case) -> Result<()> {
    let n = BF16_ELEMENTS;
    let mut p = Plan::new();
    let src = p.add("src (bf16)", &[n], DType::BF16, Pool::Frozen);
    let dst = p.f32("dst", &[n], Pool::Activations);
    let tw = cx.twin(p)?;
    let v = bf16_test_values(cx, n);
    tw.upload(src, &v)?;
    tw.poison(&[dst])?;
    tw.run(|rt| op::bf16_widen(rt, dst, src))?;
    cx.compare(&tw, dst)?;
    cx.compare_bits(&tw, dst)
}

/// dst = bf16(x) and x = f32(dst) in place; then x alone, without dst.
pub(super) fn bf16_round(cx: &mut Case) -> Result<()> {
    let n = BF16_ELEMENTS;
    let mut p = Plan::new();
    let x = p.f32("x (rounded in place)", &[n], Pool::Activations);
    let dst = p.add("dst (bf16)", &[n], DType::BF16, Pool::Activations);
    let tw = cx.twin(p)?;
    let v = bf16_test_values(cx, n);
    tw.upload(x, &v)?;
    tw.poison(&[dst])?;
    tw.run(|rt| op::bf16_round(rt, Some(dst), x))?;
    cx.compare(&tw, dst)?;
    cx.compare_bits(&tw, dst)?;
    cx.compare(&tw, x)?;
    cx.compare_bits(&tw, x)?;
    // Without dst (a recomputed checkpoint): x alone rounded in place, the same bits.
    let v = bf16_test_values(cx, n);
    tw.upload(x, &v)?;
    tw.run(|rt| op::bf16_round(rt, None, x))?;
    cx.compare_bits(&tw, x)
}
