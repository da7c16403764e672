//! Linear layers whose weights are f16 (the embeddings and output head that NF4, INT8 and
//! the GPTQ layouts keep in F16, as bitsandbytes and GPTQModel do): kept as f16 in memory,
//! shared with the embedding table when the head is tied, instead of a dense f32 copy twice
//! the size. Decode reads every head weight once per token, so bytes are its speed.
//!
//! Below [`GEMM_MIN_ROWS`] input rows: one f32 dot product per output row, weights widened
//! with F16C, output rows split over candle's thread pool. From there on: the weight widened
//! to f32 for the call and multiplied with gemm, as the GGML path does.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

use super::by_output_row;
use crate::kernels::LinearKernel;
use crate::kernels::GEMM_MIN_ROWS;

pub struct F16Matmul {
    weight: Arc<QTensor>,
    rows: usize,
    cols: usize,
    /// The CPU has AVX2, FMA and F16C.
    simd: bool,
}

impl F16Matmul {
    /// `None` unless `weight` is a 2-D F16 tensor.
    pub fn new(weight: Arc<QTensor>) -> Option<Self> {
        if weight.dtype() != GgmlDType::F16 {
            return None;
        }
        let (rows, cols) = weight.shape().dims2().ok()?;
        #[cfg(target_arch = "x86_64")]
        let simd = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        Some(Self {
            weight,
            rows,
            cols,
            simd,
        })
    }

    fn row_dot(&self, w: &[u8], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: AVX2, FMA and F16C were detected; `w` holds 2 bytes per value of `x`.
            return unsafe { x86::row_dot(w, x) };
        }
        row_dot_scalar(w, x)
    }

    fn gemv(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let data = self.weight.data()?;
        let cols = self.cols;
        Ok(by_output_row(
            self.rows,
            n,
            || (),
            |_, r, column| {
                let w = &data[r * cols * 2..(r + 1) * cols * 2];
                for (v, xr) in column.iter_mut().zip(x.chunks(cols)) {
                    *v = self.row_dot(w, xr);
                }
            },
        ))
    }
}

fn row_dot_scalar(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .map(|(b, &v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::q8_activations::x86::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` holds `2 · x.len()` bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(w: &[u8], x: &[f32]) -> f32 {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let whole = x.len() / 16 * 16;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for c in (0..whole).step_by(16) {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * c) as *const __m128i));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * c + 16) as *const __m128i));
            acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(c)), acc0);
            acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(c + 8)), acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1)) + super::row_dot_scalar(&w[2 * whole..], &x[whole..])
    }
}

impl LinearKernel for F16Matmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!("f16 kernel: input has {cols} columns, weight {}", self.cols);
        }
        if n >= GEMM_MIN_ROWS {
            // Transient: the f32 copy lives for this call only.
            let w = self.weight.dequantize(&Device::Cpu)?;
            return x.matmul(&w.t()?);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        Tensor::from_vec(self.gemv(&xs, n)?, (n, self.rows), &Device::Cpu)
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn storage_bytes(&self) -> usize {
        self.weight.storage_size_in_bytes()
    }

    fn kind(&self) -> String {
        "f16".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff, random};

    #[test]
    fn equals_the_widened_f32_weights_for_every_batch_and_odd_widths() {
        for cols in [16, 37, 576] {
            let w = random(45, cols, cols as u64);
            let q = Arc::new(QTensor::quantize(&w, GgmlDType::F16).unwrap());
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let mut k = F16Matmul::new(q).unwrap();
            for simd in [k.simd, false] {
                k.simd = simd;
                for n in [1, 2, 7, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64] {
                    let x = random(n, cols, 100 + n as u64);
                    let got = k.forward(&x).unwrap();
                    let want = x.matmul(&dense.t().unwrap()).unwrap();
                    assert_eq!(got.dims(), &[n, 45]);
                    // Only the order of f32 additions differs.
                    let diff = max_abs_diff(&got, &want);
                    assert!(diff < 1e-5, "cols {cols}, n {n}, simd {simd}: {diff}");
                }
            }
        }
    }

    #[test]
    fn takes_only_f16_weights() {
        let w = random(4, 32, 1);
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            assert!(F16Matmul::new(q).is_none(), "{dtype:?}");
        }
    }
}
