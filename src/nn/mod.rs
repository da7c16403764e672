//! The transformer forward pass on candle (DESIGN §1 `nn/`): the Llama-family decoder, the
//! `QLinear` every projection goes through (dense, GGML blocks, or quantd's own kernels),
//! per-sequence KV caches, RoPE, and capture hooks that show each linear's inputs to
//! calibration. Models are built from checkpoints by `model::servable`.

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod rope;
pub mod softmax;

pub use kv_cache::KvCache;
pub use linear::{LinearKernel, QLinear};
pub use llama::{CaptureHook, Llama, Logits, SeqStep};

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
