//! Intra-layer magnitude competition (method.md §4–§6): the threshold t = quantile(|M|, s), the sparsified
//! update M_s = M ⊙ sg(|M|) ⊙ 1[|M| > t], its backward, and the merged weight W0 + M_sᵀ.
//! CUDA twin: `cuda/sparsify.cu`.
//!
//! The quantile is torch.quantile (linear interpolation) as the official code ran it (torch ≤ 2.11):
//! v = sort(|M|) ascending; rank = f32(s)·f32(n−1) computed in **fp32**; lo = trunc(rank), hi = ceil(rank),
//! w = rank − lo; `t = lerp(v[lo], v[hi], w)` with torch's lerp (|w| < 0.5: v_lo + w·(v_hi − v_lo), else
//! v_hi − (v_hi − v_lo)·(1 − w)). A NaN anywhere gives t = NaN (and then nothing is kept). Entries are
//! kept when |M| > t, strictly: s = 0 still drops the minimum, s = 1 drops everything.
//!
//! On CUDA the two order statistics `v[lo]`, `v[hi]` come from a radix select on the u32 bits of |M|
//! (non-negative floats order like their bits): 4 passes of 8 bits, each a histogram kernel over M and
//! a one-block kernel that fixes one digit; t is computed and stored on the device, and the apply
//! kernel reads it from there: no sort, no allocation, no host round trip.
use cudarc::driver::LaunchConfig;

use crate::error::Result;
use crate::runtime::cuda::{grid_1d, KArg};
use crate::runtime::{Backend, DType, Plan, Pool, Runtime, Tensor};

/// Device workspace of the threshold select of one layer (the CPU uses none). Pool::Scratch, current scope.
pub struct SparsifyScratch {
    /// Per-rank digit histograms of the current pass.                     (2, 256) u32
    pub hist: Tensor,
    /// Key prefixes and remaining ranks of lo and hi, NaN flag.           (8) u32
    pub state: Tensor,
    /// Entries of the M this scratch was planned for (an upper bound).
    pub numel: usize,
}

impl SparsifyScratch {
    pub fn plan(plan: &mut Plan, prefix: &str, numel: usize) -> SparsifyScratch {
        SparsifyScratch {
            hist: plan.add(format!("{prefix}.sparsify.hist"), &[2, 256], DType::I32, Pool::Scratch),
            state: plan.add(format!("{prefix}.sparsify.state"), &[8], DType::I32, Pool::Scratch),
            numel,
        }
    }
}

/// rank = s·(n−1) in fp32 and its (lo, hi, w), as torch.quantile with an fp32 input.
pub fn quantile_rank(n: usize, s: f32) -> (usize, usize, f32) {
    assert!(n >= 1, "quantile of an empty tensor");
    assert!((0.0..=1.0).contains(&s), "sparsity ratio {s} outside [0, 1]");
    assert!(n <= 1 << 24, "quantile: {n} entries exceed torch's 2^24 limit (the fp32 rank would be inexact)");
    let rank = s * (n - 1) as f32;
    let lo = rank as usize; // trunc
    let hi = rank.ceil() as usize;
    (lo, hi.min(n - 1), rank - lo as f32)
}

/// torch.lerp(lo, hi, w) on f32 scalars.
#[inline]
pub fn lerp(lo: f32, hi: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        lo + w * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - w)
    }
}

/// `t[0] = quantile_linear(|M|, s)` with the fp32 rank (method.md §4; the reference's quantile_linear), `M_s = M * |M| * 1[|M| > t]` (strict).
/// t: (1) stays on the device (no host round trip on CUDA). ms, m: (numel); ms may be m (in place).
pub fn sparsify_forward(rt: &Runtime, ms: Tensor, t: Tensor, m: Tensor, s: f32, sc: &SparsifyScratch) -> Result<()> {
    assert_eq!(ms.numel, m.numel, "sparsify: M_s and M differ in size");
    sparsify_select(rt, t, m, s, sc)?;
    sparsify_apply(rt, ms, m, t)
}

/// `t[0] = quantile_linear(|M|, s)` alone (the first half of [`sparsify_forward`]).   t: (1)  m: (numel)
pub fn sparsify_select(rt: &Runtime, t: Tensor, m: Tensor, s: f32, sc: &SparsifyScratch) -> Result<()> {
    let n = m.numel;
    assert_eq!(t.numel, 1, "sparsify: t is a 1-element tensor");
    assert!(n <= sc.numel, "sparsify: scratch planned for {} entries, M has {n}", sc.numel);
    let (lo, hi, w) = quantile_rank(n, s);
    match &rt.backend {
        Backend::Cpu => rt.f32_mut(t)[0] = cpu::quantile(rt.f32(m), lo, hi, w),
        Backend::Cuda(cu) => {
            assert!(n < i32::MAX as usize);
            let (state, hist) = (rt.ptr(sc.state), rt.ptr(sc.hist));
            let one_block =
                |threads: u32| LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            cu.launch(
                "snella_select_init",
                one_block(256),
                &[KArg::Ptr(state), KArg::Ptr(hist), KArg::I32(lo as i32), KArg::I32(hi as i32)],
            )?;
            let mut hist_cfg = grid_1d(n, 256);
            hist_cfg.grid_dim.0 = hist_cfg.grid_dim.0.min(1024);
            for pass in 0..4 {
                cu.launch(
                    "snella_select_histogram",
                    hist_cfg,
                    &[KArg::Ptr(rt.ptr(m)), KArg::I64(n as i64), KArg::Ptr(state), KArg::Ptr(hist), KArg::I32(pass)],
                )?;
                // Exactly 256 threads: one per bin.
                cu.launch(
                    "snella_select_narrow",
                    one_block(256),
                    &[KArg::Ptr(state), KArg::Ptr(hist), KArg::I32(pass)],
                )?;
            }
            cu.launch(
                "snella_select_threshold",
                one_block(32),
                &[KArg::Ptr(rt.ptr(t)), KArg::Ptr(state), KArg::F32(w)],
            )?;
        }
    }
    Ok(())
}

/// `M_s = M * |M| * 1[|M| > t]` with a threshold t already computed (the backward reuses its forward's t:
/// the same factors give the same M, so the quantile select is not run twice).
/// ms, m: (numel); ms may be m (in place)   t: (1)
pub fn sparsify_apply(rt: &Runtime, ms: Tensor, m: Tensor, t: Tensor) -> Result<()> {
    let n = m.numel;
    assert!(ms.numel == n && t.numel == 1, "sparsify_apply: M_s and M differ in size, or t is not 1 element");
    match &rt.backend {
        Backend::Cpu => {
            let tv = rt.f32(t)[0];
            if ms == m {
                cpu::apply_inplace(rt.f32_mut(ms), tv)
            } else {
                cpu::apply(rt.f32_mut(ms), rt.f32(m), tv)
            }
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_sparsify_apply",
            grid_1d(n, 256),
            &[KArg::Ptr(rt.ptr(ms)), KArg::Ptr(rt.ptr(m)), KArg::Ptr(rt.ptr(t)), KArg::I64(n as i64)],
        )?,
    }
    Ok(())
}

/// dm = dms * |M| * 1[|M| > t] (overwrites dm; dm may be the same tensor as dms, in place).
/// dm, dms, m: (numel)   t: (1)
pub fn sparsify_backward(rt: &Runtime, dm: Tensor, dms: Tensor, m: Tensor, t: Tensor) -> Result<()> {
    let n = m.numel;
    assert!(dm.numel == n && dms.numel == n && t.numel == 1);
    assert!(dm != m, "sparsify_backward: dm must not overwrite M");
    match &rt.backend {
        Backend::Cpu => {
            let tv = rt.f32(t)[0];
            if dm == dms {
                cpu::apply_grad_inplace(rt.f32_mut(dm), rt.f32(m), tv)
            } else {
                cpu::apply_grad(rt.f32_mut(dm), rt.f32(dms), rt.f32(m), tv)
            }
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_sparsify_backward",
            grid_1d(n, 256),
            &[
                KArg::Ptr(rt.ptr(dm)),
                KArg::Ptr(rt.ptr(dms)),
                KArg::Ptr(rt.ptr(m)),
                KArg::Ptr(rt.ptr(t)),
                KArg::I64(n as i64),
            ],
        )?,
    }
    Ok(())
}

/// dst (out, in) = w0 (out, in) + ms^T where ms is (in, out): the merged weight W0 + M_s^T used by the
/// forward (no extra GEMM). dst may be w0 (in place).
pub fn add_transposed(rt: &Runtime, dst: Tensor, w0: Tensor, ms: Tensor, n_in: usize, n_out: usize) -> Result<()> {
    let n = n_in * n_out;
    assert!(dst.numel == n && w0.numel == n && ms.numel == n, "add_transposed: sizes must be {n_in}x{n_out}");
    assert!(dst != ms, "add_transposed: dst must not overwrite M_s");
    match &rt.backend {
        Backend::Cpu => {
            if dst == w0 {
                cpu::add_transposed_inplace(rt.f32_mut(dst), rt.f32(ms), n_in, n_out)
            } else {
                cpu::add_transposed(rt.f32_mut(dst), rt.f32(w0), rt.f32(ms), n_in, n_out)
            }
        }
        Backend::Cuda(cu) => cu.launch(
            "snella_add_transposed",
            LaunchConfig {
                grid_dim: ((n_out as u32).div_ceil(32), (n_in as u32).div_ceil(32), 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            },
            &[
                KArg::Ptr(rt.ptr(dst)),
                KArg::Ptr(rt.ptr(w0)),
                KArg::Ptr(rt.ptr(ms)),
                KArg::I32(n_in as i32),
                KArg::I32(n_out as i32),
            ],
        )?,
    }
    Ok(())
}

/// Number of kept entries (|M| > t), read back to the host (for reports and tests, not used in the step:
/// on CUDA it downloads M and t).
pub fn kept_count(rt: &Runtime, m: Tensor, t: Tensor) -> Result<usize> {
    assert_eq!(t.numel, 1);
    Ok(match &rt.backend {
        Backend::Cpu => cpu::kept(rt.f32(m), rt.f32(t)[0]),
        Backend::Cuda(_) => cpu::kept(&rt.download(m)?, rt.download(t)?[0]),
    })
}

pub(crate) mod cpu {
    use super::lerp;
    use crate::ops::lanes::{add_tile_transposed, TILE};
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    /// Bins of the select's histogram: the top 14 bits of |x|'s bit pattern (exponent and 6 mantissa bits).
    const BIN_SHIFT: u32 = 17;
    const BINS: usize = 1 << (31 - BIN_SHIFT);
    /// Entries per task of the select's two passes.
    const CHUNK: usize = 1 << 16;

    /// lerp(v[lo], v[hi], w) over v = sort(|m|); NaN if m has one (hi is lo or lo + 1): the values of a full
    /// sort, from [`bracketed`] in one pass over a large M, or else from [`histogram_select`] in two.
    pub fn quantile(m: &[f32], lo: usize, hi: usize, w: f32) -> f32 {
        let (k_lo, k_hi) = match bracketed(m, lo, hi) {
            Some(Ok(keys)) => keys,
            Some(Err(Nan)) => return f32::NAN,
            None => match histogram_select(m, lo, hi) {
                Ok(keys) => keys,
                Err(Nan) => return f32::NAN,
            },
        };
        lerp(f32::from_bits(k_lo), f32::from_bits(k_hi), w)
    }

    /// M holds a NaN (the quantile is NaN).
    pub(super) struct Nan;

    /// The bits of |x|: non-negative floats order like their bits.
    #[inline(always)]
    fn key(x: &f32) -> u32 {
        x.to_bits() & 0x7fff_ffff
    }

    /// Below this many entries the two passes of [`histogram_select`] cost too little to be worth a sample.
    const BRACKET_MIN: usize = 1 << 18;
    /// The sample: every SAMPLE_STRIDE-th entry of M. A prime stride walks across the columns of a row-major
    /// M whose row length it does not divide: a sample of whole runs at a period that divides the row length
    /// (ViT widths are 2^k·3) sees the same few columns in every row, and a column's scale then moves the
    /// sample's ranks by several % of M.
    const SAMPLE_STRIDE: usize = 37;

    /// The keys v[lo] and v[hi] of sort(|m|) in one pass over m: a sample of M brackets the two ranks between
    /// two keys with a margin of 6 standard deviations of a sample rank, one parallel pass counts the
    /// entries below the bracket and collects those in it (a few % of M), and an exact selection among them
    /// picks the two. None (the caller falls back on [`histogram_select`]) for a short M, or when the bracket
    /// misses a rank, which only a sample far from its M's distribution does.
    pub(super) fn bracketed(m: &[f32], lo: usize, hi: usize) -> Option<Result<(u32, u32), Nan>> {
        let n = m.len();
        if n < BRACKET_MIN {
            return None;
        }
        // The sample is gathered in parallel: walked serially, it was most of the select's one-core time.
        let s = n.div_ceil(SAMPLE_STRIDE);
        let mut sample: Vec<u32> =
            (0..s).into_par_iter().with_min_len(1 << 12).map(|i| key(&m[i * SAMPLE_STRIDE])).collect();
        // A sample rank's standard deviation is ≤ √s/2 (binomial; a systematic sample across the rows does
        // not do worse): the margin is 6 of them.
        let margin = 3 * (s as f64).sqrt() as usize + 32;
        let (lo_s, hi_s) = (lo * s / n, hi * s / n);
        let i_a = lo_s.checked_sub(margin);
        let k_a = match i_a {
            Some(i) => *sample.select_nth_unstable(i).1,
            None => 0,
        };
        let k_b = match (hi_s + margin, i_a) {
            (i, _) if i >= s => u32::MAX,
            // The keys past i_a are the larger ones now: the sample's i-th is their (i − i_a − 1)-th.
            (i, Some(ia)) => *sample[ia + 1..].select_nth_unstable(i - ia - 1).1,
            (i, None) => *sample.select_nth_unstable(i).1,
        };
        let (below, mut v) = match candidates(m, k_a, k_b) {
            Ok(found) => found,
            Err(Nan) => return Some(Err(Nan)),
        };
        if lo < below || hi >= below + v.len() {
            return None;
        }
        Some(Ok(select_two(&mut v, lo - below, hi - lo)))
    }

    /// The keys of M in [k_a, k_b] (in no particular order) and the count of those below k_a, one parallel
    /// pass; Err(Nan) if M holds a NaN (the bracket may then be of no use: callers check it first).
    fn candidates(m: &[f32], k_a: u32, k_b: u32) -> Result<(usize, Vec<u32>), Nan> {
        let parts: Vec<(usize, Vec<u32>, bool)> = m
            .par_chunks(CHUNK)
            .map(|c| {
                // Room for every key plus one vector's overhang of the AVX-512 store; nothing is zeroed.
                let mut out = Vec::with_capacity(c.len() + 16);
                let (below, len, nan) = collect(c, k_a, k_b, out.spare_capacity_mut());
                // SAFETY: `collect` wrote out[..len].
                unsafe { out.set_len(len) };
                (below, out, nan)
            })
            .collect();
        if parts.iter().any(|p| p.2) {
            return Err(Nan);
        }
        let below = parts.iter().map(|p| p.0).sum();
        Ok((below, parts.into_iter().flat_map(|p| p.1).collect()))
    }

    /// One chunk of [`candidates`]: writes the keys in [k_a, k_b] to out[..len]; returns (below, len, NaN
    /// seen). out has room for c.len() + 16 keys.
    pub(super) fn collect(c: &[f32], k_a: u32, k_b: u32, out: &mut [MaybeUninit<u32>]) -> (usize, usize, bool) {
        assert!(out.len() >= c.len() + 16);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked above; out has the room asserted above.
            return unsafe { collect_avx512(c, k_a, k_b, out) };
        }
        collect_keys(c, k_a, k_b, out)
    }

    /// [`collect`] one key at a time (out has room for c.len() keys).
    pub(super) fn collect_keys(c: &[f32], k_a: u32, k_b: u32, out: &mut [MaybeUninit<u32>]) -> (usize, usize, bool) {
        let (mut below, mut len, mut nan) = (0usize, 0usize, false);
        for x in c {
            // Written always, kept by advancing the end or not: a filter's branch would mispredict on a good
            // part of the entries where the bracket holds a large share of |M|.
            let k = key(x);
            below += (k < k_a) as usize;
            nan |= k > 0x7f80_0000;
            out[len].write(k);
            len += (k >= k_a && k <= k_b) as usize;
        }
        (below, len, nan)
    }

    /// [`collect`] 16 keys at a time: the keys in the bracket compressed in a register and stored whole (the
    /// memory form of the compress is slow on some cores), the next store overwriting the unused lanes; the
    /// last c.len() % 16 by [`collect_keys`].
    ///
    /// # Safety
    /// The host has AVX-512F; `out` has room for c.len() + 16 keys.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn collect_avx512(c: &[f32], k_a: u32, k_b: u32, out: &mut [MaybeUninit<u32>]) -> (usize, usize, bool) {
        use std::arch::x86_64::*;
        let (abs, va, vb, inf) = (
            _mm512_set1_epi32(0x7fff_ffff),
            _mm512_set1_epi32(k_a as i32),
            _mm512_set1_epi32(k_b as i32),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let dst = out.as_mut_ptr().cast::<u32>();
        let (mut below, mut len, mut nan) = (0usize, 0usize, 0u16);
        let chunks = c.chunks_exact(16);
        let tail = chunks.remainder();
        for x in chunks {
            // SAFETY: x holds 16 floats; out + len has room for 16 more keys (len ≤ keys seen so far).
            unsafe {
                let k = _mm512_and_si512(_mm512_loadu_si512(x.as_ptr().cast()), abs);
                below += _mm512_cmplt_epu32_mask(k, va).count_ones() as usize;
                nan |= _mm512_cmpgt_epu32_mask(k, inf);
                let inside = _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(k, va), k, vb);
                _mm512_storeu_si512(dst.add(len).cast(), _mm512_maskz_compress_epi32(inside, k));
                len += inside.count_ones() as usize;
            }
        }
        // out[len..] has room for the tail: len ≤ the keys before it.
        let (t_below, t_len, t_nan) = collect_keys(tail, k_a, k_b, &mut out[len..]);
        (below + t_below, len + t_len, nan != 0 || t_nan)
    }

    /// (v[r], v[r + gap]) of the sorted candidates, gap 0 or 1.
    fn select_two(v: &mut [u32], r: usize, gap: usize) -> (u32, u32) {
        let (_, &mut k_lo, rest) = v.select_nth_unstable(r);
        let k_hi = if gap == 0 { k_lo } else { rest.iter().copied().min().expect("hi < n") };
        (k_lo, k_hi)
    }

    /// The keys v[lo] and v[hi] by a two-pass radix select, as on CUDA: one parallel pass counts the entries
    /// per bin of the top bits (and finds a NaN), and a second collects only the bins that hold the ranks lo
    /// and hi, among which an exact selection picks v[lo] and v[hi].
    fn histogram_select(m: &[f32], lo: usize, hi: usize) -> Result<(u32, u32), Nan> {
        // Whole chunks per fold step, each a plain loop (an element-wise fold passed the histogram through
        // rayon's plumbing once per entry).
        let (hist, nan) = m
            .par_chunks(CHUNK)
            .fold(
                || (vec![0u32; BINS], false),
                |(mut h, mut nan), c| {
                    for x in c {
                        let k = key(x);
                        h[(k >> BIN_SHIFT) as usize] += 1;
                        nan |= k > 0x7f80_0000;
                    }
                    (h, nan)
                },
            )
            .reduce(
                || (vec![0u32; BINS], false),
                |(mut a, na), (b, nb)| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    (a, na || nb)
                },
            );
        if nan {
            return Err(Nan);
        }
        // The bins of ranks lo and hi, and the count of entries below the first.
        let (mut below, mut bin_lo, mut bin_hi) = (0usize, None, BINS - 1);
        let mut seen = 0usize;
        for (b, &c) in hist.iter().enumerate() {
            if bin_lo.is_none() && seen + c as usize > lo {
                bin_lo = Some(b);
                below = seen;
            }
            if seen + c as usize > hi {
                bin_hi = b;
                break;
            }
            seen += c as usize;
        }
        let bin_lo = bin_lo.expect("lo < n");
        // The candidates: the keys of the bins from bin_lo to bin_hi.
        let (k_a, k_b) = ((bin_lo as u32) << BIN_SHIFT, (((bin_hi + 1) as u32) << BIN_SHIFT).wrapping_sub(1));
        let (_, mut v) = candidates(m, k_a, k_b)?;
        Ok(select_two(&mut v, lo - below, hi - lo))
    }

    /// max(|x|, t-threshold): |x| if |x| > t else 0 (torch F.threshold(|x|, t, 0)).
    #[inline]
    pub(crate) fn kept_mag(x: f32, t: f32) -> f32 {
        let a = x.abs();
        if a > t {
            a
        } else {
            0.0
        }
    }

    pub fn apply(ms: &mut [f32], m: &[f32], t: f32) {
        ms.par_iter_mut().zip(m.par_iter()).for_each(|(o, &x)| *o = x * kept_mag(x, t));
    }

    pub fn apply_inplace(m: &mut [f32], t: f32) {
        m.par_iter_mut().for_each(|x| *x *= kept_mag(*x, t));
    }

    pub fn apply_grad(dm: &mut [f32], dms: &[f32], m: &[f32], t: f32) {
        dm.par_iter_mut().zip(dms.par_iter()).zip(m.par_iter()).for_each(|((o, &g), &x)| *o = g * kept_mag(x, t));
    }

    pub fn apply_grad_inplace(g: &mut [f32], m: &[f32], t: f32) {
        g.par_iter_mut().zip(m.par_iter()).for_each(|(g, &x)| *g *= kept_mag(x, t));
    }

    pub fn kept(m: &[f32], t: f32) -> usize {
        m.par_iter().filter(|x| x.abs() > t).count()
    }

    /// dst (n_out, n_in) = w0 + msᵀ, ms (n_in, n_out), in TILE × TILE tiles ([`add_tile_transposed`]): M_s is
    /// read and dst written a cache line (16 floats) of a row at a time. A column walk instead (one entry per
    /// line, at a stride of n_out or n_in floats: 3 or 12 KiB, the same L1 set each time) was ~3% of a SNELLA
    /// step.
    pub fn add_transposed(dst: &mut [f32], w0: &[f32], ms: &[f32], n_in: usize, n_out: usize) {
        dst.par_chunks_mut(TILE * n_in).zip(w0.par_chunks(TILE * n_in)).enumerate().for_each(|(t, (rows, w))| {
            rows.copy_from_slice(w);
            add_tile(rows, ms, t * TILE, n_in, n_out);
        });
    }

    pub fn add_transposed_inplace(dst: &mut [f32], ms: &[f32], n_in: usize, n_out: usize) {
        dst.par_chunks_mut(TILE * n_in).enumerate().for_each(|(t, rows)| add_tile(rows, ms, t * TILE, n_in, n_out));
    }

    /// rows (k, n_in) += ms[:, o0..o0 + k]ᵀ: dst rows o0.. of the merged weight, k ≤ TILE.
    fn add_tile(rows: &mut [f32], ms: &[f32], o0: usize, n_in: usize, n_out: usize) {
        let k = rows.len() / n_in;
        assert!(k <= TILE && rows.len() == k * n_in && ms.len() == n_in * n_out && o0 + k <= n_out);
        let d = rows.as_mut_ptr();
        for i0 in (0..n_in).step_by(TILE) {
            // SAFETY: rows[r·n_in + i0 + c] and ms[(i0 + c)·n_out + o0 + r] for r < k, c < the tile's width,
            // inside both slices (asserted above).
            unsafe {
                add_tile_transposed(
                    d.add(i0),
                    d.add(i0),
                    n_in,
                    ms[i0 * n_out + o0..].as_ptr(),
                    n_out,
                    TILE.min(n_in - i0),
                    k,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::runtime::Device;

    /// Naive reference: sort in f64, the same fp32 rank, lerp in f64.
    fn quantile_f64(m: &[f32], s: f32) -> f64 {
        if m.iter().any(|x| x.is_nan()) {
            return f64::NAN;
        }
        let mut v: Vec<f64> = m.iter().map(|x| x.abs() as f64).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rank = s * (v.len() - 1) as f32;
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        let w = rank as f64 - lo as f64;
        v[lo] + w * (v[hi] - v[lo])
    }

    struct Setup {
        rt: Runtime,
        m: Tensor,
        ms: Tensor,
        t: Tensor,
        sc: SparsifyScratch,
    }

    fn setup(device: Device, n: usize) -> Setup {
        let mut plan = Plan::new();
        let m = plan.f32("m", &[n], Pool::Scratch);
        let ms = plan.f32("ms", &[n], Pool::Scratch);
        let t = plan.f32("t", &[1], Pool::Scratch);
        let sc = SparsifyScratch::plan(&mut plan, "c", n);
        let rt = Runtime::new(Backend::new(device).unwrap(), plan).unwrap();
        Setup { rt, m, ms, t, sc }
    }

    /// (t, M_s, kept) on a device.
    fn run(device: Device, m: &[f32], s: f32) -> (f32, Vec<f32>, usize) {
        let st = setup(device, m.len());
        st.rt.upload(st.m, m).unwrap();
        sparsify_forward(&st.rt, st.ms, st.t, st.m, s, &st.sc).unwrap();
        let t = st.rt.download(st.t).unwrap()[0];
        (t, st.rt.download(st.ms).unwrap(), kept_count(&st.rt, st.m, st.t).unwrap())
    }

    fn check_against_naive(m: &[f32], s: f32) {
        let (t, ms, kept) = run(Device::Cpu, m, s);
        let want = quantile_f64(m, s);
        let scale = m.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        assert!((t as f64 - want).abs() <= 1e-7 * scale.max(1e-30), "n={} s={s}: t {t} vs naive {want}", m.len());
        let kept_want = m.iter().filter(|&&x| x.abs() as f64 > want).count();
        assert_eq!(kept, kept_want, "n={} s={s}: kept", m.len());
        for (i, (&x, &y)) in m.iter().zip(&ms).enumerate() {
            let want = if x.abs() > t { x * x.abs() } else { 0.0 };
            assert_eq!(y, want, "M_s[{i}]");
        }
    }

    /// The candidates' collection (AVX-512 where the host has it, its tail one key at a time) against the
    /// plain loop on its own, on lengths with and without a tail, with a NaN and without.
    #[test]
    fn collect_matches_the_plain_loop() {
        let keys = |out: &[std::mem::MaybeUninit<u32>], len: usize| {
            // SAFETY: both collections wrote out[..len].
            let mut v: Vec<u32> = out[..len].iter().map(|k| unsafe { k.assume_init() }).collect();
            v.sort_unstable();
            v
        };
        for n in [0, 5, 16, 1000, 1007] {
            let mut c: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1001) as f32 / 100.0 - 5.0).collect();
            for nan in [false, true] {
                if nan && n > 3 {
                    c[n - 3] = f32::NAN;
                }
                let (k_a, k_b) = (1.5f32.to_bits(), 3.25f32.to_bits());
                let (mut a, mut b) =
                    (vec![std::mem::MaybeUninit::uninit(); n + 16], vec![std::mem::MaybeUninit::uninit(); n + 16]);
                let (ba, la, na) = cpu::collect(&c, k_a, k_b, &mut a);
                let (bb, lb, nb) = cpu::collect_keys(&c, k_a, k_b, &mut b);
                assert_eq!((ba, la, na), (bb, lb, nb), "n={n} nan={nan}: (below, len, NaN)");
                assert_eq!(keys(&a, la), keys(&b, lb), "n={n} nan={nan}: the keys in the bracket");
            }
        }
    }

    #[test]
    fn quantile_matches_naive_on_random_and_edge_cases() {
        let x = randn(1001, 1, 0.01);
        for s in [0.0, 0.01, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999, 1.0] {
            check_against_naive(&x, s);
        }
        // Long enough for several histograms of the parallel select, with many entries per bin.
        let long = randn(300_001, 2, 1e-3);
        for s in [0.0, 0.5, 0.77, 1.0] {
            check_against_naive(&long, s);
        }
        // A sample that misrepresents M (every sampled entry 1000× larger): the bracket misses the ranks, and
        // the histogram select gives the same values.
        let skewed: Vec<f32> =
            long.iter().enumerate().map(|(i, &x)| if i % 37 == 0 { 1000.0 * x } else { x }).collect();
        // Rows of 768 whose columns differ in scale by up to 64× (a kernel merge's M, whose columns follow the
        // norms of B's rows): the sample still brackets the ranks.
        let columns: Vec<f32> = long.iter().enumerate().map(|(i, &x)| x * (1 << (i % 768 % 7)) as f32).collect();
        for s in [0.1, 0.5, 0.99] {
            let (lo, hi, _) = quantile_rank(long.len(), s);
            assert!(cpu::bracketed(&long, lo, hi).is_some(), "s={s}: the sample brackets the ranks of M");
            assert!(cpu::bracketed(&columns, lo, hi).is_some(), "s={s}: the sample brackets the ranks across columns");
            assert!(cpu::bracketed(&skewed, lo, hi).is_none(), "s={s}: the skewed sample misses");
            check_against_naive(&skewed, s);
            check_against_naive(&columns, s);
        }
        let mut long_nan = long.clone();
        long_nan[123_457] = f32::NAN;
        assert!(run(Device::Cpu, &long_nan, 0.5).0.is_nan());
        // n = 1: t = |x|, nothing kept at any s.
        for s in [0.0, 0.5, 1.0] {
            let (t, ms, kept) = run(Device::Cpu, &[-3.0], s);
            assert_eq!((t, ms[0], kept), (3.0, 0.0, 0));
        }
        // Ties: t lands on the tied value and the tie is dropped as a whole (strict >).
        let ties = [1.0, -1.0, 1.0, 2.0, -2.0, 0.5, 1.0, 3.0];
        for s in [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0] {
            check_against_naive(&ties, s);
        }
        let (t, _, kept) = run(Device::Cpu, &ties, 0.5);
        assert_eq!((t, kept), (1.0, 3));
        // s = 0 drops the minimum, s = 1 everything.
        assert_eq!(run(Device::Cpu, &x, 0.0).2, 1000);
        assert_eq!(run(Device::Cpu, &x, 1.0).2, 0);
        // All equal: nothing survives.
        assert_eq!(run(Device::Cpu, &[0.25; 17], 0.3).2, 0);
        // NaN anywhere: t = NaN, nothing kept.
        let mut y = x.clone();
        y[17] = f32::NAN;
        let (t, _, kept) = run(Device::Cpu, &y, 0.5);
        assert!(t.is_nan() && kept == 0);
    }

    /// The rank is fp32: f32(0.7) * 100 rounds to 70.0 in f32 (lo = hi = 70), while newer torch's f64 rank
    /// f64(f32(0.7)) * 100 = 69.9999988 gives lo = 69 (reference README, surprise 1).
    #[test]
    fn rank_is_computed_in_fp32() {
        let (lo, hi, w) = quantile_rank(101, 0.7);
        assert_eq!((lo, hi, w), (70, 70, 0.0));
        assert_eq!((0.7f32 as f64 * 100.0) as usize, 69);
        let (lo, hi, w) = quantile_rank(4, 0.5);
        assert_eq!((lo, hi, w), (1, 2, 0.5));
        assert_eq!(lerp(1.0, 3.0, 0.5), 2.0);
        assert_eq!(lerp(1.0, 3.0, 0.25), 1.5);
    }

    #[test]
    fn backward_and_add_transposed() {
        // One partial tile; then full tiles with partial ones at both edges.
        for (n_in, n_out) in [(5, 7), (37, 50)] {
            backward_and_add_transposed_case(n_in, n_out);
        }
    }

    fn backward_and_add_transposed_case(n_in: usize, n_out: usize) {
        let n = n_in * n_out;
        let mut plan = Plan::new();
        let m = plan.f32("m", &[n], Pool::Scratch);
        let g = plan.f32("g", &[n], Pool::Scratch);
        let dm = plan.f32("dm", &[n], Pool::Scratch);
        let t = plan.f32("t", &[1], Pool::Scratch);
        let w0 = plan.f32("w0", &[n], Pool::Frozen);
        let dst = plan.f32("dst", &[n], Pool::Scratch);
        let rt = Runtime::cpu(plan);
        let (mv, gv, wv) = (randn(n, 1, 1.0), randn(n, 2, 1.0), randn(n, 3, 1.0));
        rt.upload(m, &mv).unwrap();
        rt.upload(g, &gv).unwrap();
        rt.upload(w0, &wv).unwrap();
        rt.upload(t, &[0.7]).unwrap();
        sparsify_backward(&rt, dm, g, m, t).unwrap();
        let want: Vec<f64> =
            mv.iter().zip(&gv).map(|(&x, &g)| if x.abs() > 0.7 { (g * x.abs()) as f64 } else { 0.0 }).collect();
        assert_close("dM", &rt.download(dm).unwrap(), &want, 0.0);
        sparsify_backward(&rt, g, g, m, t).unwrap(); // in place
        assert_close("dM in place", &rt.download(g).unwrap(), &want, 0.0);

        add_transposed(&rt, dst, w0, m, n_in, n_out).unwrap();
        let want: Vec<f64> = (0..n).map(|e| (wv[e] + mv[(e % n_in) * n_out + e / n_in]) as f64).collect();
        assert_close("W0 + M_s^T", &rt.download(dst).unwrap(), &want, 0.0);
        rt.upload(dst, &wv).unwrap();
        add_transposed(&rt, dst, dst, m, n_in, n_out).unwrap(); // in place
        assert_close("W0 + M_s^T in place", &rt.download(dst).unwrap(), &want, 0.0);
    }
}
