//! The engine thread of one loaded model: it owns the KV caches, admits requests from a bounded
//! channel up to `max_batch` active sequences, and runs steps that batch every active
//! sequence: prompt chunks being prefilled next to sequences decoding one token (continuous
//! batching). A sequence whose receiver is gone (client disconnected) is dropped before the
//! next step, so it stops within one token. When the model is deleted (`retired`), every
//! running and queued sequence ends with `SeqEvent::ModelGone` and the thread stops.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use super::request::{FinishReason, GenerateRequest, SeqEvent, TokenLogprob, TopLogprob};
use super::text::{IncrementalDecoder, StopCheck, StopMatcher};
use crate::model::servable::Servable;
use crate::nn::sampling::{log_softmax, top_k, Sampler};
use crate::nn::{KvCache, Logits, SeqStep};

/// Counters one model's engine keeps (read by `/v1/engine` and tests).
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Sum over steps of the sequences in the step (÷ steps = mean batch).
    pub step_sequences: AtomicU64,
    pub max_step_sequences: AtomicU64,
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
}

pub struct SchedulerConfig {
    pub max_batch: usize,
    pub prefill_chunk: usize,
    /// For the message sequences get when the model is deleted.
    pub model_id: String,
    /// Set by `Engine::retire`.
    pub retired: Arc<AtomicBool>,
}

struct Seq {
    req: GenerateRequest,
    cache: KvCache,
    prefilled: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    generated: usize,
    next_input: u32,
    prompt_logprobs: Vec<TokenLogprob>,
}

impl Seq {
    fn new(req: GenerateRequest) -> Self {
        Self {
            cache: KvCache::new(),
            prefilled: 0,
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            decoder: IncrementalDecoder::new(&req.prompt),
            stop: StopMatcher::new(req.stop.clone()),
            generated: 0,
            next_input: 0,
            prompt_logprobs: Vec::new(),
            req,
        }
    }

    fn send(&self, e: SeqEvent) {
        // A closed receiver is noticed before the next step.
        let _ = self.req.events.send(e);
    }

    fn finish(&mut self, model: &Servable, reason: FinishReason) {
        let mut reason = reason;
        // A trailing partial character still in the decoder goes out (lossily) too.
        let tail = self.decoder.flush(&model.tokenizer);
        let mut rest = match self.stop.push(&tail) {
            StopCheck::Continue(t) => t,
            StopCheck::Stopped(t) => {
                reason = FinishReason::Stop;
                t
            }
        };
        rest.push_str(&self.stop.flush());
        if !rest.is_empty() {
            self.send(SeqEvent::Flush(rest));
        }
        self.send(SeqEvent::Done {
            finish_reason: reason,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.generated,
        });
    }
}

fn token_text(model: &Servable, id: u32) -> String {
    model.tokenizer.decode(&[id], false).unwrap_or_default()
}

fn logprob_entry(model: &Servable, lp: &[f32], token: u32, k: usize) -> TokenLogprob {
    TokenLogprob {
        token,
        text: token_text(model, token),
        logprob: lp.get(token as usize).copied(),
        top: top_k(lp, k)
            .into_iter()
            .map(|(t, l)| TopLogprob {
                token: t,
                text: token_text(model, t),
                logprob: l,
            })
            .collect(),
    }
}

/// Runs until the channel closes and the last active sequence ends.
pub fn run(
    model: Arc<Servable>,
    rx: Receiver<GenerateRequest>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
) {
    let mut active: Vec<Seq> = Vec::new();
    let mut closed = false;
    loop {
        while !closed && active.len() < cfg.max_batch {
            let next = if active.is_empty() {
                rx.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match next {
                Ok(req) => {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    active.push(Seq::new(req));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        if cfg.retired.load(Ordering::SeqCst) {
            end_retired(active, &rx, &stats, &cfg.model_id);
            return;
        }
        active.retain(|s| {
            let gone = s.req.events.is_closed();
            if gone {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        stats.active.store(active.len(), Ordering::Relaxed);
        if active.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&model, &mut active, &stats, &cfg)
        }));
        if stepped.is_err() {
            // Weights are read-only and the caches belong to the failed sequences, so the
            // engine can go on serving once they are gone.
            fail_all(
                &mut active,
                &stats,
                "inference failed: the engine step panicked",
            );
        }
        stats.active.store(active.len(), Ordering::Relaxed);
    }
}

/// The model was deleted: every sequence running or still queued ends with `ModelGone`. The
/// thread returns after this, dropping the receiver, so later submissions fail at once.
fn end_retired(active: Vec<Seq>, rx: &Receiver<GenerateRequest>, stats: &Stats, model_id: &str) {
    let message = format!("model {model_id:?} was deleted");
    for s in &active {
        s.send(SeqEvent::ModelGone(message.clone()));
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    while let Ok(req) = rx.try_recv() {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        let _ = req.events.send(SeqEvent::ModelGone(message.clone()));
    }
    stats.active.store(0, Ordering::Relaxed);
    tracing::info!(
        model = model_id,
        ended = active.len(),
        "deleted model's engine stopped"
    );
}

/// Ends every active sequence with an error event.
fn fail_all(active: &mut Vec<Seq>, stats: &Stats, message: &str) {
    for s in active.iter() {
        s.send(SeqEvent::Error(message.to_string()));
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    active.clear();
}

/// One batched forward over every active sequence, then sampling and events.
fn step(model: &Servable, active: &mut Vec<Seq>, stats: &Stats, cfg: &SchedulerConfig) {
    // Decoding sequences first (one token each), then prompt chunks within the budget.
    let mut budget = cfg.prefill_chunk;
    let mut inputs: Vec<Option<(Vec<u32>, bool)>> = Vec::with_capacity(active.len());
    for s in active.iter() {
        let remaining = s.req.prompt.len() - s.prefilled;
        inputs.push(if remaining == 0 {
            Some((vec![s.next_input], false))
        } else if budget > 0 {
            let take = remaining.min(budget);
            budget -= take;
            let chunk = s.req.prompt[s.prefilled..s.prefilled + take].to_vec();
            Some((chunk, s.req.prompt_logprobs))
        } else {
            None
        });
    }
    let mut steps: Vec<SeqStep<'_>> = Vec::new();
    for (s, input) in active.iter_mut().zip(&inputs) {
        if let Some((tokens, all_logits)) = input {
            steps.push(SeqStep {
                tokens,
                cache: &mut s.cache,
                logits: if *all_logits {
                    Logits::From(0)
                } else {
                    Logits::Last
                },
            });
        }
    }
    let n = steps.len() as u64;
    let result = model
        .llama
        .forward(&mut steps, None)
        .and_then(|out| out.iter().map(|t| t.to_vec2::<f32>()).collect());
    drop(steps);
    stats.steps.fetch_add(1, Ordering::Relaxed);
    stats.step_sequences.fetch_add(n, Ordering::Relaxed);
    stats.max_step_sequences.fetch_max(n, Ordering::Relaxed);
    let mut logits: Vec<Vec<Vec<f32>>> = match result {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "engine step failed");
            fail_all(active, stats, &format!("inference failed: {e}"));
            return;
        }
    };
    logits.reverse();
    let mut done = vec![false; active.len()];
    for (i, (s, input)) in active.iter_mut().zip(&inputs).enumerate() {
        let Some((tokens, _)) = input else { continue };
        let mut rows = logits.pop().expect("one result per stepped sequence");
        if s.prefilled < s.req.prompt.len() {
            if s.req.prompt_logprobs {
                score_prompt_chunk(model, s, &rows);
            }
            s.prefilled += tokens.len();
            stats
                .prompt_tokens
                .fetch_add(tokens.len() as u64, Ordering::Relaxed);
            if s.prefilled < s.req.prompt.len() {
                continue;
            }
            if s.req.prompt_logprobs {
                let scored = std::mem::take(&mut s.prompt_logprobs);
                s.send(SeqEvent::Prompt(scored));
            }
            if s.req.max_tokens == 0 {
                s.finish(model, FinishReason::Length);
                done[i] = true;
                continue;
            }
        }
        let last = rows.pop().expect("at least one row");
        done[i] = emit_next_token(model, s, last, stats);
    }
    let mut i = 0;
    active.retain(|_| {
        let keep = !done[i];
        i += 1;
        keep
    });
    stats.completed.fetch_add(
        done.iter().filter(|d| **d).count() as u64,
        Ordering::Relaxed,
    );
}

/// Prompt logprobs of a prefill chunk: row r (position p) predicts prompt token p + 1.
fn score_prompt_chunk(model: &Servable, s: &mut Seq, rows: &[Vec<f32>]) {
    let k = s.req.logprobs.unwrap_or(0);
    if s.prefilled == 0 {
        let first = s.req.prompt[0];
        s.prompt_logprobs.push(TokenLogprob {
            token: first,
            text: token_text(model, first),
            logprob: None,
            top: Vec::new(),
        });
    }
    for (r, row) in rows.iter().enumerate() {
        let next = s.prefilled + r + 1;
        if let Some(&tok) = s.req.prompt.get(next) {
            let lp = log_softmax(row);
            s.prompt_logprobs.push(logprob_entry(model, &lp, tok, k));
        }
    }
}

/// Samples from `logits`, sends the text it completes, and says whether the sequence ended.
fn emit_next_token(model: &Servable, s: &mut Seq, mut logits: Vec<f32>, stats: &Stats) -> bool {
    let lp = s.req.logprobs.map(|_| log_softmax(&logits));
    let token = s.sampler.sample(&mut logits);
    s.sampler.accept(token);
    s.generated += 1;
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let entry = lp
        .as_ref()
        .map(|lp| logprob_entry(model, lp, token, s.req.logprobs.unwrap_or(0)));
    if !s.req.ignore_eos && model.stop_token_ids.contains(&token) {
        if entry.is_some() {
            s.send(SeqEvent::Token {
                text: String::new(),
                token: entry,
            });
        }
        s.finish(model, FinishReason::Stop);
        return true;
    }
    let piece = s.decoder.push(&model.tokenizer, token);
    match s.stop.push(&piece) {
        StopCheck::Stopped(text) => {
            s.send(SeqEvent::Token { text, token: entry });
            s.finish(model, FinishReason::Stop);
            true
        }
        StopCheck::Continue(text) => {
            s.send(SeqEvent::Token { text, token: entry });
            let full = s.cache.len() + 1 >= model.llama.max_positions();
            if s.generated >= s.req.max_tokens || full {
                s.finish(model, FinishReason::Length);
                true
            } else {
                s.next_input = token;
                false
            }
        }
    }
}
