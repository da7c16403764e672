//! Data-free calibration (DESIGN §4): when a job names no dataset, the model writes its own
//! calibration text, as LLM-QAT (Liu et al. 2023) does for quantization without data. Each
//! window starts from the model's BOS token and continues by sampling the model's next-token
//! distribution at temperature 1, with a seeded RNG per window, until it is `seq_len` tokens
//! long. The windows keep the BOS, because the activations calibration sees should be the
//! ones the model had while writing them.
//!
//! Departures from LLM-QAT, and why: it picks the first few tokens greedily and samples the
//! rest; starting every window from the same BOS, greedy first tokens would make every window
//! begin identically, so quantd samples from the first token on. End-of-sequence tokens are
//! never sampled (their probability is set to zero), so every window is full length.

use std::ops::ControlFlow;

use candle_core::Result;

use crate::nn::sampling::{Sampler, SamplingParams};
use crate::nn::{KvCache, Llama, Logits, SeqStep};

/// Windows generated side by side (each with its own KV cache): enough rows per step for the
/// matmuls to run as gemm, few enough that the caches stay small (16 × 512 positions of
/// SmolLM2 are about 380 MB).
const BATCH: usize = 16;

/// How the windows were made, for the calibration report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub start_token: u32,
    pub temperature: f32,
    /// Tokens the model was kept from sampling (its end-of-sequence tokens).
    pub excluded_tokens: Vec<u32>,
}

/// `samples` windows of `seq_len` tokens written by `llama` from `start_token`; `progress` is
/// called with (windows done, samples) after each batch and may stop the work (`Ok(None)`).
pub fn generate_windows(
    llama: &Llama,
    start_token: u32,
    excluded_tokens: &[u32],
    samples: usize,
    seq_len: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Option<(Vec<Vec<u32>>, Generation)>> {
    let mut windows: Vec<Vec<u32>> = Vec::with_capacity(samples);
    for first in (0..samples).step_by(BATCH) {
        let n = BATCH.min(samples - first);
        let mut seqs: Vec<Vec<u32>> = vec![vec![start_token]; n];
        let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::new()).collect();
        let mut samplers: Vec<Sampler> = (0..n)
            .map(|i| {
                let params = SamplingParams {
                    temperature: 1.0,
                    // One stream per window, whatever the batch size.
                    seed: Some(seed ^ ((first + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ..SamplingParams::default()
                };
                Sampler::new(params, &[])
            })
            .collect();
        while seqs[0].len() < seq_len {
            // Each step feeds what the caches have not seen: the whole start at first, then
            // the token sampled last.
            let fed: Vec<usize> = caches.iter().map(KvCache::len).collect();
            let mut steps: Vec<SeqStep<'_>> = seqs
                .iter()
                .zip(caches.iter_mut())
                .zip(&fed)
                .map(|((s, cache), &done)| SeqStep {
                    tokens: &s[done..],
                    cache,
                    logits: Logits::Last,
                })
                .collect();
            let logits = llama.forward(&mut steps, None)?;
            for ((seq, sampler), l) in seqs.iter_mut().zip(&mut samplers).zip(logits) {
                let mut row = l.flatten_all()?.to_vec1::<f32>()?;
                for &t in excluded_tokens {
                    if let Some(v) = row.get_mut(t as usize) {
                        *v = f32::NEG_INFINITY;
                    }
                }
                let token = sampler.sample(&mut row);
                sampler.accept(token);
                seq.push(token);
            }
        }
        windows.extend(seqs);
        if progress(windows.len(), samples).is_break() {
            return Ok(None);
        }
    }
    let mut excluded = excluded_tokens.to_vec();
    excluded.sort_unstable();
    excluded.dedup();
    Ok(Some((
        windows,
        Generation {
            start_token,
            temperature: 1.0,
            excluded_tokens: excluded,
        },
    )))
}
