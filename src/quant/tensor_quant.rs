//! Quantizing one tensor to a GGML block type, and measuring what it lost (relative RMSE and
//! SNR against the f32 input). GGML blocks never cross rows, so a tensor's rows are split into
//! slices quantized in parallel: the bytes are identical to quantizing it whole, every thread
//! is busy even on the one large embedding, and memory holds one tensor at a time.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::kquants::{self, QK_K};
use super::weighted_blocks;
use crate::formats::bnb4::{self, Bnb4Weight};
use crate::formats::ggml_blocks::dequantize;
use crate::formats::groups::{GroupFormat, GroupParams};
use crate::formats::int8_rows::{Int8Rows, WeightScale};

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

/// Rows per slice: small enough to spread work, large enough that per-slice overhead vanishes.
const SLICE_ROWS: usize = 256;

/// Quantizes `data` (row-major `shape`) to `dtype` on `pool`; returns the stored bytes and the
/// error against `data`. `importance` (one value per column, from an importance matrix)
/// weights the encoders of the types that read one (`weighted_blocks::uses_importance`).
pub fn quantize_tensor(
    name: &str,
    data: &[f32],
    shape: &[usize],
    dtype: GgmlDType,
    importance: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) -> Result<(Vec<u8>, TensorError), TensorQuantError> {
    check_finite(name, data)?;
    let row_len = if shape.len() >= 2 {
        *shape.last().expect("non-empty shape")
    } else {
        data.len().max(1)
    };
    let slices: Vec<&[f32]> = data.chunks(SLICE_ROWS * row_len).collect();
    let parts: Vec<Result<(Vec<u8>, ErrorAcc), candle_core::Error>> = pool.install(|| {
        slices
            .par_iter()
            .map(|s| quantize_slice(s, row_len, dtype, importance))
            .collect()
    });
    let mut bytes = Vec::new();
    let mut acc = ErrorAcc::default();
    for part in parts {
        let (b, a) = part.map_err(|source| TensorQuantError::Candle {
            name: name.to_string(),
            source,
        })?;
        bytes.extend_from_slice(&b);
        acc.merge(a);
    }
    Ok((bytes, acc.finish()))
}

/// Round-to-nearest of `data` in integer groups, rows in parallel, encoded as the format
/// stores them (GGML blocks or the GPTQ layout); returns the bytes and the error against
/// `data`.
pub fn quantize_grouped(
    name: &str,
    data: &[f32],
    row_len: usize,
    format: GroupFormat,
    pool: &rayon::ThreadPool,
) -> Result<(Vec<u8>, TensorError), TensorQuantError> {
    check_finite(name, data)?;
    let g = format.group_len(row_len);
    let parts: Vec<(Vec<u32>, Vec<GroupParams>, ErrorAcc)> = pool.install(|| {
        data.par_chunks(SLICE_ROWS * row_len)
            .map(|slice| {
                let mut levels = Vec::with_capacity(slice.len());
                let mut params = Vec::new();
                let mut acc = ErrorAcc::default();
                for row in slice.chunks(row_len) {
                    let (l, p) = format.round_row(row);
                    for (i, (&w, &q)) in row.iter().zip(&l).enumerate() {
                        acc.add(w, format.dequantize(&p[i / g], q));
                    }
                    levels.extend(l);
                    params.extend(p);
                }
                (levels, params, acc)
            })
            .collect()
    });
    let mut levels = Vec::with_capacity(data.len());
    let mut params = Vec::new();
    let mut acc = ErrorAcc::default();
    for (l, p, a) in parts {
        levels.extend(l);
        params.extend(p);
        acc.merge(a);
    }
    let rows = data.len() / row_len;
    Ok((format.encode(&levels, &params, rows, row_len), acc.finish()))
}

/// `data` as int8 rows (`int8_rows`), encoded as stored; returns the bytes and the error.
/// Rows are independent and cheap (one absmax, one rounding), so this runs on one thread.
pub fn quantize_int8_rows(
    name: &str,
    data: &[f32],
    row_len: usize,
    scale: WeightScale,
) -> Result<(Vec<u8>, TensorError), TensorQuantError> {
    check_finite(name, data)?;
    let q = Int8Rows::quantize_with(data, data.len() / row_len, row_len, scale);
    let err = tensor_error(data, &q.dequantize());
    Ok((q.to_bytes(), err))
}

/// `data` in bitsandbytes' 4-bit blocks (`bnb4`), encoded as stored; returns the bytes and
/// the error.
pub fn quantize_bnb4(
    name: &str,
    data: &[f32],
    row_len: usize,
    format: bnb4::Format,
) -> Result<(Vec<u8>, TensorError), TensorQuantError> {
    check_finite(name, data)?;
    let q = Bnb4Weight::quantize(data, data.len() / row_len, row_len, format);
    let err = tensor_error(data, &q.dequantize());
    Ok((q.to_bytes(), err))
}

/// The error of `quantized` against `original` (same length).
pub fn tensor_error(original: &[f32], quantized: &[f32]) -> TensorError {
    let mut acc = ErrorAcc::default();
    for (&w, &q) in original.iter().zip(quantized) {
        acc.add(w, q);
    }
    acc.finish()
}

fn check_finite(name: &str, data: &[f32]) -> Result<(), TensorQuantError> {
    match data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        Some((index, &value)) => Err(TensorQuantError::NotFinite {
            name: name.to_string(),
            index,
            value,
        }),
        None => Ok(()),
    }
}

/// Quantizes whole rows and measures their error.
fn quantize_slice(
    src: &[f32],
    row_len: usize,
    dtype: GgmlDType,
    importance: Option<&[f32]>,
) -> candle_core::Result<(Vec<u8>, ErrorAcc)> {
    let mut acc = ErrorAcc::default();
    let bytes = match dtype {
        GgmlDType::F32 => {
            acc.signal = src.iter().map(|&v| (v as f64) * (v as f64)).sum();
            src.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        GgmlDType::F16 | GgmlDType::BF16 => {
            let mut bytes = Vec::with_capacity(src.len() * 2);
            for &v in src {
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
            bytes
        }
        _ => {
            let rows = src.len() / row_len;
            let weighted =
                importance.and_then(|w| weighted_blocks::quantize_rows(dtype, src, row_len, w));
            let bytes = match dtype {
                _ if weighted.is_some() => weighted.expect("checked"),
                GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
                    let mut out = Vec::with_capacity(src.len() / QK_K * dtype.type_size());
                    match dtype {
                        GgmlDType::Q4K => kquants::quantize_q4k(src, &mut out),
                        GgmlDType::Q5K => kquants::quantize_q5k(src, &mut out),
                        _ => kquants::quantize_q6k(src, &mut out),
                    }
                    out
                }
                _ => QTensor::quantize(
                    &Tensor::from_slice(src, (rows, row_len), &Device::Cpu)?,
                    dtype,
                )?
                .data()?
                .into_owned(),
            };
            let back = dequantize(&bytes, rows, row_len, dtype)?;
            for (a, b) in src.iter().zip(&back) {
                acc.add(*a, *b);
            }
            bytes
        }
    };
    Ok((bytes, acc))
}

/// Sums of squares of the signal and of the error, mergeable across slices.
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

    fn merge(&mut self, other: ErrorAcc) {
        self.signal += other.signal;
        self.noise += other.noise;
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

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn q8_0_is_accurate_and_q4_0_is_less_so() {
        let shape = [64, 256];
        let (b8, e8) = quantize_tensor(
            "w",
            &ramp(64 * 256),
            &shape,
            GgmlDType::Q8_0,
            None,
            &pool(2),
        )
        .unwrap();
        let (b4, e4) = quantize_tensor(
            "w",
            &ramp(64 * 256),
            &shape,
            GgmlDType::Q4_0,
            None,
            &pool(2),
        )
        .unwrap();
        assert_eq!(b8.len(), 64 * 256 / 32 * 34);
        assert_eq!(b4.len(), 64 * 256 / 32 * 18);
        assert!(e8.rel_rmse < 0.01, "{e8:?}");
        assert!(
            e4.rel_rmse > e8.rel_rmse * 4.0 && e4.rel_rmse < 0.15,
            "{e4:?}"
        );
    }

    #[test]
    fn slicing_rows_gives_the_same_bytes_as_quantizing_whole() {
        let (rows, cols) = (SLICE_ROWS * 3 + 17, 256);
        let data = ramp(rows * cols);
        // Q4_K goes through quantd's encoder, Q5_0 through candle's: both must slice cleanly.
        let mut whole_q4k = Vec::new();
        kquants::quantize_q4k(&data, &mut whole_q4k);
        let (sliced, _) =
            quantize_tensor("w", &data, &[rows, cols], GgmlDType::Q4K, None, &pool(2)).unwrap();
        assert_eq!(sliced, whole_q4k);
        let tensor = Tensor::from_slice(&data, (rows, cols), &Device::Cpu).unwrap();
        let whole_q5_0 = QTensor::quantize(&tensor, GgmlDType::Q5_0).unwrap();
        let (sliced, _) =
            quantize_tensor("w", &data, &[rows, cols], GgmlDType::Q5_0, None, &pool(2)).unwrap();
        assert_eq!(sliced, whole_q5_0.data().unwrap().into_owned());
    }

    #[test]
    fn non_finite_weights_fail_with_the_tensor_name() {
        let mut d = ramp(32);
        d[5] = f32::NAN;
        let e = quantize_tensor(
            "blk.0.attn_q.weight",
            &d,
            &[1, 32],
            GgmlDType::Q8_0,
            None,
            &pool(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("index 5"));
    }

    #[test]
    fn f32_is_lossless_and_f16_is_nearly_so() {
        let (_, e) =
            quantize_tensor("w", &ramp(32), &[32], GgmlDType::F32, None, &pool(1)).unwrap();
        assert_eq!(e.rel_rmse, 0.0);
        let (b, e) =
            quantize_tensor("w", &ramp(64), &[2, 32], GgmlDType::F16, None, &pool(2)).unwrap();
        assert_eq!(b.len(), 128);
        assert!(e.rel_rmse > 0.0 && e.rel_rmse < 1e-3, "{e:?}");
    }
}
