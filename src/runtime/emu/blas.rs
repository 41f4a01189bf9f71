//! cuBLAS on the emulated device: `cublasGemmStridedBatchedEx`, the one GEMM entry point the engine calls, with
//! cuBLAS's contract. Matrices are column-major; A is (m, k) after `transa`, B is (k, n) after `transb`, C is
//! (m, n) with leading dimensions lda, ldb, ldc and batch strides in elements:
//!
//!   C_i = alpha · op(A_i) · op(B_i) + beta · C_i,   i < batch,   X_i = X + i · stride_x
//!
//! Arguments are validated as cuBLAS validates them (`CUBLAS_STATUS_INVALID_VALUE` for a negative size or a
//! leading dimension below the rows of the stored matrix), and every matrix's extent is checked against the
//! tensor its pointer points into. With beta = 0, C is not read (so NaN poison in C does not propagate); with
//! alpha = 0 or k = 0, A and B are not read. TF32 and BF16 compute types round A and B as the tensor cores do
//! (TF32: 10 mantissa bits, to nearest with ties away from zero, as `cvt.rna.tf32.f32`; BF16: 7 bits, to
//! nearest even) and accumulate in fp32. The products themselves run on the `gemm` crate.
//!
//! cuBLAS's use of device memory is modelled: the first GEMM of each compute type loads its kernels, and
//! without a workspace set by the caller the first GEMM allocates cuBLAS's default workspace.
use super::{Emu, CUBLAS_DEFAULT_WORKSPACE, CUBLAS_MODULE_BYTES};
use crate::runtime::cuda::DevPtr;
use crate::runtime::GemmPrecision;

/// What cuBLAS keeps between calls.
#[derive(Default)]
pub(crate) struct BlasState {
    workspace: Option<DevPtr>,
    default_workspace: bool,
    loaded: Vec<GemmPrecision>,
}

/// The arguments of one cublasGemmStridedBatchedEx call (column-major, as cuBLAS takes them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub a: DevPtr,
    pub lda: i32,
    pub stride_a: i64,
    pub b: DevPtr,
    pub ldb: i32,
    pub stride_b: i64,
    pub beta: f32,
    pub c: DevPtr,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
    pub compute: GemmPrecision,
}

impl Gemm {
    /// C (m, n) = A (m, k) · B (k, n), column-major and dense, one product, no transposes, alpha 1, beta 0.
    pub(crate) fn plain(m: i32, n: i32, k: i32, a: DevPtr, b: DevPtr, c: DevPtr, compute: GemmPrecision) -> Gemm {
        Gemm {
            transa: false,
            transb: false,
            m,
            n,
            k,
            alpha: 1.0,
            a,
            lda: m.max(1),
            stride_a: 0,
            b,
            ldb: k.max(1),
            stride_b: 0,
            beta: 0.0,
            c,
            ldc: m.max(1),
            stride_c: 0,
            batch: 1,
            compute,
        }
    }
}

/// cublasSetWorkspace: cuBLAS requires 256-byte alignment.
pub(crate) fn set_workspace(emu: &Emu, ws: DevPtr) -> Result<(), String> {
    if !ws.addr.is_multiple_of(256) {
        return Err(format!("CUBLAS_STATUS_INVALID_VALUE: workspace {:#x} is not 256-byte aligned", ws.addr));
    }
    emu.memory().check(ws.addr, ws.bytes).map_err(|e| format!("CUBLAS_STATUS_INVALID_VALUE: workspace: {e}"))?;
    emu.blas.lock().unwrap_or_else(|p| p.into_inner()).workspace = Some(ws);
    Ok(())
}

/// Loads the kernels of `compute` (and the default workspace if none is set) if this is its first GEMM.
pub(crate) fn load(emu: &Emu, compute: GemmPrecision) -> Result<(), String> {
    let mut st = emu.blas.lock().unwrap_or_else(|p| p.into_inner());
    if !st.loaded.contains(&compute) {
        emu.reserve(CUBLAS_MODULE_BYTES).map_err(|e| format!("CUBLAS_STATUS_ALLOC_FAILED loading kernels: {e}"))?;
        st.loaded.push(compute);
    }
    if st.workspace.is_none() && !st.default_workspace {
        emu.reserve(CUBLAS_DEFAULT_WORKSPACE).map_err(|e| format!("CUBLAS_STATUS_ALLOC_FAILED (workspace): {e}"))?;
        st.default_workspace = true;
    }
    Ok(())
}

/// Elements a stored matrix of `rows` x `cols` with leading dimension `ld` spans, over `batch` strided copies.
fn span(rows: i64, cols: i64, ld: i64, stride: i64, batch: i64) -> i64 {
    if rows == 0 || cols == 0 || batch == 0 {
        0
    } else {
        (batch - 1) * stride + (cols - 1) * ld + rows
    }
}

/// cublasGemmStridedBatchedEx with fp32 A, B, C. Err is cuBLAS's status and why.
pub(crate) fn gemm_strided_batched(emu: &Emu, g: &Gemm) -> Result<(), String> {
    let invalid = |why: String| Err(format!("CUBLAS_STATUS_INVALID_VALUE: {why}"));
    if g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 {
        return invalid(format!("negative size m {} n {} k {} batch {}", g.m, g.n, g.k, g.batch));
    }
    let (rows_a, cols_a) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
    let (rows_b, cols_b) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
    if g.lda < rows_a.max(1) {
        return invalid(format!("lda {} < max(1, {rows_a}), the rows of the stored A", g.lda));
    }
    if g.ldb < rows_b.max(1) {
        return invalid(format!("ldb {} < max(1, {rows_b}), the rows of the stored B", g.ldb));
    }
    if g.ldc < g.m.max(1) {
        return invalid(format!("ldc {} < max(1, m = {})", g.ldc, g.m));
    }
    if g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0 {
        return invalid("a negative batch stride".into());
    }
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    load(emu, g.compute)?;
    let batch = g.batch as i64;
    let reads_ab = g.k > 0 && g.alpha != 0.0;
    let extent = |name: &str, p: DevPtr, elems: i64| -> Result<*mut f32, String> {
        emu.host(name, p, elems as usize * 4)
            .map(|h| h as *mut f32)
            .map_err(|e| format!("CUBLAS_STATUS_EXECUTION_FAILED: {e}"))
    };
    let a = if reads_ab {
        extent("A", g.a, span(rows_a as i64, cols_a as i64, g.lda as i64, g.stride_a, batch))?
    } else {
        std::ptr::null_mut()
    };
    let b = if reads_ab {
        extent("B", g.b, span(rows_b as i64, cols_b as i64, g.ldb as i64, g.stride_b, batch))?
    } else {
        std::ptr::null_mut()
    };
    let c = extent("C", g.c, span(g.m as i64, g.n as i64, g.ldc as i64, g.stride_c, batch))?;
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as isize, g.ldb as isize, g.ldc as isize);
    // Column and row strides of op(A) (m, k) and op(B) (k, n) in the stored column-major matrices.
    let (a_cs, a_rs) = if g.transa { (1, lda) } else { (lda, 1) };
    let (b_cs, b_rs) = if g.transb { (1, ldb) } else { (ldb, 1) };
    let round = match g.compute {
        GemmPrecision::Fp32 => None,
        GemmPrecision::Tf32 => Some(round_tf32 as fn(f32) -> f32),
        GemmPrecision::Bf16 => Some(round_bf16 as fn(f32) -> f32),
    };
    let par = if m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    for i in 0..batch as usize {
        // SAFETY: every pointer below stays inside the extents checked above.
        unsafe {
            let ci = c.offset(i as isize * g.stride_c as isize);
            if !reads_ab {
                // C = beta·C (beta = 0 writes zeros without reading C).
                for j in 0..n {
                    for r in 0..m {
                        let p = ci.offset(r as isize + j as isize * ldc);
                        *p = if g.beta == 0.0 { 0.0 } else { g.beta * *p };
                    }
                }
                continue;
            }
            let (ai, bi) = (a.offset(i as isize * g.stride_a as isize), b.offset(i as isize * g.stride_b as isize));
            let (ta, tb);
            let (ap, a_cs, a_rs, bp, b_cs, b_rs) = match round {
                None => (ai as *const f32, a_cs, a_rs, bi as *const f32, b_cs, b_rs),
                Some(f) => {
                    // Rounded copies of op(A) and op(B), column-major and dense.
                    ta = (0..m * k)
                        .map(|e| f(*ai.offset((e % m) as isize * a_rs + (e / m) as isize * a_cs)))
                        .collect::<Vec<f32>>();
                    tb = (0..k * n)
                        .map(|e| f(*bi.offset((e % k) as isize * b_rs + (e / k) as isize * b_cs)))
                        .collect::<Vec<f32>>();
                    (ta.as_ptr(), m as isize, 1, tb.as_ptr(), k as isize, 1)
                }
            };
            // gemm computes dst = alpha·dst + beta·lhs·rhs (its names are the other way round from BLAS).
            gemm::gemm(
                m,
                n,
                k,
                ci,
                ldc,
                1,
                g.beta != 0.0,
                ap,
                a_cs,
                a_rs,
                bp,
                b_cs,
                b_rs,
                g.beta,
                g.alpha,
                false,
                false,
                false,
                par,
            );
        }
    }
    Ok(())
}

/// fp32 → TF32 (10 mantissa bits), to nearest with ties away from zero; NaN and infinities unchanged.
pub(crate) fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xFFFF_E000)
}

/// fp32 → bf16 (7 mantissa bits), to nearest even, as `__float2bfloat16_rn`, kept in an f32.
pub(crate) fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emu() -> Emu {
        Emu::new(Some(1 << 30)).unwrap()
    }

    /// Column-major reference in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for j in 0..n {
            for i in 0..m {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                    let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                    s += av as f64 * bv as f64;
                }
                c[i + j * m] = s;
            }
        }
        c
    }

    fn upload(e: &Emu, v: &[f32]) -> DevPtr {
        let p = e.alloc(v.len() * 4).unwrap();
        e.upload(p, bytemuck::cast_slice(v)).unwrap();
        p
    }

    fn download(e: &Emu, p: DevPtr, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        e.download(bytemuck::cast_slice_mut(&mut v), p).unwrap();
        v
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn column_major_with_transposes_leading_dimensions_and_batches() {
        let e = emu();
        let (m, n, k, batch) = (5usize, 4usize, 3usize, 2usize);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (ra, ca) = if ta { (k, m) } else { (m, k) };
            let (rb, cb) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (ra + 2, rb + 1, m + 3);
            let (sa, sb, sc) = (lda * ca + 7, ldb * cb + 5, ldc * n + 1);
            let (av, bv) = (vals(sa * batch, 1), vals(sb * batch, 2));
            let c0 = vals(sc * batch, 3);
            let (a, b, c) = (upload(&e, &av), upload(&e, &bv), upload(&e, &c0));
            let g = Gemm {
                transa: ta,
                transb: tb,
                m: m as i32,
                n: n as i32,
                k: k as i32,
                alpha: 0.5,
                a,
                lda: lda as i32,
                stride_a: sa as i64,
                b,
                ldb: ldb as i32,
                stride_b: sb as i64,
                beta: 2.0,
                c,
                ldc: ldc as i32,
                stride_c: sc as i64,
                batch: batch as i32,
                compute: GemmPrecision::Fp32,
            };
            gemm_strided_batched(&e, &g).unwrap();
            let got = download(&e, c, sc * batch);
            for bi in 0..batch {
                let want = reference(ta, tb, m, n, k, &av[bi * sa..], lda, &bv[bi * sb..], ldb);
                for j in 0..n {
                    for i in 0..m {
                        let at = bi * sc + i + j * ldc;
                        let w = 0.5 * want[i + j * m] + 2.0 * c0[at] as f64;
                        assert!((got[at] as f64 - w).abs() < 1e-5, "ta {ta} tb {tb} batch {bi} ({i},{j})");
                    }
                }
                // Rows between m and ldc are C's padding: untouched.
                for j in 0..n {
                    for i in m..ldc {
                        let at = bi * sc + i + j * ldc;
                        assert_eq!(got[at], c0[at], "padding of C changed at ({i},{j})");
                    }
                }
            }
        }
    }

    #[test]
    fn beta_zero_does_not_read_c_and_bad_arguments_are_cublas_errors() {
        let e = emu();
        let (a, b) = (upload(&e, &[1.0, 2.0]), upload(&e, &[3.0, 4.0]));
        let c = upload(&e, &[f32::NAN]);
        let mut g = Gemm::plain(1, 1, 2, a, b, c, GemmPrecision::Fp32);
        gemm_strided_batched(&e, &g).unwrap();
        assert_eq!(download(&e, c, 1), [11.0]);
        g.ldb = 1; // below the 2 rows of the stored B
        let err = gemm_strided_batched(&e, &g).unwrap_err();
        assert!(err.contains("CUBLAS_STATUS_INVALID_VALUE") && err.contains("ldb"), "{err}");
        g.ldb = 2;
        g.m = -1;
        assert!(gemm_strided_batched(&e, &g).unwrap_err().contains("INVALID_VALUE"));
        g.m = 1;
        g.batch = 2;
        g.stride_a = 2; // the second A runs past its 2-element tensor
        let err = gemm_strided_batched(&e, &g).unwrap_err();
        assert!(err.contains("A") && err.contains("past the end"), "{err}");
    }

    #[test]
    fn tf32_and_bf16_round_the_inputs() {
        assert_eq!(round_tf32(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10), "a tie rounds away from zero");
        assert_eq!(round_tf32(1.0 + 2f32.powi(-12)), 1.0);
        assert_eq!(round_tf32(-1.0 - 2f32.powi(-11)), -1.0 - 2f32.powi(-10));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0, "a tie rounds to even");
        let e = emu();
        let x = 1.0 + 2f32.powi(-12);
        let (a, b, c) = (upload(&e, &[x]), upload(&e, &[1.0]), upload(&e, &[0.0]));
        let mut g = Gemm::plain(1, 1, 1, a, b, c, GemmPrecision::Fp32);
        gemm_strided_batched(&e, &g).unwrap();
        assert_eq!(download(&e, c, 1), [x]);
        g.compute = GemmPrecision::Tf32;
        gemm_strided_batched(&e, &g).unwrap();
        assert_eq!(download(&e, c, 1), [1.0]);
    }

    #[test]
    fn first_gemm_of_a_compute_type_loads_its_kernels() {
        let e = emu();
        let ws = e.alloc(1 << 20).unwrap();
        set_workspace(&e, ws).unwrap();
        let free0 = e.mem_info().0;
        load(&e, GemmPrecision::Fp32).unwrap();
        assert_eq!(free0 - e.mem_info().0, CUBLAS_MODULE_BYTES);
        load(&e, GemmPrecision::Fp32).unwrap();
        assert_eq!(free0 - e.mem_info().0, CUBLAS_MODULE_BYTES, "loaded once");
    }
}
