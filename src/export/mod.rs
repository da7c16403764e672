//! Artifact formats others can load: GGUF (read and write) and Hugging Face safetensors
//! folders (write), GPTQ and AWQ checkpoints of integer-group variants and bitsandbytes
//! checkpoints of NF4/FP4/int8 variants (write), plus the
//! manifest that lists what a job produced.

pub mod bnb;
pub mod gguf_meta;
pub mod gptq;
pub mod hf;
pub mod manifest;
