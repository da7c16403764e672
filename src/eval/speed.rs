//! Inference speed of a loaded model on this host, measured the way llama-bench does: pp = one
//! prompt of N tokens from an empty cache, tg = M tokens decoded one at a time at batch 1.
//! Used by `quantd bench` and by every job's eval stage (DESIGN §5: "Speed").

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::nn::{KvCache, Llama, Logits, SeqStep};

/// Deterministic token ids spread over the vocabulary (speed does not depend on them).
pub fn synthetic_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 17) % (vocab - 1) + 1) as u32)
        .collect()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tokens/s of one `n`-token prompt.
fn prompt_processing(llama: &Llama, n: usize, salt: usize) -> candle_core::Result<f64> {
    let prompt = synthetic_tokens(n, llama.vocab_size(), salt);
    let mut cache = KvCache::new();
    let start = Instant::now();
    llama.forward(
        &mut [SeqStep {
            tokens: &prompt,
            cache: &mut cache,
            logits: Logits::Last,
        }],
        None,
    )?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Tokens/s of `n` greedy tokens decoded one at a time.
fn text_generation(llama: &Llama, n: usize) -> candle_core::Result<f64> {
    let mut cache = KvCache::new();
    let mut token = 1u32;
    let start = Instant::now();
    for _ in 0..n {
        let logits = llama.forward(
            &mut [SeqStep {
                tokens: &[token],
                cache: &mut cache,
                logits: Logits::Last,
            }],
            None,
        )?;
        let row = logits[0].squeeze(0)?.to_vec1::<f32>()?;
        token = crate::nn::sampling::argmax(&row);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The speed part of an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Speed {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Median of `repeat` runs.
    pub prompt_tok_s: f64,
    pub decode_tok_s: f64,
    pub repeat: usize,
    pub threads: usize,
}

/// Tokens/s of `repeat` pp runs and `repeat` tg runs, after a short warm-up that pages the
/// weights and the kernels' scratch buffers in.
pub fn samples(
    llama: &Llama,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    prompt_processing(llama, prompt_tokens.min(64), 99)?;
    text_generation(llama, gen_tokens.min(4))?;
    let mut pp = Vec::with_capacity(repeat);
    let mut tg = Vec::with_capacity(repeat);
    for r in 0..repeat {
        pp.push(prompt_processing(llama, prompt_tokens, r)?);
        tg.push(text_generation(llama, gen_tokens)?);
    }
    Ok((pp, tg))
}

/// Medians of `repeat` pp and tg runs. The prompt is capped by the model's context.
pub fn measure(
    llama: &Llama,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
) -> candle_core::Result<Speed> {
    let repeat = repeat.max(1);
    let prompt_tokens = prompt_tokens.min(llama.max_positions()).max(1);
    let gen_tokens = gen_tokens.min(llama.max_positions()).max(1);
    let (pp, tg) = samples(llama, prompt_tokens, gen_tokens, repeat)?;
    Ok(Speed {
        prompt_tokens,
        gen_tokens,
        prompt_tok_s: median(pp),
        decode_tok_s: median(tg),
        repeat,
        threads: candle_core::utils::get_num_threads(),
    })
}
