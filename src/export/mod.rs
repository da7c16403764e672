//! Artifact formats others can load: GGUF (read and write) and Hugging Face safetensors
//! folders (write), plus the manifest that lists what a job produced.

pub mod gguf;
pub mod gguf_meta;
pub mod hf;
pub mod manifest;
