//! Deterministic randomness: one SplitMix64 and the seeded helpers built on it. Streams are fixed by this
//! crate, not by `rand`'s version, so a seed means the same data order, augmentation, subsets, random
//! backbones and GPS masks on every build.
use rand::{Rng, RngCore, SeedableRng};

/// SplitMix64's increment (2⁶⁴/φ, odd): the state advances by it, and seeds are spread with it.
pub(crate) const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective 64-bit mix (also the hash of the dropout masks, `ops::dropout`, whose
/// CUDA twin is `snella_mix` in cuda/dropout.cu).
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The SplitMix64 output for state `z`: the finaliser of `z + γ`.
pub(crate) fn splitmix64(z: u64) -> u64 {
    mix(z.wrapping_add(GOLDEN_GAMMA))
}

/// The seed of one example's RNG: a hash of `(seed, epoch, index)` only, so draws do not depend on the order
/// or the thread that makes them.
pub(crate) fn example_seed(seed: u64, epoch: u64, index: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)
}

/// A small, fast, seedable RNG (SplitMix64, Vigna's reference stream).
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }
}

impl RngCore for SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        let z = splitmix64(self.state);
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        z
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl SeedableRng for SplitMix64 {
    type Seed = [u8; 8];
    fn from_seed(seed: [u8; 8]) -> SplitMix64 {
        SplitMix64::new(u64::from_le_bytes(seed))
    }
    fn seed_from_u64(state: u64) -> SplitMix64 {
        SplitMix64::new(state)
    }
}

/// Uniform in [0, 1) from the top 53 bits of one draw.
pub(crate) fn unit_f64(rng: &mut (impl RngCore + ?Sized)) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
pub(crate) fn permutation(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        p.swap(i, j);
    }
    p
}

/// `n` draws of N(0, std²) truncated to [-2, 2] (timm's `trunc_normal_(std=std)`: the cut is absolute), by
/// Box–Muller from `rng`. Used for the head re-initialisation and the trainer's random backbones.
pub(crate) fn trunc_normal(rng: &mut impl RngCore, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Box–Muller on (0, 1] × [0, 1).
        let u1 = 1.0 - unit_f64(rng);
        let u2 = unit_f64(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [r * (std::f64::consts::TAU * u2).cos(), r * (std::f64::consts::TAU * u2).sin()] {
            let x = z * std;
            if out.len() < n && (-2.0..=2.0).contains(&x) {
                out.push(x as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_stable() {
        // Reference values of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_ne!(example_seed(0, 0, 1), example_seed(0, 1, 0));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(100, &mut SplitMix64::new(5));
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        p.sort_unstable();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
