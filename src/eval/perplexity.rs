//! Perplexity, KL divergence and top-1 agreement over a token stream, by llama-perplexity's
//! method (DESIGN §5): consecutive non-overlapping windows of `ctx` tokens, each scored on its
//! second half (logits at positions ctx/2 … ctx−2 predicting the tokens after them, ctx/2 − 1
//! tokens per window, as `llama-perplexity` counts them), up to `max_scored` tokens. A
//! reference model, when given, runs the same windows; memory is one half-window of logits
//! per model whatever the text length.

use std::ops::ControlFlow;

use super::metrics::{Accumulator, Summary};
use crate::nn::{KvCache, Llama, Logits, SeqStep};

#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Window length in tokens.
    pub ctx: usize,
    /// Score at most this many tokens (the last window may be scored in part).
    pub max_scored: Option<usize>,
    /// Replaces each window's first token when the model wants a BOS (llama-perplexity does).
    pub bos: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EvalSpec {
    /// Positions scored per window.
    pub fn scored_per_window(&self) -> usize {
        self.ctx - 1 - self.ctx / 2
    }

    /// Windows needed for `n_tokens` of text: whole windows only, no more than `max_scored`
    /// needs.
    pub fn windows(&self, n_tokens: usize) -> usize {
        let whole = n_tokens / self.ctx;
        match self.max_scored {
            Some(m) => whole.min(m.div_ceil(self.scored_per_window())),
            None => whole,
        }
    }

    /// Tokens that will be scored on `n_tokens` of text.
    pub fn scored(&self, n_tokens: usize) -> usize {
        let all = self.windows(n_tokens) * self.scored_per_window();
        self.max_scored.map_or(all, |m| m.min(all))
    }
}

/// The logits of one window's scored half: rows for positions ctx/2 … ctx−1. Usually only
/// those rows go through the output layer; an output layer whose activation scale spans the
/// call (PyTorch's dynamic int8) gets the whole window, as transformers gives it, because its
/// scale depends on every row in the call.
pub fn half_window_logits(model: &Llama, window: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut cache = KvCache::new();
    let half = window.len() / 2;
    let from = if model.output.scale_spans_call() {
        0
    } else {
        half
    };
    let mut rows = model
        .forward(
            &mut [SeqStep {
                tokens: window,
                cache: &mut cache,
                logits: Logits::From(from),
            }],
            None,
        )?
        .remove(0)
        .to_vec2::<f32>()?;
    Ok(rows.split_off(half - from))
}

/// Scores `tokens` with `model` (and `reference` beside it). After each window
/// `progress(done, total)` may break to stop the evaluation (cancellation).
pub fn evaluate(
    model: &Llama,
    reference: Option<&Llama>,
    tokens: &[u32],
    spec: &EvalSpec,
    mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Summary, EvalError> {
    if spec.ctx < 4 {
        return Err(EvalError::Invalid(format!(
            "ctx must be at least 4, got {}",
            spec.ctx
        )));
    }
    for (name, m) in std::iter::once(("model", model)).chain(reference.map(|r| ("reference", r))) {
        if m.max_positions() < spec.ctx {
            return Err(EvalError::Invalid(format!(
                "ctx {} exceeds the {name}'s context of {} positions",
                spec.ctx,
                m.max_positions()
            )));
        }
    }
    let n = spec.windows(tokens.len());
    if n == 0 {
        return Err(EvalError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {}",
            tokens.len(),
            spec.ctx
        )));
    }
    let budget = spec.scored(tokens.len());
    let first = spec.ctx / 2;
    let mut acc = Accumulator::default();
    for w in 0..n {
        let mut window = tokens[w * spec.ctx..(w + 1) * spec.ctx].to_vec();
        if let Some(bos) = spec.bos {
            window[0] = bos;
        }
        let logits = half_window_logits(model, &window)?;
        // A model scored against itself runs once.
        let reference_logits = match reference {
            Some(r) if !std::ptr::eq(r, model) => Some(half_window_logits(r, &window)?),
            Some(_) => None,
            None => None,
        };
        let itself = reference.is_some() && reference_logits.is_none();
        // Row i holds position first + i, which predicts the token after it.
        for j in first..spec.ctx - 1 {
            if acc.scored() == budget {
                break;
            }
            let i = j - first;
            let reference_row = match &reference_logits {
                Some(r) => Some(r[i].as_slice()),
                None if itself => Some(logits[i].as_slice()),
                None => None,
            };
            acc.add(&logits[i], reference_row, window[j + 1]);
        }
        if progress(w + 1, n).is_break() {
            return Err(EvalError::Cancelled);
        }
    }
    Ok(acc.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_scored_tokens_follow_llama_perplexity() {
        let spec = EvalSpec {
            ctx: 512,
            max_scored: None,
            bos: None,
        };
        assert_eq!(spec.scored_per_window(), 255);
        assert_eq!(spec.windows(16_384), 32);
        assert_eq!(spec.scored(16_384), 8160);
        // 16,384 scored tokens take 65 windows, the last one scored in part.
        let capped = EvalSpec {
            max_scored: Some(16_384),
            ..spec
        };
        assert_eq!(capped.windows(100_000), 65);
        assert_eq!(capped.scored(100_000), 16_384);
        assert_eq!(capped.windows(1024), 2);
        assert_eq!(capped.scored(1024), 510);
    }
}
