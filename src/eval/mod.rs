//! Accuracy evaluation (DESIGN §5): perplexity by llama-perplexity's method, KL divergence
//! from a reference model and top-1 agreement, computed in a stream over windows; and the
//! speed measurement that goes beside them.

pub mod metrics;
pub mod perplexity;
pub mod speed;
pub mod text;

pub use metrics::Summary;
pub use perplexity::{evaluate, EvalError, EvalSpec};
pub use speed::Speed;
pub use text::{eval_tokens, EvalTokens};
