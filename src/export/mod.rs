//! Artifact formats others can load: GGUF (read and write) and Hugging Face safetensors
//! folders (write), GPTQ and AWQ checkpoints of integer-group variants (write), plus the
//! manifest that lists what a job produced.

pub mod gguf;
pub mod gguf_meta;
pub mod gptq;
pub mod hf;
pub mod manifest;
