//! Matrix × activations for bitsandbytes' 4-bit weights (`quant::bnb4`, NF4 and FP4): a table
//! lookup per weight, one absmax per block, activations in f32.
//!
//! Per block the kernel sums table[q]·x over the block's weights and multiplies by the block's
//! absmax once; double-quantized absmax values are decoded per block from their 8-bit codes
//! (code[q] · scale + offset), so the weights stay at ~4.127 bits in memory too. The packed
//! bytes hold weight 2i in the high nibble and 2i+1 in the low one, so each call splits the
//! activations into even and odd columns once and the inner loop pairs a byte's two nibbles
//! with them. With AVX2 the 16-entry table is two 8-lane registers (`vpermps` picks within
//! one, the index's bit 3 blends between them), 16 weights per step. At or above
//! [`GEMM_MIN_ROWS`] input rows the weights are dequantized for the call and multiplied with
//! gemm, as the GGML path does.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

use crate::nn::linear::GEMM_MIN_ROWS;
use crate::nn::LinearKernel;
use crate::quant::bnb4::{Absmax, Bnb4Weight, NESTED_BLOCK};

pub struct Bnb4Matmul {
    weight: Bnb4Weight,
    table: [f32; 16],
    /// Whether to use the AVX2 loop (the CPU has AVX2 and FMA).
    avx2: bool,
}

impl Bnb4Matmul {
    pub fn new(weight: Bnb4Weight) -> Self {
        let mut table = [0f32; 16];
        table.copy_from_slice(&weight.code);
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Self {
            weight,
            table,
            avx2,
        }
    }

    /// The absmax of block `b` (flat over the weight).
    #[inline]
    fn absmax(&self, b: usize) -> f32 {
        match &self.weight.absmax {
            Absmax::F32(v) => v[b],
            Absmax::Double {
                q,
                scale,
                offset,
                code,
            } => code[q[b] as usize] * scale[b / NESTED_BLOCK] + offset,
        }
    }

    /// y = W·x for one activation row, given as its even and odd columns.
    fn gemv(&self, even: &[f32], odd: &[f32], y: &mut [f32]) {
        let w = &self.weight;
        let half_block = w.block_size / 2;
        let blocks_per_row = w.cols / w.block_size;
        let mut absmax = vec![0f32; blocks_per_row];
        for (r, yr) in y.iter_mut().enumerate() {
            let row = &w.packed[r * w.cols / 2..(r + 1) * w.cols / 2];
            for (blk, a) in absmax.iter_mut().enumerate() {
                *a = self.absmax(r * blocks_per_row + blk);
            }
            *yr = self.row_dot(row, even, odd, &absmax, half_block);
        }
    }

    /// Σ over one row's blocks of absmax · Σ table[q]·x.
    #[inline]
    fn row_dot(
        &self,
        row: &[u8],
        even: &[f32],
        odd: &[f32],
        absmax: &[f32],
        half_block: usize,
    ) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 && half_block.is_multiple_of(8) {
            // SAFETY: AVX2 and FMA were detected; `row`, `even` and `odd` hold
            // `absmax.len() · half_block` values, a multiple of 8 per block.
            return unsafe { x86::row_dot(&self.table, row, even, odd, absmax, half_block) };
        }
        row.chunks(half_block)
            .zip(even.chunks(half_block).zip(odd.chunks(half_block)))
            .zip(absmax)
            .map(|((bytes, (e, o)), &a)| {
                let sum: f32 = bytes
                    .iter()
                    .zip(e.iter().zip(o))
                    .map(|(&b, (&e, &o))| {
                        self.table[(b >> 4) as usize] * e + self.table[(b & 15) as usize] * o
                    })
                    .sum();
                sum * a
            })
            .sum()
    }

    fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.weight.rows, self.weight.cols);
        let mut out = vec![0f32; n * rows];
        let (mut even, mut odd) = (vec![0f32; cols / 2], vec![0f32; cols / 2]);
        for (xr, yr) in x.chunks(cols).zip(out.chunks_mut(rows)) {
            for (i, pair) in xr.chunks_exact(2).enumerate() {
                even[i] = pair[0];
                odd[i] = pair[1];
            }
            self.gemv(&even, &odd, yr);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 8 table values for 8 indices in [0, 16): `vpermps` in each half, bit 3 picks the half.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lookup(lo: __m256, hi: __m256, idx: __m256i) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo, idx);
        let b = _mm256_permutevar8x32_ps(hi, idx);
        let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        _mm256_blendv_ps(a, b, upper)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `row`, `even`, `odd` hold `absmax.len() · half_block` values;
    /// `half_block` is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(
        table: &[f32; 16],
        row: &[u8],
        even: &[f32],
        odd: &[f32],
        absmax: &[f32],
        half_block: usize,
    ) -> f32 {
        let lo = _mm256_loadu_ps(table.as_ptr());
        let hi = _mm256_loadu_ps(table.as_ptr().add(8));
        let nibble = _mm256_set1_epi32(15);
        // Each block's sum stays in a vector and is scaled there, so the row needs one
        // horizontal sum at its end.
        let mut acc = _mm256_setzero_ps();
        for (blk, &a) in absmax.iter().enumerate() {
            let base = blk * half_block;
            let (mut acc_e, mut acc_o) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in (base..base + half_block).step_by(8) {
                let b =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.as_ptr().add(i) as *const __m128i));
                let w_e = lookup(lo, hi, _mm256_srli_epi32::<4>(b));
                let w_o = lookup(lo, hi, _mm256_and_si256(b, nibble));
                acc_e = _mm256_fmadd_ps(w_e, _mm256_loadu_ps(even.as_ptr().add(i)), acc_e);
                acc_o = _mm256_fmadd_ps(w_o, _mm256_loadu_ps(odd.as_ptr().add(i)), acc_o);
            }
            acc = _mm256_fmadd_ps(_mm256_add_ps(acc_e, acc_o), _mm256_set1_ps(a), acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

impl CustomOp1 for Bnb4Matmul {
    fn name(&self) -> &'static str {
        "bnb4-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, cols) = layout.shape().dims2()?;
        if cols != self.weight.cols {
            candle_core::bail!(
                "bnb4 kernel: input has {cols} columns, weight {}",
                self.weight.cols
            );
        }
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("bnb4 kernel: input must be contiguous f32");
        };
        let y = self.matmul(&data[start..end], n);
        Ok((CpuStorage::F32(y), Shape::from((n, self.weight.rows))))
    }
}

impl LinearKernel for Bnb4Matmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n >= GEMM_MIN_ROWS {
            // Transient: the f32 copy lives for this call only.
            let w = Tensor::from_vec(
                self.weight.dequantize(),
                (self.weight.rows, self.weight.cols),
                &Device::Cpu,
            )?;
            return x.matmul(&w.t()?);
        }
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn out_features(&self) -> usize {
        self.weight.rows
    }

    fn storage_bytes(&self) -> usize {
        let w = &self.weight;
        let absmax = match &w.absmax {
            Absmax::F32(v) => v.len() * 4,
            Absmax::Double { q, scale, code, .. } => q.len() + (scale.len() + code.len() + 1) * 4,
        };
        w.packed.len() + absmax + 64
    }

    fn kind(&self) -> String {
        match self.weight.format() {
            Some(f) if f.double_quant => format!("{}-dq", f.kind.name()),
            Some(f) => f.kind.name().to_string(),
            None => "bnb4".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{random, random_values};
    use crate::quant::bnb4::{Format, Kind};

    #[test]
    fn kernel_equals_the_dequantized_weights_for_both_tables_and_every_batch() {
        for (kind, block, double_quant) in [
            (Kind::Nf4, 64, false),
            (Kind::Nf4, 64, true),
            (Kind::Fp4, 32, true),
            (Kind::Fp4, 128, false),
        ] {
            let (rows, cols) = (37, 384);
            let w = random_values(rows * cols, 21);
            let f = Format {
                kind,
                block_size: block,
                double_quant,
            };
            let q = Bnb4Weight::quantize(&w, rows, cols, f);
            let dense = Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu).unwrap();
            let k = Bnb4Matmul::new(q);
            for n in [1, 2, 5, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64] {
                let x = random(n, cols, 300 + n as u64);
                let got = k.forward(&x).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = crate::nn::test_support::max_abs_diff(&got, &want);
                // Only the order of f32 additions differs.
                assert!(diff <= 1e-5 * scale.max(1.0), "{f:?} n {n}: {diff}");
            }
        }
    }

    #[test]
    fn the_avx2_loop_and_the_scalar_loop_agree() {
        let w = random_values(8 * 256, 4);
        let f = Format {
            kind: Kind::Nf4,
            block_size: 64,
            double_quant: false,
        };
        let mut k = Bnb4Matmul::new(Bnb4Weight::quantize(&w, 8, 256, f));
        let x = random_values(3 * 256, 5);
        let a = k.matmul(&x, 3);
        k.avx2 = false;
        let b = k.matmul(&x, 3);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff < 1e-5, "{diff}");
    }
}
