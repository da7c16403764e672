//! The transformer forward pass on candle (DESIGN §1 `nn/`): the Llama-family decoder, the
//! `QLinear` every projection goes through (dense, GGML blocks, or quantd's own kernels),
//! per-sequence KV caches, RoPE, and capture hooks that show each linear's inputs to
//! calibration. Models are built from checkpoints by `model::servable`.

pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod rope;
pub mod sampling;
pub mod softmax;

pub use kv_cache::KvCache;
pub use linear::QLinear;
pub use llama::{CaptureHook, Llama, Logits, SeqStep};
