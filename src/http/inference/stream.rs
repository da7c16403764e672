//! The SSE side both endpoints share: merging the choices' event streams, counting usage (each
//! prompt once, whatever `n` is), the final usage chunk, the error event when the engine stops
//! early or the model is deleted mid-stream, and `data: [DONE]`. Each endpoint supplies only the shape of its chunks.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{usage_json, Choice};
use crate::engine::{FinishReason, TokenLogprob};

/// Turns one choice's events into the `choices` array of a chunk (`None`: nothing to send).
pub trait ChunkShape: Send + 'static {
    /// The object name of every chunk (`text_completion`, `chat.completion.chunk`).
    const OBJECT: &'static str;
    /// Sent for each choice before any event (chat's role delta).
    fn opening(&mut self, _index: usize) -> Option<Value> {
        None
    }
    fn prompt(&mut self, index: usize, scored: &[TokenLogprob]) -> Option<Value>;
    fn token(&mut self, index: usize, text: String, token: Option<TokenLogprob>) -> Option<Value>;
    fn done(&mut self, index: usize, reason: FinishReason) -> Value;
}

pub struct StreamMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    /// Choices per prompt, so usage counts each prompt once.
    pub n: usize,
}

/// The error envelope as the stream's last event (the status line went out long ago).
fn error_event(message: &str, kind: &str, param: Option<&str>) -> Event {
    let err = json!({"error": {"message": message, "type": kind, "param": param, "code": null}});
    Event::default().data(err.to_string())
}

pub fn sse<S: ChunkShape>(meta: StreamMeta, choices: Vec<Choice>, mut shape: S) -> Response {
    let total = choices.len();
    let mut merged = futures::stream::select_all(choices.into_iter().map(|c| {
        let index = c.index;
        UnboundedReceiverStream::new(c.events).map(move |e| (index, e))
    }));
    let StreamMeta {
        id,
        created,
        model,
        include_usage,
        n,
    } = meta;
    let chunk = move |choices: Value, usage: Option<Value>| -> Event {
        let mut v = json!({
            "id": id, "object": S::OBJECT, "created": created, "model": model,
            "choices": choices,
        });
        if include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(v.to_string())
    };
    let body = async_stream::stream! {
        for i in 0..total {
            if let Some(c) = shape.opening(i) {
                yield Ok::<_, Infallible>(chunk(json!([c]), None));
            }
        }
        let mut finished = 0;
        let (mut prompt_tokens, mut completion_tokens) = (0usize, 0usize);
        while let Some((i, e)) = merged.next().await {
            use crate::engine::SeqEvent;
            let c = match e {
                SeqEvent::Prompt(p) => shape.prompt(i, &p),
                SeqEvent::Token { text, token } => shape.token(i, text, token),
                SeqEvent::Flush(text) => shape.token(i, text, None),
                SeqEvent::Done { finish_reason, prompt_tokens: p, completion_tokens: c } => {
                    if i % n == 0 {
                        prompt_tokens += p;
                    }
                    completion_tokens += c;
                    finished += 1;
                    Some(shape.done(i, finish_reason))
                }
                SeqEvent::Error(m) => {
                    tracing::error!(error = %m, "generation failed mid-stream");
                    yield Ok(error_event(&m, "server_error", None));
                    return;
                }
                SeqEvent::ModelGone(m) => {
                    yield Ok(error_event(&m, "not_found_error", Some("model")));
                    return;
                }
            };
            if let Some(c) = c {
                yield Ok(chunk(json!([c]), None));
            }
            if finished == total {
                break;
            }
        }
        if finished < total {
            // The engine went away mid-generation: say so instead of a clean end.
            yield Ok(error_event(
                "the engine stopped before the generation finished",
                "server_error",
                None,
            ));
            return;
        }
        if include_usage {
            yield Ok(chunk(json!([]), Some(usage_json(prompt_tokens, completion_tokens))));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).into_response()
}
