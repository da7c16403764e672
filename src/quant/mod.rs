//! Quantization methods: pure and synchronous (tensors in, quantized tensors and a report out).
//! `gguf`: GGML block quantization with llama.cpp's per-tensor mixes; `rtn`: integer groups
//! (GPTQ's definition) packed exactly into GGML blocks; `gptq`: the same groups chosen by GPTQ
//! on calibration inputs, layer by layer (`layerwise`); `awq`: activation-aware scales folded
//! into the previous op, clipping, then the same groups. An importance matrix (`imatrix`)
//! weights `gguf`'s block encoders (`weighted_blocks`) as llama-quantize's `--imatrix` does.
//! `int8-dynamic` and `llm-int8` store int8 rows (`formats::int8_rows`) for quantd's int8
//! kernel; `nf4` and `fp4` bitsandbytes' 4-bit blocks (`formats::bnb4`). The layouts live in
//! `formats`; this module decides what goes into them.

pub mod awq;
pub mod calibration;
pub mod data_free;
pub mod gguf_types;
pub mod gptq;
pub mod gptq_model;
pub mod imatrix;
pub mod kquants;
pub mod layerwise;
pub mod mix;
pub mod plan;
pub mod tensor_quant;
pub mod weighted_blocks;

pub use gguf_types::GgufType;
pub use plan::{Plan, PlannedTensor};
