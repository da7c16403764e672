//! Quantization methods: pure and synchronous (tensors in, quantized tensors and a report out).
//! The first method is `gguf`: GGML block quantization with llama.cpp's per-tensor mixes.

pub mod gguf_types;
pub mod kquants;
pub mod mix;
pub mod plan;
pub mod tensor_quant;

pub use gguf_types::GgufType;
pub use plan::{Plan, PlannedTensor};
