//! OpenAI-compatible inference (DESIGN §2 "Inference", §7): `/v1/completions` and
//! `/v1/chat/completions`. This module holds what both share: loading the model through the
//! engine, validating the sampling fields (each error names the field and the limit),
//! submitting one engine sequence per choice, and gathering their events into choices.

pub mod chat;
pub mod completions;
pub mod manage;
mod stream;

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::catalog::{self, CatalogError};
use crate::db::{self, models::ModelRow};
use crate::engine::{
    EngineError, FinishReason, GenerateRequest, LoadedModel, ModelKey, SamplingParams, SeqEvent,
    TokenLogprob,
};
use crate::metrics::Metrics;
use crate::model::servable;

pub use manage::{engine_stats, load_model, unload_model};

/// Most choices one request may ask for (DESIGN §7).
pub const MAX_N: u64 = 4;
pub const MAX_STOP: usize = 4;
pub const MAX_STOP_LEN: usize = 256;
pub const MAX_LOGPROBS: u64 = 5;
/// Completions prompts given as a list run as that many sequences.
pub const MAX_PROMPTS: usize = 16;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::NotFound(_) => ApiError::not_found("model", e.to_string()),
            EngineError::Unservable { .. } => ApiError::bad_request("model", e.to_string()),
            EngineError::TooMany { .. } => ApiError::bad_request("n", e.to_string()),
            EngineError::Overloaded { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                e.to_string(),
            ),
            EngineError::Internal(_) => ApiError::internal("running inference", e),
        }
    }
}

/// `ApiError` plus `Retry-After` on 429.
pub struct InferenceError(pub ApiError);

impl From<ApiError> for InferenceError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<EngineError> for InferenceError {
    fn from(e: EngineError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for InferenceError {
    fn into_response(self) -> Response {
        let retry = self.0.status == StatusCode::TOO_MANY_REQUESTS;
        let mut r = self.0.into_response();
        if retry {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}

/// Request JSON with OpenAI's status for bad fields (400, not 422).
pub fn parse_request<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    super::json::parse(bytes).map_err(|mut e| {
        if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            e.status = StatusCode::BAD_REQUEST;
        }
        e
    })
}

/// The engine's name for the stored model `row`.
pub fn engine_key(row: &ModelRow) -> ModelKey {
    ModelKey {
        id: row.id.clone(),
        revision: row.revision.clone(),
    }
}

/// The loaded model, loading it from the catalog on first use. The catalog is read on every
/// request, so a deleted model answers 404 and one uploaded again under its id is loaded anew.
pub async fn model_for(state: &AppState, id: &str) -> Result<Arc<LoadedModel>, ApiError> {
    let engine = state.engine.clone();
    // Before the catalog read: a delete after this point voids the load below.
    let ticket = engine.ticket(id);
    let row = db::models::get(state.jobs.db(), id)
        .await?
        .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
    let key = engine_key(&row);
    let max_context = engine.settings().max_context;
    let jobs = state.jobs.clone();
    let owned = id.to_string();
    Ok(engine
        .get_or_load(ticket, &key, move || async move {
            let ckpt = catalog::open_checkpoint(jobs.db(), jobs.store(), jobs.settings(), &owned)
                .await
                .map_err(|e| match e {
                    CatalogError::NotFound(id) => EngineError::NotFound(id),
                    other => EngineError::Unservable {
                        id: owned.clone(),
                        message: other.to_string(),
                    },
                })?;
            let id = owned.clone();
            tokio::task::spawn_blocking(move || servable::load(&ckpt, max_context))
                .await
                .map_err(|e| EngineError::Internal(format!("loading panicked: {e}")))?
                .map_err(|e| EngineError::Unservable {
                    id,
                    message: e.to_string(),
                })
        })
        .await?)
}

/// One stop string or several.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling fields both endpoints share, as their request bodies carry them.
#[derive(Debug, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub stop: Option<StopField>,
    pub ignore_eos: bool,
}

/// Declares an endpoint's request body: its own fields, then the sampling fields both endpoints
/// share, in one struct that serves parsing and the OpenAPI document alike. (A `flatten`ed
/// `SamplingFields` would make serde lose the failing field's name in errors.) `take_sampling()`
/// hands the shared fields to [`SamplingFields::validate`].
macro_rules! request_body {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$fmeta:meta])* $field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
        pub struct $name {
            $($(#[$fmeta])* $field: $ty,)*
            /// 0..=2, default 1; 0 is greedy.
            temperature: Option<f32>,
            /// (0, 1], default 1.
            top_p: Option<f32>,
            /// -1 or 0: off.
            top_k: Option<i64>,
            /// 0..=1, default 0.
            min_p: Option<f32>,
            /// -2..=2, default 0.
            presence_penalty: Option<f32>,
            /// -2..=2, default 0.
            frequency_penalty: Option<f32>,
            /// (0, 10], default 1 (off).
            repetition_penalty: Option<f32>,
            /// Makes sampling repeatable.
            seed: Option<i64>,
            /// Choices to generate, 1..=4.
            n: Option<u64>,
            /// Up to 4 strings that end the generation (not part of the text).
            stop: Option<$crate::http::inference::StopField>,
            /// vLLM's extension: generate through end-of-sequence tokens.
            #[serde(default)]
            ignore_eos: bool,
        }

        impl $name {
            /// The sampling fields, taken out of the body for validation.
            fn take_sampling(&mut self) -> $crate::http::inference::SamplingFields {
                $crate::http::inference::SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                    n: self.n,
                    stop: self.stop.take(),
                    ignore_eos: self.ignore_eos,
                }
            }
        }
    };
}
pub(crate) use request_body;

fn in_range(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::bad_request(
            param,
            format!("{param} must be within [{lo}, {hi}], got {x}"),
        )),
    }
}

pub struct Validated {
    pub sampling: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl SamplingFields {
    pub fn validate(&self) -> Result<Validated, ApiError> {
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0, 1.0)?;
        if top_p == 0.0 {
            return Err(ApiError::bad_request(
                "top_p",
                "top_p must be greater than 0",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad_request(
                    "top_k",
                    format!("top_k must be -1 (off) or a positive integer, got {k}"),
                ))
            }
        };
        let repetition_penalty = in_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            10.0,
            1.0,
        )?;
        if repetition_penalty == 0.0 {
            return Err(ApiError::bad_request(
                "repetition_penalty",
                "repetition_penalty must be greater than 0",
            ));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::bad_request(
                "n",
                format!("n must be within 1..={MAX_N}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::bad_request(
                "stop",
                format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
            ));
        }
        if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(ApiError::bad_request(
                "stop",
                format!(
                    "stop strings must be 1..={MAX_STOP_LEN} bytes, got {} bytes",
                    s.len()
                ),
            ));
        }
        Ok(Validated {
            sampling: SamplingParams {
                temperature: in_range("temperature", self.temperature, 0.0, 2.0, 1.0)?,
                top_p,
                top_k,
                min_p: in_range("min_p", self.min_p, 0.0, 1.0, 0.0)?,
                presence_penalty: in_range(
                    "presence_penalty",
                    self.presence_penalty,
                    -2.0,
                    2.0,
                    0.0,
                )?,
                frequency_penalty: in_range(
                    "frequency_penalty",
                    self.frequency_penalty,
                    -2.0,
                    2.0,
                    0.0,
                )?,
                repetition_penalty,
                seed: self.seed.map(|s| s as u64),
            },
            n: n as usize,
            stop,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// Checks `max_tokens` against the configured limit and the context left after the prompt.
/// `requested: None` takes `default` (or everything the context leaves, when that is less).
pub fn check_lengths(
    model: &LoadedModel,
    limit: usize,
    prompt_len: usize,
    requested: Option<u64>,
    default: usize,
    field: &str,
) -> Result<usize, ApiError> {
    let context = model.max_positions();
    if prompt_len == 0 {
        return Err(ApiError::bad_request("prompt", "the prompt is empty"));
    }
    // Scoring a whole context window (echo, max_tokens 0) needs no room after the prompt.
    if prompt_len == context && requested == Some(0) {
        return Ok(0);
    }
    if prompt_len >= context {
        return Err(ApiError::bad_request(
            "prompt",
            format!("the prompt has {prompt_len} tokens; this model's context is {context} tokens"),
        ));
    }
    let room = context - prompt_len;
    let max_tokens = match requested {
        Some(m) if m > limit as u64 => {
            return Err(ApiError::bad_request(
                field,
                format!("{field} must be at most {limit}, got {m}"),
            ))
        }
        Some(m) if m as usize > room => {
            return Err(ApiError::bad_request(
                field,
                format!(
                    "{field} ({m}) plus the prompt ({prompt_len} tokens) exceeds the context of {context} tokens"
                ),
            ))
        }
        Some(m) => m as usize,
        None => default.min(room).min(limit),
    };
    Ok(max_tokens)
}

/// Refuses token ids the model has no embedding for (a tokenizer with added tokens beyond the
/// embedding table would otherwise fail the whole batch).
pub fn check_vocab(model: &LoadedModel, ids: &[u32], field: &str) -> Result<(), ApiError> {
    let vocab = model.servable.llama.vocab_size() as u32;
    match ids.iter().find(|&&t| t >= vocab) {
        Some(bad) => Err(ApiError::bad_request(
            field,
            format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        )),
        None => Ok(()),
    }
}

/// One engine sequence's events.
pub struct Choice {
    pub index: usize,
    pub events: UnboundedReceiver<SeqEvent>,
}

/// Submits one sequence per (prompt, n); on a full queue the ones already queued are dropped
/// with their receivers, so the engine discards them.
pub fn submit(
    metrics: &Arc<Metrics>,
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    v: &Validated,
    max_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
) -> Result<Vec<Choice>, EngineError> {
    let wanted = prompts.len() * v.n;
    if wanted > model.capacity() {
        return Err(EngineError::TooMany {
            wanted,
            capacity: model.capacity(),
        });
    }
    let mut choices = Vec::with_capacity(wanted);
    for prompt in prompts {
        for i in 0..v.n {
            let (tx, rx) = unbounded_channel();
            let mut sampling = v.sampling.clone();
            // n choices from one seed must still differ.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            model.submit(GenerateRequest {
                prompt: prompt.clone(),
                sampling,
                max_tokens,
                stop: v.stop.clone(),
                logprobs,
                prompt_logprobs,
                ignore_eos: v.ignore_eos,
                events: tx,
            })?;
            choices.push(Choice {
                index: choices.len(),
                events: observed(metrics.clone(), model.key.id.clone(), rx),
            });
        }
    }
    Ok(choices)
}

/// Relays a sequence's events while timing them for the metrics: time to the first token,
/// time between tokens, and the token counts at the end. The relay stops when either side
/// does, so a client that goes away still stops its sequence at the engine's next token.
fn observed(
    metrics: Arc<Metrics>,
    model: String,
    mut from_engine: UnboundedReceiver<SeqEvent>,
) -> UnboundedReceiver<SeqEvent> {
    let (to_client, events) = unbounded_channel();
    tokio::spawn(async move {
        let submitted = Instant::now();
        let mut last_token: Option<Instant> = None;
        loop {
            let event = tokio::select! {
                e = from_engine.recv() => match e {
                    Some(e) => e,
                    None => break,
                },
                _ = to_client.closed() => break,
            };
            match &event {
                SeqEvent::Token { .. } => {
                    let now = Instant::now();
                    match last_token {
                        None => metrics.first_token(&model, (now - submitted).as_secs_f64()),
                        Some(t) => metrics.next_token(&model, (now - t).as_secs_f64()),
                    }
                    last_token = Some(now);
                }
                SeqEvent::Done {
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => metrics.tokens(&model, *prompt_tokens, *completion_tokens),
                _ => {}
            }
            if to_client.send(event).is_err() {
                break;
            }
        }
    });
    events
}

/// A choice gathered to its end (non-streaming responses).
#[derive(Default)]
pub struct Finished {
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
    pub prompt: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub async fn gather(mut choice: Choice) -> Result<Finished, ApiError> {
    let mut out = Finished::default();
    while let Some(e) = choice.events.recv().await {
        match e {
            SeqEvent::Prompt(p) => out.prompt = p,
            SeqEvent::Token { text, token } => {
                out.text.push_str(&text);
                out.tokens.extend(token);
            }
            SeqEvent::Flush(text) => out.text.push_str(&text),
            SeqEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                out.finish_reason = Some(finish_reason);
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                return Ok(out);
            }
            SeqEvent::Error(m) => return Err(ApiError::internal("generating", m)),
            SeqEvent::ModelGone(m) => return Err(ApiError::not_found("model", m)),
        }
    }
    Err(ApiError::internal(
        "generating",
        "the engine stopped before the sequence finished",
    ))
}

/// Tokenizing and template rendering run off the async executor (long prompts take
/// milliseconds).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("preparing the prompt", e))?
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Token counts, as OpenAI reports them.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

pub fn usage_json(prompt: usize, completion: usize) -> serde_json::Value {
    serde_json::to_value(Usage::new(prompt, completion)).expect("usage serializes")
}
