//! Accuracy evaluation (DESIGN §5): perplexity by llama-perplexity's method, KL divergence
//! from a reference model and top-1 agreement, computed in a stream over windows.

pub mod metrics;
pub mod perplexity;

pub use metrics::Summary;
pub use perplexity::{evaluate, EvalSpec};
