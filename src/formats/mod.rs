//! Byte layouts, at the bottom of the crate: what a stored tensor looks like, with its encode
//! and decode, and nothing about who makes, runs, reads or writes it. `quant` makes these
//! layouts, `kernels` run them, `model` reads them from checkpoints and `export` writes them;
//! none of those imports another for a layout. This module imports nothing else of the crate.

pub mod bnb4;
pub mod ggml_blocks;
pub mod gguf;
pub mod gptq_layout;
pub mod groups;
pub mod int8_rows;
