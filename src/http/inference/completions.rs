//! `POST /v1/completions`: prompts as a string, strings, token ids or lists of token ids;
//! `echo`, `logprobs` (0..=5), `n`, `stop`, streaming with `stream_options.include_usage`.
//! `echo` + `logprobs` + `max_tokens: 0` scores the prompt, as evaluation harnesses use it.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::stream::{sse, ChunkShape, StreamMeta};
use super::{
    check_lengths, check_vocab, gather, model_for, now_secs, parse_request, request_body, submit,
    InferenceError, StreamOptions, Usage, MAX_LOGPROBS, MAX_PROMPTS,
};
use crate::engine::{FinishReason, TokenLogprob};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::wire::ServerSentEvent;
use crate::http::AppState;

/// OpenAI's default for this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;

/// A prompt as text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

request_body! {
/// `POST /v1/completions`'s body: OpenAI's fields and the sampling fields.
pub struct CompletionRequest {
    #[schema(example = "smollm2")]
    model: String,
    prompt: PromptField,
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<u64>,
    #[serde(default)]
    echo: bool,
    best_of: Option<u64>,
    suffix: Option<String>,
    #[allow(dead_code)]
    user: Option<String>,
}
}

/// A completion, as OpenAI's `text_completion`.
#[derive(Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// tokens, token_logprobs, top_logprobs, text_offset (when `logprobs` was asked for).
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

/// The prompts as token ids, with the text `echo` returns for each.
fn tokenize(
    model: &crate::engine::LoadedModel,
    prompt: PromptField,
) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let tok = &model.servable.tokenizer;
    let encode = |text: String| -> Result<(Vec<u32>, String), ApiError> {
        let ids = tok
            .encode(text.as_str(), true)
            .map_err(|e| ApiError::bad_request("prompt", format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec();
        Ok((ids, text))
    };
    let from_ids = |ids: Vec<u32>| -> Result<(Vec<u32>, String), ApiError> {
        let text = tok.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    };
    let prompts: Vec<(Vec<u32>, String)> = match prompt {
        PromptField::Text(t) => vec![encode(t)?],
        PromptField::Texts(v) => v.into_iter().map(encode).collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![from_ids(ids)?],
        PromptField::TokenLists(v) => v.into_iter().map(from_ids).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::bad_request(
            "prompt",
            format!("give 1..={MAX_PROMPTS} prompts, got {}", prompts.len()),
        ));
    }
    Ok(prompts)
}

/// OpenAI's completions `logprobs` object for these tokens, offsets counted in characters
/// from `offset`.
fn logprobs_json(entries: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(*offset);
        *offset += e.text.chars().count();
    }
    json!({
        "tokens": entries.iter().map(|e| &e.text).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            match e.logprob {
                None => Value::Null,
                // As OpenAI: the top alternatives plus the chosen token itself.
                Some(lp) => {
                    let mut m: serde_json::Map<String, Value> =
                        e.top.iter().map(|t| (t.text.clone(), json!(t.logprob))).collect();
                    m.entry(e.text.clone()).or_insert(json!(lp));
                    Value::Object(m)
                }
            }
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

#[utoipa::path(post, path = "/v1/completions", tag = "inference", request_body = CompletionRequest,
    responses((status = 200, description = "the completion; with `stream: true`, server-sent \
        `text_completion` chunks ending in `data: [DONE]`",
            content((Completion = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "the engine is full; retry after `Retry-After`", body = ErrorBody)))]
pub async fn completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, InferenceError> {
    let mut req: CompletionRequest = parse_request(&body)?;
    let v = req.take_sampling().validate()?;
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::bad_request("best_of", "best_of > 1 is not supported").into());
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "suffix is not supported").into());
    }
    let logprobs = match req.logprobs {
        Some(k) if k > MAX_LOGPROBS => {
            return Err(ApiError::bad_request(
                "logprobs",
                format!("logprobs must be within 0..={MAX_LOGPROBS}, got {k}"),
            )
            .into())
        }
        other => other.map(|k| k as usize),
    };
    let model = model_for(&state, &req.model).await?;
    let prompts = super::blocking({
        let model = model.clone();
        move || tokenize(&model, req.prompt)
    })
    .await?;
    let limit = state.engine.settings().max_tokens;
    // One max_tokens for all prompts: what the tightest one allows.
    let mut max_tokens = usize::MAX;
    for (ids, _) in &prompts {
        check_vocab(&model, ids, "prompt")?;
        max_tokens = max_tokens.min(check_lengths(
            &model,
            limit,
            ids.len(),
            req.max_tokens,
            DEFAULT_MAX_TOKENS,
            "max_tokens",
        )?);
    }
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.0.clone()).collect();
    let prompt_logprobs = req.echo && logprobs.is_some();
    let choices = submit(
        state.jobs.metrics(),
        &model,
        &ids,
        &v,
        max_tokens,
        logprobs,
        prompt_logprobs,
    )?;
    let echo_texts: Vec<Option<String>> = prompts
        .iter()
        .flat_map(|(_, text)| std::iter::repeat_n(req.echo.then(|| text.clone()), v.n))
        .collect();
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let model_id = model.key.id.clone();

    if req.stream {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let total = choices.len();
        let shape = CompletionChunks {
            echo_texts,
            want_logprobs: logprobs.is_some(),
            offsets: vec![0; total],
            echoed: vec![false; total],
        };
        let meta = StreamMeta {
            id,
            created,
            model: model_id,
            include_usage,
            n: v.n,
        };
        return Ok(sse(meta, choices, shape));
    }

    let mut out = Vec::with_capacity(choices.len());
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut counted_prompts = std::collections::HashSet::new();
    for (choice, echo) in choices.into_iter().zip(echo_texts) {
        let index = choice.index;
        let f = gather(choice).await?;
        // Usage counts each prompt once, as OpenAI does for n > 1.
        if counted_prompts.insert(index / v.n) {
            prompt_tokens += f.prompt_tokens;
        }
        completion_tokens += f.completion_tokens;
        let text = match &echo {
            Some(p) => format!("{p}{}", f.text),
            None => f.text,
        };
        let lp = logprobs.map(|_| {
            let mut offset = 0;
            let mut entries = if echo.is_some() { f.prompt } else { Vec::new() };
            entries.extend(f.tokens);
            logprobs_json(&entries, &mut offset)
        });
        out.push(CompletionChoice {
            index,
            text,
            logprobs: lp,
            finish_reason: f.finish_reason.map(|r| r.as_str()),
        });
    }
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created,
        model: model_id,
        choices: out,
        usage: Usage::new(prompt_tokens, completion_tokens),
    })
    .into_response())
}

/// Completion chunks: `text` plus its logprobs; the echoed prompt goes first.
struct CompletionChunks {
    echo_texts: Vec<Option<String>>,
    want_logprobs: bool,
    /// Characters sent so far per choice (`text_offset`).
    offsets: Vec<usize>,
    echoed: Vec<bool>,
}

impl CompletionChunks {
    /// The echoed prompt, the first time a choice says anything.
    fn take_echo(&mut self, i: usize) -> String {
        if std::mem::replace(&mut self.echoed[i], true) {
            return String::new();
        }
        self.echo_texts[i].clone().unwrap_or_default()
    }
}

impl ChunkShape for CompletionChunks {
    const OBJECT: &'static str = "text_completion";

    fn prompt(&mut self, i: usize, scored: &[TokenLogprob]) -> Option<Value> {
        let text = self.take_echo(i);
        let lp = logprobs_json(scored, &mut self.offsets[i]);
        Some(json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null}))
    }

    fn token(&mut self, i: usize, text: String, token: Option<TokenLogprob>) -> Option<Value> {
        let echo = self.take_echo(i);
        self.offsets[i] += echo.chars().count();
        let text = format!("{echo}{text}");
        if text.is_empty() && token.is_none() {
            return None;
        }
        let lp = if self.want_logprobs {
            logprobs_json(token.as_slice(), &mut self.offsets[i])
        } else {
            Value::Null
        };
        Some(json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null}))
    }

    fn done(&mut self, i: usize, reason: FinishReason) -> Value {
        let text = self.take_echo(i);
        json!({"index": i, "text": text, "logprobs": null, "finish_reason": reason.as_str()})
    }
}
