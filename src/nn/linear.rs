//! `QLinear`: the one linear-layer type every projection of the decoder goes through, whatever
//! holds its weights: a dense f32/f16/bf16 matrix, GGML blocks run by candle's quantized
//! matmul, or one of quantd's own kernels behind `kernels::LinearKernel`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::kernels::int8::OutlierSnapshot;
use crate::kernels::{LinearKernel, GEMM_MIN_ROWS};

enum Weight {
    /// `[out, in]` in f32, f16 or bf16.
    Dense(Tensor),
    /// Blocks, candle's matmul for them, and quantd's own kernel where it has a faster one.
    Ggml(Arc<QTensor>, QMatMul, Option<Arc<dyn LinearKernel>>),
    Custom(Arc<dyn LinearKernel>),
}

pub struct QLinear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
}

impl QLinear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, _) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            out_features,
        })
    }

    /// GGML blocks, kept as blocks. F16 tensors stay f16 behind quantd's f16 kernel; F32 and
    /// BF16 become dense weights.
    pub fn ggml(q: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, _) = q.shape().dims2()?;
        let weight = match q.dtype() {
            // Kept in f16 (half the bytes of a dense f32 copy, shared with a tied embedding).
            GgmlDType::F16 => match crate::kernels::f16::F16Matmul::new(q.clone()) {
                Some(k) => Weight::Custom(Arc::new(k)),
                None => Weight::Dense(q.dequantize(&candle_core::Device::Cpu)?),
            },
            GgmlDType::F32 | GgmlDType::BF16 => {
                Weight::Dense(q.dequantize(&candle_core::Device::Cpu)?)
            }
            _ => Weight::Ggml(
                q.clone(),
                QMatMul::from_arc(q.clone())?,
                crate::kernels::for_ggml(&q),
            ),
        };
        Ok(Self {
            weight,
            bias,
            out_features,
        })
    }

    pub fn custom(kernel: Arc<dyn LinearKernel>, bias: Option<Tensor>) -> Self {
        Self {
            out_features: kernel.out_features(),
            weight: Weight::Custom(kernel),
            bias,
        }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[rows, in]` f32 → `[rows, out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => {
                if w.dtype() == DType::F32 {
                    x.matmul(&w.t()?)?
                } else {
                    x.to_dtype(w.dtype())?
                        .matmul(&w.t()?)?
                        .to_dtype(DType::F32)?
                }
            }
            Weight::Ggml(q, mm, fast) => {
                if x.dim(0)? >= GEMM_MIN_ROWS {
                    // Transient: the f32 copy lives for this call only.
                    let w = q.dequantize(&candle_core::Device::Cpu)?;
                    x.matmul(&w.t()?)?
                } else if let Some(k) = fast {
                    k.forward(x)?
                } else {
                    mm.forward(x)?
                }
            }
            Weight::Custom(k) => k.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn storage_bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| b.elem_count() * 4);
        bias + match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Ggml(q, _, _) => q.storage_size_in_bytes(),
            Weight::Custom(k) => k.storage_bytes(),
        }
    }

    /// Outlier columns the kernel split off so far (LLM.int8()); None for other weights.
    pub fn outliers(&self) -> Option<OutlierSnapshot> {
        match &self.weight {
            Weight::Custom(k) => k.outliers(),
            _ => None,
        }
    }

    /// See [`LinearKernel::scale_spans_call`]; false for every weight but such kernels.
    pub fn scale_spans_call(&self) -> bool {
        match &self.weight {
            Weight::Custom(k) => k.scale_spans_call(),
            _ => false,
        }
    }

    /// "f32", "q8_0", "q4k", or the custom kernel's name.
    pub fn kind(&self) -> String {
        match &self.weight {
            Weight::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
            Weight::Ggml(q, _, _) => format!("{:?}", q.dtype()).to_lowercase(),
            Weight::Custom(k) => k.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff, random};
    use candle_core::Device;

    #[test]
    fn ggml_block_path_and_gemm_path_agree_with_dense_dequantized_weights() {
        let w = random(64, 256, 1);
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let reference = QLinear::dense(q.dequantize(&Device::Cpu).unwrap(), None).unwrap();
        let lin = QLinear::ggml(q, None).unwrap();
        assert_eq!(lin.kind(), "q8_0");
        for rows in [1, 3, GEMM_MIN_ROWS, GEMM_MIN_ROWS + 5] {
            let x = random(rows, 256, 7 + rows as u64);
            let got = lin.forward(&x).unwrap();
            let want = reference.forward(&x).unwrap();
            assert_eq!(got.dims(), &[rows, 64]);
            // The block path quantizes activations to 8 bits; gemm is exact.
            let tol = if rows < GEMM_MIN_ROWS { 0.05 } else { 1e-4 };
            assert!(max_abs_diff(&got, &want) < tol, "rows {rows}");
        }
    }

    #[test]
    fn bias_is_added_per_output() {
        let w = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let lin = QLinear::dense(w, Some(b)).unwrap();
        let x = Tensor::new(&[[1f32, 1., 1.]], &Device::Cpu).unwrap();
        assert_eq!(
            lin.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2., 3., 4.]]
        );
    }
}
