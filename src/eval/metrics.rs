//! Streaming accumulators for the accuracy metrics of DESIGN §5: negative log-likelihood (for
//! perplexity), KL divergence of a model's next-token distribution from a reference's, and
//! top-1 agreement. They see one scored position at a time and keep one number per position
//! (for the KL median and p99), never logits.

use serde::Serialize;

use crate::nn::sampling::argmax;
use crate::nn::softmax::{exp_shifted, weighted_difference};

#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    nll_sum: f64,
    reference_nll_sum: f64,
    scored: usize,
    kl: Vec<f32>,
    top1_same: usize,
    /// e^(l − max) of the reference row, reused between positions.
    exps: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub scored_tokens: usize,
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Present when a reference model was scored beside.
    pub reference_perplexity: Option<f64>,
    pub delta_ppl_pct: Option<f64>,
    pub kld_mean: Option<f64>,
    pub kld_median: Option<f64>,
    pub kld_p99: Option<f64>,
    pub kld_max: Option<f64>,
    pub top1_agreement_pct: Option<f64>,
}

impl Accumulator {
    /// One scored position: the model's logits, the reference's (if any), and the true next
    /// token. Logits must be finite.
    pub fn add(&mut self, logits: &[f32], reference: Option<&[f32]>, target: u32) {
        let log_zq = exp_shifted(logits, &mut self.exps).log_z();
        self.nll_sum += log_zq - logits[target as usize] as f64;
        self.scored += 1;
        if let Some(r) = reference {
            let shifted = exp_shifted(r, &mut self.exps);
            let log_zr = shifted.log_z();
            self.reference_nll_sum += log_zr - r[target as usize] as f64;
            // KL(P‖Q) = Σ p_i (log p_i − log q_i) = Σ p_i (r_i − q_i) − (log Z_r − log Z_q),
            // with p_i = e^(r_i − max) / Σ e^(r_j − max).
            let cross = weighted_difference(&self.exps, r, logits) / shifted.sum;
            self.kl.push((cross - (log_zr - log_zq)).max(0.0) as f32);
            if argmax(r) == argmax(logits) {
                self.top1_same += 1;
            }
        }
    }

    pub fn scored(&self) -> usize {
        self.scored
    }

    pub fn summary(&self) -> Summary {
        let n = self.scored.max(1) as f64;
        let mean_nll = self.nll_sum / n;
        let perplexity = mean_nll.exp();
        let with_ref = !self.kl.is_empty();
        let reference_perplexity = with_ref.then(|| (self.reference_nll_sum / n).exp());
        let mut sorted = self.kl.clone();
        sorted.sort_by(f32::total_cmp);
        let quantile = |q: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            let i = ((sorted.len() - 1) as f64 * q).round() as usize;
            Some(sorted[i] as f64)
        };
        Summary {
            scored_tokens: self.scored,
            perplexity,
            mean_nll,
            reference_perplexity,
            delta_ppl_pct: reference_perplexity.map(|r| 100.0 * (perplexity / r - 1.0)),
            kld_mean: with_ref.then(|| self.kl.iter().map(|&k| k as f64).sum::<f64>() / n),
            kld_median: quantile(0.5),
            kld_p99: quantile(0.99),
            kld_max: sorted.last().map(|&k| k as f64),
            top1_agreement_pct: with_ref.then(|| 100.0 * self.top1_same as f64 / n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_against_itself_has_zero_divergence_and_full_agreement() {
        let mut acc = Accumulator::default();
        for i in 0..10 {
            let logits: Vec<f32> = (0..50)
                .map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.4)
                .collect();
            acc.add(&logits, Some(&logits), (i % 50) as u32);
        }
        let s = acc.summary();
        assert_eq!(s.scored_tokens, 10);
        assert!(s.kld_max.unwrap().abs() < 1e-9);
        assert_eq!(s.top1_agreement_pct, Some(100.0));
        assert_eq!(s.delta_ppl_pct, Some(0.0));
    }

    #[test]
    fn perplexity_and_kl_follow_their_definitions() {
        // Uniform over 4 tokens: NLL ln 4, PPL 4.
        let mut acc = Accumulator::default();
        acc.add(&[0.0; 4], None, 2);
        assert!((acc.summary().perplexity - 4.0).abs() < 1e-6);
        // KL(P‖Q) for P = (0.5, 0.5) (the reference), Q = (0.9, 0.1) (the model).
        let mut acc = Accumulator::default();
        acc.add(&[0.9f32.ln(), 0.1f32.ln()], Some(&[0.0, 0.0]), 0);
        let want = 0.5 * (0.5f64 / 0.9).ln() + 0.5 * (0.5f64 / 0.1).ln();
        let got = acc.summary().kld_mean.unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Shifting a row's logits changes nothing.
        let mut shifted = Accumulator::default();
        shifted.add(
            &[0.9f32.ln() + 7.0, 0.1f32.ln() + 7.0],
            Some(&[-3.0, -3.0]),
            0,
        );
        assert!((shifted.summary().kld_mean.unwrap() - want).abs() < 1e-6);
    }
}
