//! Perplexity, KL divergence and top-1 agreement over a token stream, by llama-perplexity's
//! method (DESIGN §5): consecutive non-overlapping windows of `ctx` tokens, each scored on its
//! second half (logits at positions ctx/2 … ctx−2 predicting the tokens after them, ctx/2 − 1
//! tokens per window, as `llama-perplexity` counts them). A reference model, when given, runs
//! the same windows; memory is one window of logits per model whatever the text length.

use candle_core::Result;

use super::metrics::{Accumulator, Summary};
use crate::nn::{KvCache, Llama, SeqStep};

#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Window length in tokens.
    pub ctx: usize,
    /// Use at most this many tokens of the text (whole windows only).
    pub max_tokens: Option<usize>,
    /// Replaces each window's first token when the model wants a BOS (llama-perplexity does).
    pub bos: Option<u32>,
}

impl EvalSpec {
    /// Windows that fit in `n_tokens`.
    pub fn windows(&self, n_tokens: usize) -> usize {
        let usable = self.max_tokens.map_or(n_tokens, |m| m.min(n_tokens));
        usable / self.ctx
    }

    /// Positions scored per window.
    pub fn scored_per_window(&self) -> usize {
        self.ctx - 1 - self.ctx / 2
    }
}

/// Every position's logits of one window.
fn window_logits(model: &Llama, window: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = KvCache::new();
    model
        .forward(
            &mut [SeqStep {
                tokens: window,
                cache: &mut cache,
                all_logits: true,
            }],
            None,
        )?
        .remove(0)
        .to_vec2::<f32>()
}

/// Scores `tokens` with `model` (and `reference` beside it); `progress(done, total)` after
/// each window.
pub fn evaluate(
    model: &Llama,
    reference: Option<&Llama>,
    tokens: &[u32],
    spec: &EvalSpec,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    if spec.ctx < 4 {
        candle_core::bail!("ctx must be at least 4, got {}", spec.ctx);
    }
    let n = spec.windows(tokens.len());
    if n == 0 {
        candle_core::bail!(
            "the text has {} tokens, fewer than one window of {}",
            tokens.len(),
            spec.ctx
        );
    }
    let first = spec.ctx / 2;
    let mut acc = Accumulator::default();
    for w in 0..n {
        let mut window = tokens[w * spec.ctx..(w + 1) * spec.ctx].to_vec();
        if let Some(bos) = spec.bos {
            window[0] = bos;
        }
        let logits = window_logits(model, &window)?;
        let reference_logits = match reference {
            Some(r) => Some(window_logits(r, &window)?),
            None => None,
        };
        for j in first..spec.ctx - 1 {
            acc.add(
                &logits[j],
                reference_logits.as_ref().map(|r| r[j].as_slice()),
                window[j + 1],
            );
        }
        progress(w + 1, n);
    }
    Ok(acc.summary())
}
