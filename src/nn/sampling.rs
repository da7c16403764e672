//! Choosing the next token: penalties (repetition over prompt and output, presence and frequency
//! over the output, as OpenAI and vLLM define them), then greedy at temperature 0, or
//! temperature, top-k, top-p and min-p with a per-request seeded RNG. Also the log-softmax
//! helpers that logprobs use.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no limit.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 = off; > 1 discourages any token already in the prompt or output.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Output token counts (presence/frequency penalties).
    output_counts: HashMap<u32, u32>,
    /// Prompt and output tokens (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Self {
            rng,
            output_counts: HashMap::new(),
            seen: if params.repetition_penalty != 1.0 {
                prompt.iter().copied().collect()
            } else {
                Default::default()
            },
            params,
        }
    }

    /// Records a token the sequence produced.
    pub fn accept(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    /// Picks the next token from raw logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        // Temperatures this small are greedy in effect, and dividing by them overflows.
        if p.temperature < 1e-5 || p.top_k == 1 {
            return argmax(logits);
        }
        // Candidates sorted by probability, cut by top-k, then min-p and top-p.
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_weight);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_weight);
        if cand.is_empty() || !cand[0].1.is_finite() {
            // Non-finite logits (a broken model): fall back to the plain maximum.
            return argmax(logits);
        }
        if p.min_p > 0.0 {
            // The most likely candidate is first; keep those at least min_p times as likely.
            let floor = cand[0].1 * p.min_p;
            cand.retain(|c| c.1 >= floor);
        }
        if p.top_p < 1.0 {
            let total: f32 = cand.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        let kept: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.gen::<f32>() * kept;
        for &(tok, w) in &cand {
            if r < w {
                return tok;
            }
            r -= w;
        }
        cand.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// Index of the largest value (NaNs never win).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of one row (log Z in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_z = super::softmax::log_sum_exp(logits);
    logits.iter().map(|&l| (l as f64 - log_z) as f32).collect()
}

/// The `k` largest entries, most likely first.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(params(|p| p.temperature = 0.0), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[]);
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_and_min_p_restrict_the_candidates() {
        let logits = [5.0f32, 4.9, 0.0, -1.0];
        let mut s = Sampler::new(params(|p| p.top_k = 2), &[]);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone()) < 2);
        }
        // min_p 0.5: token 1 (e^-0.1 ≈ 0.9 of the top) stays, tokens 2 and 3 go.
        let mut s = Sampler::new(params(|p| p.min_p = 0.5), &[]);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone()) < 2);
        }
        let mut s = Sampler::new(params(|p| p.top_p = 0.1), &[]);
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone()), 0);
        }
    }

    #[test]
    fn penalties_follow_openai_and_hf_definitions() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 1.0;
                p.presence_penalty = 0.5;
            }),
            &[],
        );
        s.accept(0);
        s.accept(0);
        let mut l = [3.0f32, 1.0, 0.0];
        s.sample(&mut l);
        assert_eq!(l, [3.0 - 2.0 - 0.5, 1.0, 0.0]);
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 2.0;
            }),
            &[1, 2],
        );
        let mut l = [1.0f32, 4.0, -1.0];
        assert_eq!(s.sample(&mut l), 1);
        assert_eq!(l, [1.0, 2.0, -2.0]);
    }

    #[test]
    fn tiny_temperatures_and_non_finite_logits_do_not_panic() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 1e-30;
                p.min_p = 0.1;
            }),
            &[],
        );
        assert_eq!(s.sample(&mut [0.0, 5.0, 1.0]), 1);
        let mut s = Sampler::new(params(|p| p.min_p = 0.1), &[]);
        assert!(s.sample(&mut [f32::NAN, f32::NAN]) < 2);
        s.sample(&mut [f32::INFINITY, 0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_after_min_p_uses_the_remaining_mass() {
        // min_p drops the tail; top_p 0.5 must still cut to the single top token.
        let logits = [2.0f32, 1.9, -5.0, -5.0];
        let mut s = Sampler::new(
            params(|p| {
                p.min_p = 0.01;
                p.top_p = 0.5;
            }),
            &[],
        );
        for _ in 0..100 {
            assert_eq!(s.sample(&mut logits.clone()), 0);
        }
    }

    #[test]
    fn log_softmax_normalizes_and_top_k_orders() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(
            top_k(&lp, 2).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 1]
        );
    }
}
