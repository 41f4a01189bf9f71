//! Element-wise math written for vector lanes: loops over these functions, compiled for the widest vector
//! unit of the host ([`widest_vectors`]), run 8 or 16 entries per instruction, where the libm calls
//! (`expf`, `erff`) are one call per entry. No crate on stable Rust offers vectorisable f32 exp/erf, so
//! these are the classic branch-free polynomials, each tested against f64 below.
//!
//! Both are plain multiplies and adds (no fused multiply-add), so every vector width and the scalar
//! baseline give the same bits.

/// Defines `fn $name(args)` that runs `$lanes(args)` (an `#[inline(always)]` function of independent lanes)
/// compiled for AVX-512, AVX2 or the baseline, whichever the host has: the same arithmetic, lane by lane.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $lanes:ident) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $lanes($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $lanes($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the host has AVX-512F (checked on the line above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the host has AVX2 (checked on the line above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $lanes($($arg),*)
        }
    };
}

pub(crate) use widest_vectors;

/// The transpose of a 16 × 16 tile of f32 held as 16 rows of one vector each: out[c][r] = rows[r][c], by four
/// rounds of shuffles (pairs within 128-bit lanes, quads within lanes, then lanes twice).
///
/// # Safety
/// The host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(mut r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    // t[2q], t[2q+1]: rows 2q and 2q+1 interleaved (pairs of columns 4k, 4k+1 and 4k+2, 4k+3 per lane k).
    for q in 0..8 {
        t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
    }
    // r[4q + c]: rows 4q..4q+4 of columns c, c+4, c+8, c+12, one 128-bit lane each.
    for q in 0..4 {
        let (x, y) = (4 * q, 4 * q + 2);
        r[4 * q] = _mm512_shuffle_ps::<0x44>(t[x], t[y]);
        r[4 * q + 1] = _mm512_shuffle_ps::<0xee>(t[x], t[y]);
        r[4 * q + 2] = _mm512_shuffle_ps::<0x44>(t[x + 1], t[y + 1]);
        r[4 * q + 3] = _mm512_shuffle_ps::<0xee>(t[x + 1], t[y + 1]);
    }
    // t[c], t[c+4] (rows 0..8) and t[c+8], t[c+12] (rows 8..16): columns c, c+8 and c+4, c+12.
    for q in 0..4 {
        t[q] = _mm512_shuffle_f32x4::<0x88>(r[q], r[q + 4]);
        t[q + 4] = _mm512_shuffle_f32x4::<0xdd>(r[q], r[q + 4]);
        t[q + 8] = _mm512_shuffle_f32x4::<0x88>(r[q + 8], r[q + 12]);
        t[q + 12] = _mm512_shuffle_f32x4::<0xdd>(r[q + 8], r[q + 12]);
    }
    // Whole columns.
    for q in 0..8 {
        r[q] = _mm512_shuffle_f32x4::<0x88>(t[q], t[q + 8]);
        r[q + 8] = _mm512_shuffle_f32x4::<0xdd>(t[q], t[q + 8]);
    }
    r
}

/// Side of the tiles [`add_tile_transposed`] takes.
pub(crate) const TILE: usize = 16;

/// dst[c·ld + r] = src[c·ld + r] + t[r·ldt + c] for r < rows, c < cols (both ≤ [`TILE`]): a tile of t added
/// transposed, one rounding per entry. The rows of t are read and the rows of dst written whole, a cache line
/// each, where a walk down a column would touch one line (and at a stride of a row of W, nearly one page) per
/// entry. With AVX-512 the tile is transposed in registers ([`transpose16`]), else through a small buffer.
///
/// # Safety
/// dst and src are valid for the entries c·ld + r, t for r·ldt + c (r < rows, c < cols); src may be dst, and
/// no other thread writes those entries of dst.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_tile_transposed(
    dst: *mut f32,
    src: *const f32,
    ld: usize,
    t: *const f32,
    ldt: usize,
    rows: usize,
    cols: usize,
) {
    assert!(rows <= TILE && cols <= TILE);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked above; the rest is the caller's.
        return unsafe { add_tile_transposed_avx512(dst, src, ld, t, ldt, rows, cols) };
    }
    // SAFETY: the caller's.
    unsafe { add_tile_transposed_scalar(dst, src, ld, t, ldt, rows, cols) }
}

/// [`add_tile_transposed`] through a small buffer, so that t is still read a row at a time.
///
/// # Safety
/// As [`add_tile_transposed`].
#[allow(clippy::too_many_arguments)]
unsafe fn add_tile_transposed_scalar(
    dst: *mut f32,
    src: *const f32,
    ld: usize,
    t: *const f32,
    ldt: usize,
    rows: usize,
    cols: usize,
) {
    // buf[c][r] = t[r, c]
    let mut buf = [[0f32; TILE]; TILE];
    for r in 0..rows {
        for (c, b) in buf.iter_mut().enumerate().take(cols) {
            // SAFETY: r < rows, c < cols (caller).
            b[r] = unsafe { *t.add(r * ldt + c) };
        }
    }
    for (c, b) in buf.iter().enumerate().take(cols) {
        for (r, &v) in b.iter().enumerate().take(rows) {
            // SAFETY: r < rows, c < cols (caller).
            unsafe { *dst.add(c * ld + r) = *src.add(c * ld + r) + v };
        }
    }
}

/// [`add_tile_transposed`] with the rows of t loaded into vectors (masked at the edges) and transposed.
///
/// # Safety
/// As [`add_tile_transposed`], on a host with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn add_tile_transposed_avx512(
    dst: *mut f32,
    src: *const f32,
    ld: usize,
    t: *const f32,
    ldt: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    const _: () = assert!(TILE == 16);
    let mask = |n: usize| if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
    let (row_mask, col_mask) = (mask(rows), mask(cols));
    let mut v = [_mm512_setzero_ps(); 16];
    for (r, v) in v.iter_mut().enumerate().take(rows) {
        // SAFETY: the cols floats of row r of t (caller).
        *v = unsafe { _mm512_maskz_loadu_ps(col_mask, t.add(r * ldt)) };
    }
    // SAFETY: AVX-512F (this function's feature).
    let v = unsafe { transpose16(v) };
    for (c, col) in v.iter().enumerate().take(cols) {
        // SAFETY: the rows floats at c·ld of dst and src (caller).
        unsafe {
            let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(row_mask, src.add(c * ld)), *col);
            _mm512_mask_storeu_ps(dst.add(c * ld), row_mask, sum);
        }
    }
}

/// Σ v in 16 interleaved partial sums (lane l adds v[l], v[l + 16], ... in order), then those sums and the
/// tail in order: a sum that vectorises, with the same bits at any vector width.
#[inline(always)]
pub(crate) fn sum_lanes(v: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = v.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    let s = acc.iter().fold(0f32, |s, &a| s + a);
    tail.iter().fold(s, |s, &t| s + t)
}

/// e^x within 2 ulp (Cephes' expf: x = n·ln2 + r with ln 2 in two parts, a degree-7 polynomial in r, 2^n
/// put in the exponent bits). e^0 = 1 exactly (a softmax's row maximum); NaN stays NaN; below −87.33 (where
/// e^x is no longer a normal f32) 0, above 88.37 +∞ (exact up to there; the callers' arguments are ≤ 0).
#[inline(always)]
pub(crate) fn exp_lanes(x: f32) -> f32 {
    const LO: f32 = -87.33;
    const HI: f32 = 88.37;
    const C1: f32 = 0.693_359_4; // ln 2 rounded to 355/512 (9 bits): n·C1 is exact
    const C2: f32 = -2.121_944_4e-4; // ln 2 − C1
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: t = y + ROUND holds round(y) in its low mantissa bits
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * C1) - n * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = (p * r) * r + r + 1.0;
    // 2^n: n + 127 into the exponent field (n is in [−126, 127] after the clamp).
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let v = y * f32::from_bits(((n_int + 127) << 23) as u32);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        v
    }
}

/// erf(x) within 4e-7 absolute, about 7 ulp near ±1 (Eigen's rational approximation x·P(x²)/Q(x²), 6.5e-8
/// in exact arithmetic, evaluated in f32; on [−4, 4], where |erf| reaches 1 in f32, clamped outside). As in
/// torch's own vectorised erf, 1 + erf(x) far in the negative tail keeps this absolute error, not libm's
/// relative one. NaN stays NaN.
#[inline(always)]
pub(crate) fn erf_lanes(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0); // NaN stays NaN
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    (x * p) / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact value.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// Both paths of the transposed tile add against the definition, on full and edge tiles, apart and in place.
    #[test]
    fn tile_adds_transposed() {
        let (ld, ldt) = (21, 19);
        let t: Vec<f32> = (0..TILE * ldt).map(|i| (i as f32 * 0.37).sin()).collect();
        let src: Vec<f32> = (0..TILE * ld).map(|i| (i as f32 * 0.11).cos()).collect();
        // dst apart from src starts elsewhere: outside the tile it must keep its own values, inside read src.
        let other: Vec<f32> = src.iter().map(|x| x + 100.0).collect();
        for (rows, cols) in [(16, 16), (5, 16), (16, 3), (7, 11), (1, 1)] {
            let (mut want_apart, mut want_in_place) = (other.clone(), src.clone());
            for r in 0..rows {
                for c in 0..cols {
                    want_apart[c * ld + r] = src[c * ld + r] + t[r * ldt + c];
                    want_in_place[c * ld + r] = want_apart[c * ld + r];
                }
            }
            type Add = unsafe fn(*mut f32, *const f32, usize, *const f32, usize, usize, usize);
            let mut paths: Vec<(&str, Add)> =
                vec![("dispatch", add_tile_transposed), ("scalar", add_tile_transposed_scalar)];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                paths.push(("avx512", add_tile_transposed_avx512));
            }
            for (name, add) in paths {
                let (mut apart, mut in_place) = (other.clone(), src.clone());
                // SAFETY: every index stays below TILE·ld (dst, src) and TILE·ldt (t); AVX-512 checked above.
                unsafe {
                    add(apart.as_mut_ptr(), src.as_ptr(), ld, t.as_ptr(), ldt, rows, cols);
                    let p = in_place.as_mut_ptr();
                    add(p, p, ld, t.as_ptr(), ldt, rows, cols);
                }
                for (what, got, want) in [("apart", &apart, &want_apart), ("in place", &in_place, &want_in_place)] {
                    let bad = got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
                    assert_eq!(bad, 0, "{name} {what} {rows}x{cols}: {bad} entries differ");
                }
            }
        }
    }

    #[test]
    fn exp_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            worst = worst.max(ulps(exp_lanes(x), (x as f64).exp()));
            x += 0.000_77;
        }
        assert!(worst <= 2.0, "exp: {worst} ulp");
        assert_eq!(exp_lanes(0.0), 1.0);
        assert_eq!(exp_lanes(-100.0), 0.0);
        assert_eq!(exp_lanes(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_lanes(100.0), f32::INFINITY);
        assert!(exp_lanes(f32::NAN).is_nan());
    }

    #[test]
    fn erf_within_4e_7() {
        let (mut worst, mut at) = (0f64, 0f32);
        let mut x = -6f32;
        while x < 6.0 {
            let e = (erf_lanes(x) as f64 - libm::erf(x as f64)).abs();
            if e > worst {
                (worst, at) = (e, x);
            }
            x += 0.000_31;
        }
        assert!(worst <= 4e-7, "erf: max error {worst:e} at {at}");
        assert_eq!(erf_lanes(0.0), 0.0);
        assert!(erf_lanes(f32::NAN).is_nan());
    }
}
