//! quantd's own CPU kernels (DESIGN §1 `kernels/`), plugged into `nn::QLinear` through
//! `LinearKernel`: AVX2 matmuls for the GGML block types candle leaves scalar, the
//! GPTQ-layout kernel for integer groups no GGML block holds, and the int8 × int8 kernel of
//! `int8-dynamic` and `llm-int8` (AVX2 or AVX-512 VNNI, chosen at run time), and the NF4/FP4
//! table-lookup kernel, and an f16 matmul for the float tensors those methods keep.

pub mod bnb4;
pub mod f16;
pub mod gptq;
pub mod int8;
pub mod int8_gemm;
pub mod legacy_blocks;
pub mod q8_activations;

use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::nn::LinearKernel;

/// A faster kernel than candle's for these GGML blocks, if quantd has one.
pub fn for_ggml(weight: &Arc<QTensor>) -> Option<Arc<dyn LinearKernel>> {
    legacy_blocks::LegacyBlockMatmul::new(weight.clone())
        .map(|k| Arc::new(k) as Arc<dyn LinearKernel>)
}
