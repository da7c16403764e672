//! The interface between the decoder's linear layers and the kernels that run them: what a
//! kernel must answer (`LinearKernel`) and when a layer leaves block kernels for a GEMM.

use candle_core::{Result, Tensor};

use super::int8::OutlierSnapshot;

/// quantd's own kernels (INT8, NF4, ...) plug in here. Input `[rows, in]` f32, output
/// `[rows, out]` f32.
pub trait LinearKernel: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn out_features(&self) -> usize;
    /// Bytes the weights occupy in memory.
    fn storage_bytes(&self) -> usize;
    /// A short name for logs and reports ("int8-per-channel").
    fn kind(&self) -> String;
    /// LLM.int8()'s outlier columns seen so far, for kernels that split them off.
    fn outliers(&self) -> Option<OutlierSnapshot> {
        None
    }
    /// Whether one activation scale spans the whole call (PyTorch's fbgemm dynamic scheme), so
    /// a row's output depends on which other rows share the call.
    fn scale_spans_call(&self) -> bool {
        false
    }
}

/// Below this many input rows a GGML linear runs candle's block kernels (quantized activations,
/// integer dot products); at or above it, the weight is dequantized to f32 one call at a time
/// and multiplied with gemm, which is several times faster for prompt processing because
/// gemm's tiling reuses each weight value across many rows.
pub const GEMM_MIN_ROWS: usize = 32;
