//! The ops of the engine. Each file holds one op family: the public function that dispatches on the
//! backend, its `cpu` half (the readable reference) and the launch of its CUDA twin in `cuda/<op>.cu`.
pub mod adamw;
pub mod add;
pub mod attention;
pub mod colsum;
pub(crate) mod convert;
pub mod dropout;
pub mod embed;
pub mod gelu;
pub mod importance;
pub mod kmerge;
pub(crate) mod lanes;
pub mod layernorm;
pub mod loss;
pub mod mask;
pub mod matmul;
pub mod softmax;
pub mod sparsify;

pub use matmul::{matmul, Matmul};

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for op tests: deterministic random inputs and a closeness check that names the tensor.
    use rand::{Rng, SeedableRng};

    pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.sample::<f32, _>(rand_distr::StandardNormal) * scale).collect()
    }

    pub fn libm_erf(x: f64) -> f64 {
        libm::erf(x)
    }

    /// max|got - want| / max|want| <= rel, else panics naming the tensor and the error.
    pub fn assert_close(name: &str, got: &[f32], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs())).max(1e-30);
        let (mut worst, mut at) = (0f64, 0);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let d = (g as f64 - w).abs();
            if d.is_nan() || d > worst {
                worst = if d.is_nan() { f64::INFINITY } else { d };
                at = i;
            }
        }
        assert!(
            worst / scale <= rel,
            "{name}: max |diff| / max |ref| = {:.3e} > {rel:.1e} (at {at}: got {}, want {})",
            worst / scale,
            got[at],
            want[at]
        );
    }
}
