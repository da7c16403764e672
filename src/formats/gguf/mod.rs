//! GGUF v3, the format llama.cpp loads. The reader checks every count and size against the
//! file length before allocating (DESIGN §8); the writer streams tensor data after a header
//! whose offsets are computed up front, so a whole model never sits in memory.

mod dtype;
mod reader;
mod writer;

pub use dtype::{ggml_type_from_u32, ggml_type_name, ggml_type_to_u32, tensor_bytes, TensorType};
pub use reader::{GgufError, GgufFile, GgufTensorInfo};
pub use writer::{GgufWriter, TensorDecl};

pub use candle_core::quantized::gguf_file::Value;

pub const GGUF_MAGIC: u32 = 0x4655_4747;
pub const ALIGNMENT: u64 = 32;
