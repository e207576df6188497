//! Area-averaging resize of any source size to [`SIDE`]×[`SIDE`].
//!
//! The generic form of [`crate::omniglot::resize_area`] (which is the 105×105 case): along an axis of `S`
//! source pixels, output pixel `o` covers the source interval `[o·S/SIDE, (o+1)·S/SIDE)` and its value is the
//! mean of the source over that interval, each source pixel weighted by the fraction of it inside. On a grid of
//! 1/SIDE of a source pixel, output `o` is `[o·S, (o+1)·S)` and source pixel `j` is `[j·SIDE, (j+1)·SIDE)`, so
//! every weight is an integer and each axis's weights sum to `S`. Shrinking this is OpenCV's `INTER_AREA`;
//! enlarging (a side below 28) it gives each output the overlap-weighted mean of the one or two source pixels
//! under it. The sums are taken in f64 (exact for 0/1 images of any size this module accepts), so a 105×105
//! image resizes to within one f32 rounding of `omniglot::resize_area`.

use crate::omniglot::{PIXELS, SIDE};

/// Where one output pixel lies along one axis: the first source index it overlaps and the overlap with
/// each source index from there on, in units of 1/[`SIDE`] of a source pixel.
struct Taps {
    start: usize,
    weights: Vec<f64>,
}

/// The [`SIDE`] output pixels' taps along an axis of `source` pixels (`source ≥ 1`).
fn axis_taps(source: usize) -> Vec<Taps> {
    (0..SIDE)
        .map(|o| {
            let lo = o * source;
            let hi = lo + source;
            let (first, last) = (lo / SIDE, (hi - 1) / SIDE);
            let weights = (first..=last)
                .map(|j| {
                    let (s_lo, s_hi) = (j * SIDE, (j + 1) * SIDE);
                    (hi.min(s_hi) - lo.max(s_lo)) as f64
                })
                .collect();
            Taps { start: first, weights }
        })
        .collect()
}

/// Resizes the `width`×`height` image whose pixel `(x, y)` is `pixel(x, y)` to [`SIDE`]×[`SIDE`] by area
/// averaging; row-major, [`PIXELS`] values. `pixel` is called only with `x < width`, `y < height` (about
/// twice per source pixel at most when shrinking). An empty image (a zero side) gives all zeros.
pub fn resize_area(width: usize, height: usize, pixel: impl Fn(usize, usize) -> f64) -> Vec<f32> {
    let mut out = vec![0f32; PIXELS];
    if width == 0 || height == 0 {
        return out;
    }
    let (xs, ys) = (axis_taps(width), axis_taps(height));
    let norm = width as f64 * height as f64;
    let mut row = [0f64; SIDE];
    for (ty, out_row) in ys.iter().zip(out.chunks_exact_mut(SIDE)) {
        let mut acc = [0f64; SIDE];
        for (k, &wy) in ty.weights.iter().enumerate() {
            let y = ty.start + k;
            // Horizontal pass over source row y: the SIDE weighted column sums.
            for (tx, r) in xs.iter().zip(row.iter_mut()) {
                *r = tx.weights.iter().enumerate().map(|(j, &wx)| wx * pixel(tx.start + j, y)).sum();
            }
            for (a, &r) in acc.iter_mut().zip(&row) {
                *a += wy * r;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = (a / norm) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward reference: integrate each output square's overlap with every source pixel.
    fn reference(src: &[f64], width: usize, height: usize) -> Vec<f64> {
        let (sx, sy) = (width as f64 / SIDE as f64, height as f64 / SIDE as f64);
        let overlap = |a0: f64, a1: f64, b0: f64, b1: f64| (a1.min(b1) - a0.max(b0)).max(0.0);
        let mut out = vec![0.0; PIXELS];
        for oy in 0..SIDE {
            for ox in 0..SIDE {
                let (y0, y1) = (oy as f64 * sy, (oy + 1) as f64 * sy);
                let (x0, x1) = (ox as f64 * sx, (ox + 1) as f64 * sx);
                let mut sum = 0.0;
                for y in 0..height {
                    for x in 0..width {
                        let (fy, fx) = (y as f64, x as f64);
                        sum += src[y * width + x] * overlap(y0, y1, fy, fy + 1.0) * overlap(x0, x1, fx, fx + 1.0);
                    }
                }
                out[oy * SIDE + ox] = sum / (sx * sy);
            }
        }
        out
    }

    /// A tiny deterministic generator (xorshift64*).
    fn noise(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    #[test]
    fn generic_resize_matches_the_integrated_reference_for_many_sizes() {
        for (i, &(w, h)) in
            [(105, 105), (37, 91), (28, 28), (56, 84), (13, 5), (1, 1), (300, 29), (27, 400)].iter().enumerate()
        {
            let src = noise(0x5EED + i as u64, w * h);
            let fast = resize_area(w, h, |x, y| src[y * w + x]);
            let slow = reference(&src, w, h);
            let worst = fast.iter().zip(&slow).map(|(&f, &s)| (f as f64 - s).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-6, "{w}×{h}: max abs diff {worst}");
        }
    }

    #[test]
    fn identity_and_block_means_are_exact() {
        let src = noise(7, PIXELS);
        let same = resize_area(SIDE, SIDE, |x, y| src[y * SIDE + x]);
        assert!(same.iter().zip(&src).all(|(&a, &b)| a == b as f32), "28×28 is the identity");
        // 56×56 → 28×28: each output is the mean of a 2×2 block.
        let big = noise(8, 4 * PIXELS);
        let half = resize_area(2 * SIDE, 2 * SIDE, |x, y| big[y * 2 * SIDE + x]);
        for (o, &v) in half.iter().enumerate() {
            let (oy, ox) = (o / SIDE, o % SIDE);
            let at = |y: usize, x: usize| big[y * 2 * SIDE + x];
            let mean =
                (at(2 * oy, 2 * ox) + at(2 * oy, 2 * ox + 1) + at(2 * oy + 1, 2 * ox) + at(2 * oy + 1, 2 * ox + 1))
                    / 4.0;
            assert!((v as f64 - mean).abs() < 1e-7);
        }
        assert!(resize_area(0, 5, |_, _| 1.0).iter().all(|&v| v == 0.0));
        assert!(resize_area(3, 7, |_, _| 1.0).iter().all(|&v| (v - 1.0).abs() < 1e-7));
    }

    #[test]
    fn agrees_with_omniglot_resize_on_105_pixel_binary_images() {
        for trial in 0..8u64 {
            let density = trial as f64 / 7.0;
            let ink: Vec<bool> = noise(trial + 100, 105 * 105).iter().map(|&u| u < density).collect();
            let exact = crate::omniglot::resize_area(&ink);
            let generic = resize_area(105, 105, |x, y| f64::from(u8::from(ink[y * 105 + x])));
            let worst = exact.iter().zip(&generic).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-6, "trial {trial}: max abs diff {worst}");
        }
    }
}
