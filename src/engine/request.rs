//! What a caller hands the engine for one sequence, and what the engine sends back.

use tokio::sync::mpsc::UnboundedSender;

use crate::nn::sampling::SamplingParams;

/// One sequence to generate. `n` choices of an HTTP request are `n` of these.
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Strings that end the generation; they may span tokens and are not part of the text.
    pub stop: Vec<String>,
    /// `Some(k)`: each generated token's logprob plus the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Also score the prompt (for `echo` with `logprobs`).
    pub prompt_logprobs: bool,
    /// Keep going past end-of-sequence tokens (vLLM's `ignore_eos`, for benchmarks).
    pub ignore_eos: bool,
    /// Closed by the receiver when the client goes away; the engine then drops the sequence.
    pub events: UnboundedSender<SeqEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// A token with its log-probability under the model (before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub text: String,
    /// `None` for the first prompt token, which nothing predicts.
    pub logprob: Option<f32>,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string or an end-of-sequence token.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// The prompt's tokens with their logprobs (only when asked for).
    Prompt(Vec<TokenLogprob>),
    /// One sampled token: the text that became final with it (empty while a possible stop
    /// string is held back) and its logprobs when they were asked for.
    Token {
        text: String,
        token: Option<TokenLogprob>,
    },
    /// Text held back for a possible stop string, released as the sequence ends (no token).
    Flush(String),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The model was deleted while the sequence ran or waited: it ends here.
    ModelGone(String),
}
