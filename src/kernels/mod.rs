//! quantd's own CPU kernels (DESIGN §1 `kernels/`), plugged into `nn::QLinear` through
//! `LinearKernel`: AVX2 matmuls for the GGML block types candle leaves scalar, the
//! GPTQ-layout kernel for integer groups no GGML block holds, and the int8 × int8 kernel of
//! `int8-dynamic` and `llm-int8` (AVX2 or AVX-512 VNNI, chosen at run time), and the NF4/FP4
//! table-lookup kernel, and an f16 matmul for the float tensors those methods keep.

pub mod bnb4;
pub mod dot;
pub mod f16;
pub mod gptq;
pub mod int8;
mod int8_activations;
pub mod int8_gemm;
pub mod legacy_blocks;
mod linear_kernel;
pub mod q8_activations;

use std::sync::Arc;

use candle_core::quantized::QTensor;

pub use linear_kernel::{LinearKernel, GEMM_MIN_ROWS};

/// `out[i·outputs + r]` for `inputs` activation rows and `outputs` weight rows, the weight rows
/// split over candle's thread pool (decode: few inputs, so each worker streams its own share
/// of the weights). `row(scratch, r, column)` fills `column[i]` for weight row `r`; each worker
/// makes one `scratch` for its rows.
pub(crate) fn by_output_row<S>(
    outputs: usize,
    inputs: usize,
    scratch: impl Fn() -> S + Sync,
    row: impl Fn(&mut S, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; inputs * outputs];
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(outputs, |range| {
        let (mut s, mut column) = (scratch(), vec![0f32; inputs]);
        for r in range {
            row(&mut s, r, &mut column);
            for (i, &v) in column.iter().enumerate() {
                // SAFETY: each (i, r) is written by exactly one worker; `out` outlives the
                // call (execute_chunked returns after every worker finished).
                unsafe { *(out_ptr as *mut f32).add(i * outputs + r) = v };
            }
        }
    });
    out
}

/// A faster kernel than candle's for these GGML blocks, if quantd has one.
pub fn for_ggml(weight: &Arc<QTensor>) -> Option<Arc<dyn LinearKernel>> {
    legacy_blocks::LegacyBlockMatmul::new(weight.clone())
        .map(|k| Arc::new(k) as Arc<dyn LinearKernel>)
}

/// Deterministic random matrices and a difference measure for kernel tests.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{Device, Tensor};

    /// `n` values in [-0.5, 0.5) from a fixed linear congruential sequence.
    pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// A `rows × cols` matrix of [`random_values`].
    pub fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        Tensor::from_vec(random_values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
