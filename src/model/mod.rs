//! Checkpoints quantd reads: HF safetensors folders and GGUF files, their configs, tensor
//! naming, and the checks that make an upload safe to open.

pub mod checkpoint;
pub mod config;
pub mod gguf_config;
pub mod names;
pub mod safetensors;
pub mod servable;
pub mod sniff;
pub mod tokenizer_gguf;
