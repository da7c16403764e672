//! Matrix × activations for GGML's Q4_1, Q5_0 and Q5_1 blocks, which candle runs with scalar
//! code only (its AVX2 kernels cover Q4_0, Q8_0 and the k-quants). llama.cpp's k-quant mixes
//! fall back to Q5_0/Q5_1 whenever a row is not a multiple of 256 (every SmolLM2 tensor), so
//! without these kernels a "Q4_K_M" model would decode at scalar speed.
//!
//! The arithmetic is ggml's (`ggml_vec_dot_q5_0_q8_0` and friends): activations quantized per
//! 32 values to 8 bits with one scale, integer dot products per block, one multiply-add per
//! block in f32. Activation scales stay in f32 (ggml rounds them to f16), so results agree with
//! the dequantized weights to within the 8-bit activation rounding.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

use super::by_output_row;
use super::q8_activations::{quantize_row, ActBlock, QK};
use crate::kernels::LinearKernel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Q4_1,
    Q5_0,
    Q5_1,
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
        }
    }
}

fn read_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Reference dot product of one weight row with one activation row.
fn dot_scalar(kind: Kind, w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (blk, act) in w.chunks_exact(kind.block_bytes()).zip(a) {
        let d = read_f16(blk);
        let (m, qh, qs) = match kind {
            Kind::Q4_1 => (read_f16(&blk[2..]), 0u32, &blk[4..20]),
            Kind::Q5_0 => (
                0.0,
                u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                &blk[6..22],
            ),
            Kind::Q5_1 => (
                read_f16(&blk[2..]),
                u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]),
                &blk[8..24],
            ),
        };
        let mut sum = 0i32;
        for (j, &q) in qs.iter().enumerate() {
            let hi_lo = ((qh >> j) & 1) << 4;
            let hi_hi = ((qh >> (j + 16)) & 1) << 4;
            let (mut lo, mut hi) = (
                (q & 0x0f) as i32 | hi_lo as i32,
                (q >> 4) as i32 | hi_hi as i32,
            );
            if kind == Kind::Q5_0 {
                lo -= 16;
                hi -= 16;
            }
            sum += lo * act.qs[j] as i32 + hi * act.qs[j + QK / 2] as i32;
        }
        acc += d * act.d * sum as f32 + m * act.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::kernels::q8_activations::x86::{hsum, mul_sum_i8, mul_sum_us8};
    use std::arch::x86_64::*;

    /// 32 nibbles → 32 bytes (low nibbles first, as GGML lays them out).
    #[inline(always)]
    unsafe fn bytes_from_nibbles_32(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(_mm256_set1_epi8(0x0f), bytes)
    }

    /// 32 bits → 32 bytes of 0xFF (bit set) or 0x00.
    #[inline(always)]
    unsafe fn bytes_from_bits_32(p: *const u8) -> __m256i {
        let x32 = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(kind: Kind, w: &[u8], a: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0f32;
        let bb = kind.block_bytes();
        for (i, act) in a.iter().enumerate() {
            let blk = w.as_ptr().add(i * bb);
            let d = read_f16(std::slice::from_raw_parts(blk, 2));
            let qy = _mm256_loadu_si256(act.qs.as_ptr() as *const __m256i);
            let q = match kind {
                Kind::Q5_0 => {
                    let mut qx = bytes_from_nibbles_32(blk.add(6));
                    let hi =
                        _mm256_andnot_si256(bytes_from_bits_32(blk.add(2)), _mm256_set1_epi8(-16));
                    qx = _mm256_or_si256(qx, hi);
                    mul_sum_i8(qx, qy)
                }
                Kind::Q5_1 => {
                    offsets += read_f16(std::slice::from_raw_parts(blk.add(2), 2)) * act.s;
                    let qx = bytes_from_nibbles_32(blk.add(8));
                    let hi =
                        _mm256_and_si256(bytes_from_bits_32(blk.add(4)), _mm256_set1_epi8(0x10));
                    mul_sum_us8(_mm256_or_si256(qx, hi), qy)
                }
                Kind::Q4_1 => {
                    offsets += read_f16(std::slice::from_raw_parts(blk.add(2), 2)) * act.s;
                    mul_sum_us8(bytes_from_nibbles_32(blk.add(4)), qy)
                }
            };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * act.d), q, acc);
        }
        hsum(acc) + offsets
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot(kind: Kind, w: &[u8], a: &[ActBlock], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2 and FMA; slices are whole blocks.
        return unsafe { avx2::dot(kind, w, a) };
    }
    let _ = simd;
    dot_scalar(kind, w, a)
}

/// A Q4_1/Q5_0/Q5_1 weight matrix `[n, k]` kept as GGML blocks.
pub struct LegacyBlockMatmul {
    kind: Kind,
    weight: Arc<QTensor>,
    n: usize,
    k: usize,
    simd: bool,
}

impl LegacyBlockMatmul {
    /// `None` for types this kernel does not handle.
    pub fn new(weight: Arc<QTensor>) -> Option<Self> {
        let kind = Kind::of(weight.dtype())?;
        let (n, k) = weight.shape().dims2().ok()?;
        if k % QK != 0 {
            return None;
        }
        Some(Self {
            kind,
            weight,
            n,
            k,
            simd: has_avx2(),
        })
    }

    #[cfg(test)]
    fn scalar(mut self) -> Self {
        self.simd = false;
        self
    }
}

impl LinearKernel for LegacyBlockMatmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("input has {k} columns, the weight {}", self.k);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let blocks = k / QK;
        let mut act = Vec::with_capacity(rows * blocks);
        for r in 0..rows {
            quantize_row(&xs[r * k..(r + 1) * k], &mut act);
        }
        let data = self.weight.data()?;
        let row_bytes = blocks * self.kind.block_bytes();
        let (kind, simd) = (self.kind, self.simd);
        let out = by_output_row(
            self.n,
            rows,
            || (),
            |_, col, column| {
                let w = &data[col * row_bytes..(col + 1) * row_bytes];
                for (v, a) in column.iter_mut().zip(act.chunks(blocks)) {
                    *v = dot(kind, w, a, simd);
                }
            },
        );
        Tensor::from_vec(out, (rows, self.n), &Device::Cpu)
    }

    fn out_features(&self) -> usize {
        self.n
    }

    fn storage_bytes(&self) -> usize {
        self.weight.storage_size_in_bytes()
    }

    fn kind(&self) -> String {
        format!("{:?}", self.weight.dtype()).to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff as diff, random};

    #[test]
    fn kernels_match_the_dequantized_weights_for_every_type() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let w = random(48, 256, 3);
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let x = random(3, 256, 11);
            let want = x.matmul(&dense.t().unwrap()).unwrap();
            let fast = LegacyBlockMatmul::new(q.clone()).unwrap();
            let slow = LegacyBlockMatmul::new(q).unwrap().scalar();
            let got = fast.forward(&x).unwrap();
            let reference = slow.forward(&x).unwrap();
            // 8-bit activations: error well under 1% of the outputs' scale (~2).
            assert!(
                diff(&got, &want) < 0.03,
                "{dtype:?} vs dense: {}",
                diff(&got, &want)
            );
            assert!(diff(&got, &reference) < 1e-4, "{dtype:?} simd vs scalar");
        }
    }

    #[test]
    fn other_types_are_not_taken() {
        let q = Arc::new(QTensor::quantize(&random(32, 256, 1), GgmlDType::Q8_0).unwrap());
        assert!(LegacyBlockMatmul::new(q).is_none());
    }
}
