//! Quantizing one tensor to a GGML block type, and measuring what it lost (relative RMSE and
//! SNR against the f32 input), with memory bounded by dequantizing in row chunks.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

/// Error of a quantized tensor against its f32 source.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TensorError {
    /// ‖W − Ŵ‖ / ‖W‖.
    pub rel_rmse: f64,
    /// 10·log10(‖W‖² / ‖W − Ŵ‖²); infinite when lossless.
    pub snr_db: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TensorQuantError {
    #[error("tensor {name}: value {value} at index {index} is not finite")]
    NotFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("tensor {name}: {source}")]
    Candle {
        name: String,
        source: candle_core::Error,
    },
}

/// Rows dequantized at a time when measuring error.
const ERROR_CHUNK_ROWS: usize = 2048;

/// Quantizes `data` (row-major `shape`) to `dtype`; returns the stored bytes and the error.
pub fn quantize_tensor(
    name: &str,
    data: Vec<f32>,
    shape: &[usize],
    dtype: GgmlDType,
) -> Result<(Vec<u8>, TensorError), TensorQuantError> {
    if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(TensorQuantError::NotFinite {
            name: name.to_string(),
            index,
            value,
        });
    }
    let candle = |source| TensorQuantError::Candle {
        name: name.to_string(),
        source,
    };
    match dtype {
        GgmlDType::F32 => {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((
                bytes,
                TensorError {
                    rel_rmse: 0.0,
                    snr_db: f64::INFINITY,
                },
            ))
        }
        GgmlDType::F16 | GgmlDType::BF16 => {
            let mut acc = ErrorAcc::default();
            let mut bytes = Vec::with_capacity(data.len() * 2);
            for &v in &data {
                let (b, back) = if dtype == GgmlDType::F16 {
                    let h = half::f16::from_f32(v);
                    (h.to_le_bytes(), h.to_f32())
                } else {
                    let h = half::bf16::from_f32(v);
                    (h.to_le_bytes(), h.to_f32())
                };
                bytes.extend_from_slice(&b);
                acc.add(v, back);
            }
            Ok((bytes, acc.finish()))
        }
        _ => {
            let row_len = *shape.last().unwrap_or(&1);
            let tensor = Tensor::from_vec(data, shape, &Device::Cpu).map_err(candle)?;
            let q = QTensor::quantize(&tensor, dtype).map_err(candle)?;
            let bytes = q.data().map_err(candle)?.into_owned();
            drop(q);
            let source = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?;
            drop(tensor);
            let err = measure_error(&source, &bytes, row_len, dtype).map_err(candle)?;
            Ok((bytes, err))
        }
    }
}

/// Dequantizes `bytes` chunk by chunk and compares with `source`.
pub fn measure_error(
    source: &[f32],
    bytes: &[u8],
    row_len: usize,
    dtype: GgmlDType,
) -> candle_core::Result<TensorError> {
    let row_bytes = row_len / dtype.block_size() * dtype.type_size();
    let rows = source.len() / row_len;
    let mut acc = ErrorAcc::default();
    let mut row = 0;
    while row < rows {
        let n = ERROR_CHUNK_ROWS.min(rows - row);
        let chunk = &bytes[row * row_bytes..(row + n) * row_bytes];
        let storage = QStorage::from_data(Cow::Borrowed(chunk), &Device::Cpu, dtype)?;
        let deq = QTensor::new(storage, (n, row_len))?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in source[row * row_len..(row + n) * row_len].iter().zip(&deq) {
            acc.add(*a, *b);
        }
        row += n;
    }
    Ok(acc.finish())
}

#[derive(Default)]
struct ErrorAcc {
    signal: f64,
    noise: f64,
}

impl ErrorAcc {
    fn add(&mut self, w: f32, q: f32) {
        let (w, q) = (w as f64, q as f64);
        self.signal += w * w;
        self.noise += (w - q) * (w - q);
    }

    fn finish(self) -> TensorError {
        let rel_rmse = if self.signal > 0.0 {
            (self.noise / self.signal).sqrt()
        } else {
            0.0
        };
        let snr_db = if self.noise > 0.0 {
            10.0 * (self.signal / self.noise).log10()
        } else {
            f64::INFINITY
        };
        TensorError { rel_rmse, snr_db }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect()
    }

    #[test]
    fn q8_0_is_accurate_and_q4_0_is_less_so() {
        let shape = [64, 256];
        let (b8, e8) = quantize_tensor("w", ramp(64 * 256), &shape, GgmlDType::Q8_0).unwrap();
        let (b4, e4) = quantize_tensor("w", ramp(64 * 256), &shape, GgmlDType::Q4_0).unwrap();
        assert_eq!(b8.len(), 64 * 256 / 32 * 34);
        assert_eq!(b4.len(), 64 * 256 / 32 * 18);
        assert!(e8.rel_rmse < 0.01, "{e8:?}");
        assert!(
            e4.rel_rmse > e8.rel_rmse * 4.0 && e4.rel_rmse < 0.15,
            "{e4:?}"
        );
    }

    #[test]
    fn non_finite_weights_fail_with_the_tensor_name() {
        let mut d = ramp(32);
        d[5] = f32::NAN;
        let e = quantize_tensor("blk.0.attn_q.weight", d, &[1, 32], GgmlDType::Q8_0).unwrap_err();
        assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("index 5"));
    }

    #[test]
    fn f32_is_lossless() {
        let (_, e) = quantize_tensor("w", ramp(32), &[32], GgmlDType::F32).unwrap();
        assert_eq!(e.rel_rmse, 0.0);
    }
}
