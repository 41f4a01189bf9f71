//! Matrix products, row-major: C = alpha·op(A)·op(B) (+ C when accumulating), optionally strided batched.
//! CPU: the `gemm` crate. CUDA: cuBLAS, exact fp32 SGEMM unless TF32/bf16 is asked for explicitly.
use crate::error::{Error, Result};
use crate::runtime::{Backend, GemmPrecision, Runtime, Tensor};

/// Shape of one product: op(A) is (m, k), op(B) is (k, n), C is (m, n); `batch` contiguous products
/// (A, B, C advance by m·k, k·n, m·n elements, or not at all when the stride is 0 = broadcast).
#[derive(Clone, Copy, Debug)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored (k, m) and used transposed.
    pub ta: bool,
    /// B is stored (n, k) and used transposed.
    pub tb: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    /// C += alpha·op(A)·op(B) instead of C = alpha·op(A)·op(B).
    pub accumulate: bool,
    pub alpha: f32,
    /// Row strides (elements) of the stored A, B and C; 0 means dense (the stored row length).
    /// Lets a product read or write a column block, e.g. the q slice of a fused (BT, 3D) qkv buffer.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl Matmul {
    /// One product C (m,n) = op(A) · op(B).
    pub fn new(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Matmul {
        Matmul {
            m,
            n,
            k,
            ta,
            tb,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            accumulate: false,
            alpha: 1.0,
            lda: 0,
            ldb: 0,
            ldc: 0,
        }
    }
    /// Row strides of the stored A, B, C (0 = dense); only for unbatched products.
    pub fn ld(mut self, lda: usize, ldb: usize, ldc: usize) -> Matmul {
        self.lda = lda;
        self.ldb = ldb;
        self.ldc = ldc;
        self
    }
    /// Dense row strides of the stored A, B, C.
    fn lds(&self) -> (usize, usize, usize) {
        let a = if self.ta { self.m } else { self.k };
        let b = if self.tb { self.k } else { self.n };
        let or = |x: usize, d: usize| if x == 0 { d } else { x };
        (or(self.lda, a), or(self.ldb, b), or(self.ldc, self.n))
    }
    pub fn batched(mut self, batch: usize) -> Matmul {
        self.batch = batch;
        self
    }
    pub fn accumulate(mut self) -> Matmul {
        self.accumulate = true;
        self
    }
    pub fn alpha(mut self, alpha: f32) -> Matmul {
        self.alpha = alpha;
        self
    }
    /// The same B for every product of the batch.
    pub fn broadcast_b(mut self) -> Matmul {
        self.stride_b = 0;
        self
    }
}

/// C = alpha·op(A)·op(B) (+ C), see [`Matmul`].                       A, B, C: shapes as in `spec`
pub fn matmul(rt: &Runtime, c: Tensor, a: Tensor, b: Tensor, spec: Matmul) -> Result<()> {
    let Matmul { m, n, k, ta, tb, batch, stride_a, stride_b, .. } = spec;
    let (lda, ldb, ldc) = spec.lds();
    assert!(batch == 1 || (spec.lda == 0 && spec.ldb == 0 && spec.ldc == 0), "matmul: row strides only for batch 1");
    let rows_a = if ta { k } else { m };
    let rows_b = if tb { n } else { k };
    assert!(
        a.numel >= stride_a * (batch - 1) + (rows_a - 1) * lda + m * k / rows_a,
        "matmul: A has {} elements, too few for {batch}x{m}x{k}",
        a.numel
    );
    assert!(
        b.numel >= stride_b * (batch - 1) + (rows_b - 1) * ldb + k * n / rows_b,
        "matmul: B has {} elements, too few for {batch}x{k}x{n}",
        b.numel
    );
    assert!(
        c.numel >= batch * m * n - m * n + (m - 1) * ldc + n,
        "matmul: C has {} elements, too few for {batch}x{m}x{n}",
        c.numel
    );
    match &rt.backend {
        Backend::Cpu => cpu::matmul(rt.f32_mut(c), rt.f32(a), rt.f32(b), spec),
        Backend::Cuda(cu) => cuda::matmul(cu, rt.gemm_precision(), rt.ptr(c), rt.ptr(a), rt.ptr(b), spec)?,
    }
    Ok(())
}

pub(crate) mod cpu {
    use super::Matmul;
    use gemm::Parallelism;

    pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: Matmul) {
        let Matmul { m, n, k, batch, stride_a, stride_b, .. } = s;
        // Small products of a batch (the attention's per-head ones) run one per thread: splitting each across
        // the threads would cost more in synchronisation than it saves.
        if batch > 1 && m * n * k < 1 << 22 && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            return c[..batch * m * n].par_chunks_mut(m * n).enumerate().for_each(|(i, cp)| {
                let (ap, bp) = (&a[i * stride_a..], &b[i * stride_b..]);
                product(cp, ap, bp, s, Parallelism::None);
            });
        }
        let par = if m * n * k >= 1 << 18 { Parallelism::Rayon(0) } else { Parallelism::None };
        for i in 0..batch {
            let (ap, bp) = (&a[i * stride_a..], &b[i * stride_b..]);
            product(&mut c[i * m * n..], ap, bp, s, par);
        }
    }

    /// One product of the batch: c (m, n) = alpha·op(a)·op(b) (+ c).
    fn product(cp: &mut [f32], ap: &[f32], bp: &[f32], s: Matmul, par: Parallelism) {
        let Matmul { m, n, k, ta, tb, accumulate, alpha, .. } = s;
        let (lda, ldb, ldc) = s.lds();
        // Row-major (rs, cs) strides of op(A) (m,k) and op(B) (k,n).
        let (a_rs, a_cs) = if ta { (1, lda as isize) } else { (lda as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, ldb as isize) } else { (ldb as isize, 1) };
        // gemm computes dst = alpha·dst + beta·lhs·rhs (its names are the other way round).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cp.as_mut_ptr(),
                1,
                ldc as isize,
                accumulate,
                ap.as_ptr(),
                a_cs,
                a_rs,
                bp.as_ptr(),
                b_cs,
                b_rs,
                1.0,
                alpha,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// The naive triple loop in f64: the reference the tests hold both backends to.
    #[cfg(test)]
    pub fn matmul_f64(a: &[f32], b: &[f32], s: Matmul) -> Vec<f64> {
        let Matmul { m, n, k, ta, tb, batch, stride_a, stride_b, alpha, .. } = s;
        let (lda, ldb, _) = s.lds();
        let mut c = vec![0f64; batch * m * n];
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f64;
                    for p in 0..k {
                        let av = if ta { a[bi * stride_a + p * lda + i] } else { a[bi * stride_a + i * lda + p] };
                        let bv = if tb { b[bi * stride_b + j * ldb + p] } else { b[bi * stride_b + p * ldb + j] };
                        acc += av as f64 * bv as f64;
                    }
                    c[bi * m * n + i * n + j] = alpha as f64 * acc;
                }
            }
        }
        c
    }
}

pub(crate) mod cuda {
    use super::*;
    use crate::runtime::cuda::Gemm;
    use crate::runtime::{Cuda, DevPtr};

    pub fn matmul(cu: &Cuda, prec: GemmPrecision, c: DevPtr, a: DevPtr, b: DevPtr, s: Matmul) -> Result<()> {
        let Matmul { m, n, k, ta, tb, batch, stride_a, stride_b, accumulate, alpha, .. } = s;
        let (lda, ldb, ldc) = s.lds();
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| Error::invalid("matmul", format!("{what} = {x} exceeds cuBLAS's int")))
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands. A row-major X
        // (r, c) with row stride ld is the column-major Xᵀ (c, r) with the same ld, so B (k,n) / Bᵀ-stored
        // (n,k) enter as op(B)ᵀ with OP_N / OP_T and ld = ldb (>= n / k), A likewise with lda (>= k / m),
        // C as Cᵀ (n, m) with ldc >= n; stride 0 reuses one B for the whole batch.
        cu.gemm(&Gemm {
            transa: tb,
            transb: ta,
            m: int(n, "n")?,
            n: int(m, "m")?,
            k: int(k, "k")?,
            alpha,
            a: b,
            lda: int(ldb, "ldb")?,
            stride_a: stride_b as i64,
            b: a,
            ldb: int(lda, "lda")?,
            stride_b: stride_a as i64,
            beta: if accumulate { 1.0 } else { 0.0 },
            c,
            ldc: int(ldc, "ldc")?,
            stride_c: (m * n) as i64,
            batch: int(batch, "batch")?,
            compute: prec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;

    #[test]
    fn every_transpose_and_batch_matches_f64() {
        for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
            for &acc in &[false, true] {
                let s = Matmul::new(13, 7, 19, ta, tb).batched(3).alpha(0.5);
                let s = if acc { s.accumulate() } else { s };
                let a = randn(3 * 13 * 19, 1, 1.0);
                let b = randn(3 * 19 * 7, 2, 1.0);
                let c0 = randn(3 * 13 * 7, 3, 1.0);
                let mut c = c0.clone();
                cpu::matmul(&mut c, &a, &b, s);
                let mut want = cpu::matmul_f64(&a, &b, s);
                if acc {
                    want.iter_mut().zip(&c0).for_each(|(w, &c)| *w += c as f64);
                }
                assert_close(&format!("matmul ta={ta} tb={tb} acc={acc}"), &c, &want, 1e-6);
            }
        }
    }

    #[test]
    fn row_strides_read_and_write_column_blocks() {
        // A is the middle column block (width 6) of a (4, 18) buffer; C goes to the last 5 columns of (4, 9).
        let s = Matmul::new(4, 5, 6, false, false).ld(18, 0, 9);
        let abuf = randn(4 * 18, 7, 1.0);
        let b = randn(30, 8, 1.0);
        let mut cbuf = [0f32; 4 * 9];
        cpu::matmul(&mut cbuf[4..], &abuf[6..], &b, s);
        let a: Vec<f32> = (0..4).flat_map(|r| abuf[r * 18 + 6..r * 18 + 12].to_vec()).collect();
        let want = cpu::matmul_f64(&a, &b, Matmul::new(4, 5, 6, false, false));
        let got: Vec<f32> = (0..4).flat_map(|r| cbuf[r * 9 + 4..r * 9 + 9].to_vec()).collect();
        assert_close("matmul strided", &got, &want, 1e-6);
    }

    #[test]
    fn broadcast_b() {
        let s = Matmul::new(4, 5, 6, false, true).batched(2).broadcast_b();
        let a = randn(2 * 24, 4, 1.0);
        let b = randn(30, 5, 1.0);
        let mut c = vec![0f32; 40];
        cpu::matmul(&mut c, &a, &b, s);
        assert_close("matmul broadcast", &c, &cpu::matmul_f64(&a, &b, s), 1e-6);
    }
}
