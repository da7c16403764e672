//! `POST /v1/chat/completions`: messages rendered with the model's own chat template, then
//! generated like a completion; `logprobs` + `top_logprobs`, streaming deltas as OpenAI sends
//! them (role first, then content, then `finish_reason`, optional usage, `[DONE]`).

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
    InferenceError, StreamOptions, Usage, MAX_LOGPROBS,
};
use crate::engine::chat_template::{self, ChatMessage};
use crate::engine::{FinishReason, TokenLogprob};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::wire::ServerSentEvent;
use crate::http::AppState;

const MAX_MESSAGES: usize = 1024;

/// Text, or a list of text parts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Part {
    /// Only `text`.
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Message {
    /// system, developer, user, assistant or tool.
    role: String,
    content: Option<Content>,
}

request_body! {
/// `POST /v1/chat/completions`'s body: OpenAI's fields and the sampling fields.
pub struct ChatRequest {
    #[schema(example = "smollm2")]
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u64>,
    #[allow(dead_code)]
    user: Option<String>,
}
}

/// A chat completion, as OpenAI's `chat.completion`.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// `{content: [{token, logprob, bytes, top_logprobs}], refusal}` when asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
}

fn messages(req: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if req.is_empty() || req.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(
            "messages",
            format!("give 1..={MAX_MESSAGES} messages, got {}", req.len()),
        ));
    }
    req.iter()
        .enumerate()
        .map(|(i, m)| {
            if !["system", "user", "assistant", "developer", "tool"].contains(&m.role.as_str()) {
                return Err(ApiError::bad_request(
                    format!("messages[{i}].role"),
                    format!(
                        "role must be system, developer, user, assistant or tool, got {:?}",
                        m.role
                    ),
                ));
            }
            let content =
                match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                _ => return Err(ApiError::bad_request(
                                    format!("messages[{i}].content[{j}]"),
                                    "only {\"type\": \"text\", \"text\": ...} parts are supported",
                                )),
                            }
                        }
                        s
                    }
                };
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn logprob_entry(e: &TokenLogprob) -> Value {
    json!({
        "token": e.text,
        "logprob": e.logprob,
        "bytes": e.text.as_bytes(),
        "top_logprobs": e.top.iter().map(|t| json!({
            "token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference", request_body = ChatRequest,
    responses((status = 200, description = "the answer; with `stream: true`, server-sent \
        `chat.completion.chunk` deltas ending in `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "the engine is full; retry after `Retry-After`", body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, InferenceError> {
    let mut req: ChatRequest = parse_request(&body)?;
    let v = req.take_sampling().validate()?;
    let msgs = messages(&req.messages)?;
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(ApiError::bad_request(
            "top_logprobs",
            format!("top_logprobs must be within 0..={MAX_LOGPROBS}, got {top}"),
        )
        .into());
    }
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(
            ApiError::bad_request("top_logprobs", "top_logprobs needs logprobs: true").into(),
        );
    }
    let logprobs = req.logprobs.then_some(top as usize);
    let model = model_for(&state, &req.model).await?;
    let ids = super::blocking({
        let model = model.clone();
        move || {
            let s = &model.servable;
            let prompt_text = chat_template::render(
                s.chat_template.as_deref(),
                &msgs,
                s.bos_token.as_deref(),
                s.eos_token.as_deref(),
            )
            .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
            // The template writes the special tokens itself.
            Ok(s.tokenizer
                .encode(prompt_text.as_str(), false)
                .map_err(|e| ApiError::bad_request("messages", format!("cannot tokenize: {e}")))?
                .get_ids()
                .to_vec())
        }
    })
    .await?;
    check_vocab(&model, &ids, "messages")?;
    let (requested, field) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let limit = state.engine.settings().max_tokens;
    let max_tokens = check_lengths(&model, limit, ids.len(), requested, limit, field)?;
    let choices = submit(
        state.jobs.metrics(),
        &model,
        &[ids],
        &v,
        max_tokens,
        logprobs,
        false,
    )?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let model_id = model.key.id.clone();

    if req.stream {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let meta = StreamMeta {
            id,
            created,
            model: model_id,
            include_usage,
            n: v.n,
        };
        return Ok(sse(meta, choices, ChatChunks));
    }
    let mut out = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for choice in choices {
        let index = choice.index;
        let f = gather(choice).await?;
        prompt_tokens = f.prompt_tokens;
        completion_tokens += f.completion_tokens;
        let lp = logprobs.map(|_| {
            json!({"content": f.tokens.iter().map(logprob_entry).collect::<Vec<_>>(), "refusal": null})
        });
        out.push(ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: f.text,
                refusal: None,
            },
            logprobs: lp,
            finish_reason: f.finish_reason.map(|r| r.as_str()),
        });
    }
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: model_id,
        choices: out,
        usage: Usage::new(prompt_tokens, completion_tokens),
    })
    .into_response())
}

/// Chat chunks: the assistant role first, then content deltas with their logprobs.
struct ChatChunks;

impl ChunkShape for ChatChunks {
    const OBJECT: &'static str = "chat.completion.chunk";

    fn opening(&mut self, i: usize) -> Option<Value> {
        Some(
            json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        )
    }

    fn prompt(&mut self, _: usize, _: &[TokenLogprob]) -> Option<Value> {
        None
    }

    fn token(&mut self, i: usize, text: String, token: Option<TokenLogprob>) -> Option<Value> {
        if text.is_empty() && token.is_none() {
            return None;
        }
        let lp = token
            .as_ref()
            .map(|t| json!({"content": [logprob_entry(t)], "refusal": null}));
        Some(json!({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}))
    }

    fn done(&mut self, i: usize, reason: FinishReason) -> Value {
        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()})
    }
}
