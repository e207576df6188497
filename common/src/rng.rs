//! Portable, keyed random streams.
//!
//! Every random number in a run comes from a [`ChaCha8Rng`] whose seed is derived from a *key*
//! (run seed, purpose, step, index, ...) by [`derive_seed`]. Nothing reads a global RNG, so a task's data
//! is the same on every machine and independent of which worker computes it, or when.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: a bijective 64-bit mixer with good avalanche, used to fold keys into seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Folds a sequence of key parts into one 64-bit seed. Order matters; different lengths differ.
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut h = mix(parts.len() as u64);
    for &p in parts {
        h = mix(h ^ mix(p));
    }
    h
}

/// A ChaCha8 stream keyed by `parts`.
pub fn keyed_rng(parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(parts))
}

/// Uniform in `[lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// Standard normal by Box–Muller (written out so the stream is fixed by this file, not by a crate version).
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // 1 - u keeps the argument of ln in (0, 1].
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `k` distinct indices from `0..n` (partial Fisher–Yates), in draw order. Requires `k <= n`.
pub fn choose_distinct(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<usize> {
    assert!(k <= n, "choose_distinct: k = {k} > n = {n}");
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = rng.gen_range(i..n);
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_part_and_order() {
        let a = derive_seed(&[1, 2, 3]);
        assert_ne!(a, derive_seed(&[1, 2, 4]));
        assert_ne!(a, derive_seed(&[3, 2, 1]));
        assert_ne!(a, derive_seed(&[1, 2, 3, 0]));
        assert_eq!(a, derive_seed(&[1, 2, 3]));
    }

    #[test]
    fn normal_has_unit_moments() {
        let mut rng = keyed_rng(&[7]);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn choose_distinct_is_distinct_and_in_range() {
        let mut rng = keyed_rng(&[9]);
        for _ in 0..100 {
            let mut v = choose_distinct(&mut rng, 20, 7);
            assert!(v.iter().all(|&i| i < 20));
            v.sort();
            v.dedup();
            assert_eq!(v.len(), 7);
        }
    }
}
