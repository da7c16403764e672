//! Softmax over one row of logits, fast enough to run on every scored token of an evaluation
//! (two rows of 49,152 per token for SmolLM2): a polynomial `exp` the compiler vectorizes, and
//! f64 sums kept in eight lanes so they vectorize too. `f32::exp` is a libm call per element
//! and a serial f64 sum cannot be reordered, which made the metrics as slow as a forward pass.

use std::f32::consts::LOG2_E;

/// e^x for x in [−87, 88] (clamped), within about 2 ulp: x = n·ln 2 + r with |r| ≤ ln 2 / 2
/// (Cody–Waite: ln 2 in two parts so r keeps its precision), e^r by its degree-7 Taylor
/// series, 2^n written into the exponent bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Σ f(v) over f32 values, accumulated in f64 eight lanes at a time.
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| f(x) as f64).sum();
    for c in chunks {
        for j in 0..8 {
            acc[j] += f(c[j]) as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

fn row_max(logits: &[f32]) -> f32 {
    logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// A row's largest logit and Σ e^(l − max), in f64.
#[derive(Debug, Clone, Copy)]
pub struct Shifted {
    pub max: f64,
    pub sum: f64,
}

impl Shifted {
    /// log Z = log Σ e^l.
    pub fn log_z(&self) -> f64 {
        self.max + self.sum.ln()
    }
}

/// Fills `exps` with e^(l − max) for every logit.
pub fn exp_shifted(logits: &[f32], exps: &mut Vec<f32>) -> Shifted {
    let max = row_max(logits);
    exps.clear();
    exps.extend(logits.iter().map(|&l| exp_f32(l - max)));
    Shifted {
        max: max as f64,
        sum: lane_sum(exps, |e| e),
    }
}

/// log Z = log Σ e^l of one row, without keeping the exponentials.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = row_max(logits);
    max as f64 + lane_sum(logits, |l| exp_f32(l - max)).ln()
}

/// Σ w_i (a_i − b_i) in f64, eight lanes at a time; the differences are exact in f64.
pub fn weighted_difference(w: &[f32], a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let n = w.len().min(a.len()).min(b.len());
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        for j in 0..8 {
            acc[j] += w[i + j] as f64 * (a[i + j] as f64 - b[i + j] as f64);
        }
    }
    let rest: f64 = (whole..n)
        .map(|i| w[i] as f64 * (a[i] as f64 - b[i] as f64))
        .sum();
    acc.iter().sum::<f64>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polynomial_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_3;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn log_sum_exp_matches_a_direct_f64_computation() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.17 - 8.0)
            .collect();
        let want = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&row) - want).abs() < 1e-6);
    }
}
