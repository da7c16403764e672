//! The portable dot product the decoder's attention and the GPTQ/AWQ solvers share: eight
//! independent sums, which the compiler turns into SIMD lanes (one serial sum could not be
//! reordered, so it would not vectorize).

use std::iter::Sum;
use std::ops::{Add, Mul};

/// Σ a[i]·b[i] over the shorter of the two slices, for f32 or f64.
#[inline]
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + Add<Output = T> + Mul<Output = T> + Sum,
{
    let mut acc = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_sum_in_both_precisions() {
        let a: Vec<f64> = (0..37).map(|i| i as f64 * 0.25 - 3.0).collect();
        let b: Vec<f64> = (0..37).map(|i| (i % 5) as f64 - 1.5).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-9);
        let (af, bf): (Vec<f32>, Vec<f32>) = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x as f32, y as f32))
            .unzip();
        assert!((dot(&af, &bf) as f64 - plain).abs() < 1e-3);
    }
}
