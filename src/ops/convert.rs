//! bf16 storage of fp32 values (frozen weights, residual-stream checkpoints): the math stays fp32, only what is
//! kept between the forward and the backward is stored in bfloat16. CUDA twin: `cuda/convert.cu`.
//!
//! Rounding is to nearest, ties to even; values beyond the largest bf16 round to ±inf, subnormals are kept,
//! a NaN stays a NaN. The CPU uses the `half` crate and the kernels repeat its bit arithmetic, so both
//! devices agree bit for bit on every input (NaN payloads included).
use half::bf16;

use crate::error::Result;
use crate::runtime::cuda::{grid_1d, DevPtr, KArg};
use crate::runtime::{Backend, DType, Runtime, Tensor};

/// dst = f32(src), exact.                                               dst: f32 (n), src: bf16 (n)
pub(crate) fn bf16_widen(rt: &Runtime, dst: Tensor, src: Tensor) -> Result<()> {
    assert!(
        dst.dtype == DType::F32 && src.dtype == DType::BF16,
        "bf16_widen: dtypes {:?} <- {:?}",
        dst.dtype,
        src.dtype
    );
    assert_eq!(dst.numel, src.numel);
    match &rt.backend {
        Backend::Cpu => cpu::widen(rt.f32_mut(dst), rt.bf16(src)),
        Backend::Cuda(c) => c.launch(
            "snella_bf16_widen",
            grid_1d(dst.numel, 256),
            &[KArg::Ptr(rt.ptr(dst)), KArg::Ptr(rt.ptr(src)), KArg::I64(dst.numel as i64)],
        )?,
    }
    Ok(())
}

/// dst = bf16(x) (round to nearest even), and x = f32(dst) in place, so the fp32 values the forward goes on
/// with are exactly the ones the backward will widen from dst. Without dst, x is only rounded in place (a
/// checkpoint the backward recomputes instead of keeping, rounded as if it were kept).
///                                                                             dst: bf16 (n), x: f32 (n)
pub(crate) fn bf16_round(rt: &Runtime, dst: Option<Tensor>, x: Tensor) -> Result<()> {
    assert!(x.dtype == DType::F32, "bf16_round: x is {:?}", x.dtype);
    if let Some(dst) = dst {
        assert!(dst.dtype == DType::BF16, "bf16_round: dst is {:?}", dst.dtype);
        assert_eq!(dst.numel, x.numel);
    }
    match &rt.backend {
        Backend::Cpu => cpu::round(dst.map(|d| rt.bf16_mut(d)), rt.f32_mut(x)),
        Backend::Cuda(c) => c.launch(
            "snella_bf16_round",
            grid_1d(x.numel, 256),
            &[KArg::Ptr(dst.map_or(DevPtr::NULL, |d| rt.ptr(d))), KArg::Ptr(rt.ptr(x)), KArg::I64(x.numel as i64)],
        )?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use super::bf16;

    pub fn widen(dst: &mut [f32], src: &[bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    pub fn round(dst: Option<&mut [bf16]>, x: &mut [f32]) {
        match dst {
            Some(dst) => {
                for (d, v) in dst.iter_mut().zip(x) {
                    *d = bf16::from_f32(*v);
                    *v = d.to_f32();
                }
            }
            None => {
                for v in x {
                    *v = bf16::from_f32(*v).to_f32();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::{bf16_round, bf16_widen, cpu};
    use crate::runtime::{DType, Plan, Pool, Runtime};

    /// The value of bf16 bits as f64, with the infinity's bits standing for 2^128 (the value IEEE rounding
    /// compares against when deciding overflow).
    fn value(bits: u16) -> f64 {
        let mag = bits & 0x7FFF;
        let v = if mag == 0x7F80 { 2f64.powi(128) } else { f32::from_bits((mag as u32) << 16) as f64 };
        if bits & 0x8000 != 0 {
            -v
        } else {
            v
        }
    }

    /// Round to nearest, ties to even, from first principles: the two bf16 neighbours of x (its truncation
    /// toward zero and the next one away from zero), the nearer in f64, the even one at a tie.
    fn reference_round(x: f32) -> u16 {
        assert!(!x.is_nan());
        let low = (x.to_bits() >> 16) as u16;
        if x.is_infinite() || x.to_bits() & 0xFFFF == 0 {
            return low;
        }
        let high = low + 1; // one bf16 step away from zero; from the largest finite value, infinity
        let (dl, dh) = ((x as f64 - value(low)).abs(), (value(high) - x as f64).abs());
        if dl < dh || (dl == dh && low & 1 == 0) {
            low
        } else {
            high
        }
    }

    /// Ties (even and odd kept part), just off ties, subnormals, zeros, the overflow boundary, infinities.
    fn special_values() -> Vec<f32> {
        let bits: [u32; 22] = [
            0x3F80_8000, // 1 + 2^-8: a tie, kept part even -> down to 1
            0x3F81_8000, // a tie, kept part odd -> up
            0x3F80_8001, // just above the tie -> up
            0x3F81_7FFF, // just below the tie -> down
            0x0000_0001, // smallest f32 subnormal -> +0
            0x0000_8000, // subnormal tie, even -> +0
            0x0001_8000, // subnormal tie, odd -> up
            0x0000_8001, // just above a subnormal tie -> smallest bf16 subnormal
            0x007F_FFFF, // largest f32 subnormal -> smallest normal
            0x8001_8000, // negative subnormal tie, odd
            0x0000_0000,
            0x8000_0000,
            0x7F7F_0000, // largest finite bf16
            0x7F7F_7FFF, // just below the overflow tie -> largest finite
            0x7F7F_8000, // the overflow tie (kept part odd) -> inf
            0x7F7F_FFFF, // f32::MAX -> inf
            0xFF7F_FFFF, // -f32::MAX -> -inf
            0x7F80_0000,
            0xFF80_0000,
            0xBF80_8000, // negative tie, even -> down in magnitude
            0xC049_0FDB, // -pi
            0x3EAA_AAAB, // 1/3
        ];
        bits.into_iter().map(f32::from_bits).collect()
    }

    /// SplitMix64 draws, for bit patterns spread over the whole f32 range.
    fn random_bits(n: usize, seed: u64) -> Vec<u32> {
        use rand::RngCore;
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| r.next_u64() as u32).collect()
    }

    #[test]
    fn round_is_nearest_even_with_overflow_to_inf() {
        let mut x = special_values();
        x.extend(random_bits(200_000, 7).into_iter().map(f32::from_bits).filter(|v| !v.is_nan()));
        // Exact ties over the whole range: every kept part, both parities.
        x.extend(
            random_bits(20_000, 8)
                .into_iter()
                .map(|b| f32::from_bits((b & 0xFFFF_0000) | 0x8000))
                .filter(|v| !v.is_nan()),
        );
        let want: Vec<u16> = x.iter().map(|&v| reference_round(v)).collect();
        let mut dst = vec![bf16::ZERO; x.len()];
        let orig = x.clone();
        cpu::round(Some(&mut dst), &mut x);
        for (i, (&v, &w)) in orig.iter().zip(&want).enumerate() {
            assert_eq!(dst[i].to_bits(), w, "round({v:e} = {:#010x})", v.to_bits());
            assert_eq!(x[i].to_bits(), (w as u32) << 16, "x after round({v:e}) is the widened bf16");
        }
        let named = |b: u32| want[orig.iter().position(|v| v.to_bits() == b).unwrap()];
        assert_eq!(named(0x3F80_8000), 0x3F80);
        assert_eq!(named(0x3F81_8000), 0x3F82);
        assert_eq!(named(0x0000_8000), 0x0000);
        assert_eq!(named(0x0001_8000), 0x0002);
        assert_eq!(named(0x7F7F_7FFF), 0x7F7F);
        assert_eq!(named(0x7F7F_8000), 0x7F80);
        assert_eq!(named(0xFF7F_FFFF), 0xFF80);
        assert_eq!(named(0x8000_0000), 0x8000);
    }

    #[test]
    fn nan_stays_nan() {
        // Quiet and signalling NaNs of both signs; a naive rounding carries the signalling one's low
        // payload into infinity.
        let mut x: Vec<f32> = [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_8000, 0x7FFF_FFFF, 0xFFC0_1234]
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let mut dst = vec![bf16::ZERO; x.len()];
        cpu::round(Some(&mut dst), &mut x);
        assert!(dst.iter().all(|b| b.is_nan()) && x.iter().all(|v| v.is_nan()), "{dst:?} {x:?}");
        let mut w = vec![0f32; 2];
        cpu::widen(&mut w, &[bf16::from_bits(0x7F81), bf16::from_bits(0xFFC0)]);
        assert!(w.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn widen_is_exact_on_every_bf16() {
        let src: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut dst = vec![0f32; src.len()];
        cpu::widen(&mut dst, &src);
        for (b, &v) in (0..=u16::MAX).zip(&dst) {
            if b & 0x7FFF > 0x7F80 {
                assert!(v.is_nan(), "{b:#06x}");
            } else {
                assert_eq!(v.to_bits(), (b as u32) << 16, "{b:#06x}");
                if b & 0x7FFF == 0x7F80 {
                    assert!(v.is_infinite() && v.is_sign_negative() == (b & 0x8000 != 0), "{b:#06x}");
                } else {
                    assert_eq!(v as f64, value(b), "{b:#06x}");
                }
            }
        }
    }

    #[test]
    fn ops_through_the_runtime() {
        let n = 1001; // odd: the bf16 tensor ends inside a 4-byte word
        let mut p = Plan::new();
        let x = p.add("x", &[n], DType::F32, Pool::Activations);
        let b = p.add("x.bf16", &[n], DType::BF16, Pool::Activations);
        let y = p.add("y", &[n], DType::F32, Pool::Activations);
        let rt = Runtime::cpu(p);
        let mut xv: Vec<f32> = random_bits(n, 3).into_iter().map(|b| f32::from_bits(b & 0xBFFF_FFFF)).collect(); // |x| < 4
        xv[0] = f32::from_bits(0x3F81_8000);
        rt.upload(x, &xv).unwrap();
        rt.fill_bytes(b, 0xFF).unwrap();
        bf16_round(&rt, Some(b), x).unwrap();
        bf16_widen(&rt, y, b).unwrap();
        let (xr, yv, bv) = (rt.download(x).unwrap(), rt.download(y).unwrap(), rt.download(b).unwrap());
        for i in 0..n {
            let want = f32::from_bits((reference_round(xv[i]) as u32) << 16);
            assert_eq!(xr[i].to_bits(), want.to_bits(), "x[{i}] rounded in place");
            assert_eq!(yv[i].to_bits(), want.to_bits(), "widen(round(x))[{i}]");
            assert_eq!(bv[i].to_bits(), want.to_bits(), "download of the bf16 tensor [{i}]");
        }
        assert_eq!(xr[0], f32::from_bits(0x3F82_0000));
        // Without a bf16 tensor, x is rounded in place to the same values.
        rt.upload(x, &xv).unwrap();
        bf16_round(&rt, None, x).unwrap();
        assert!(rt.download(x).unwrap().iter().zip(&xr).all(|(a, b)| a.to_bits() == b.to_bits()), "in place only");
    }
}
