//! Matrix × activations for bitsandbytes' 4-bit weights (`formats::bnb4`, NF4 and FP4).
//!
//! Below [`GEMM_MIN_ROWS`] input rows (decode, short prompts) the kernel works as llama.cpp's
//! IQ4_NL does for its own 16-value table: activations are quantized to 8 bits in blocks of 32
//! (ggml's Q8_0, `q8_activations`), the 16 table values are held as 8-bit levels (largest
//! |value| at ±127), and each 32 weights are one `pshufb` lookup and one integer dot product,
//! scaled by absmax · table step · activation step. Double-quantized absmax values are decoded
//! per block from their 8-bit codes (code[q] · scale + offset), so the weights stay at ~4.127
//! bits in memory too. The packed bytes hold weight 2i in the high nibble and 2i+1 in the low
//! one, so activations are quantized in that order (each 32 columns as 16 even, then 16 odd).
//! The error this adds is bounded per output in the unit test (about 0.5 % RMS of the output).
//!
//! From [`GEMM_MIN_ROWS`] rows on (prompts, perplexity) the weights are dequantized exactly for
//! the call and multiplied with gemm in f32, as the GGML path does, so evaluation scores the
//! exact bitsandbytes weights.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

use super::by_output_row;
use super::q8_activations::{quantize_row, ActBlock, QK};
use crate::formats::bnb4::{Absmax, Bnb4Weight, NESTED_BLOCK};
use crate::kernels::LinearKernel;
use crate::kernels::GEMM_MIN_ROWS;

pub struct Bnb4Matmul {
    weight: Bnb4Weight,
    /// The 16 table values as 8-bit levels: `code[i] ≈ levels[i] · table_scale`, the largest
    /// |code| at ±127.
    levels: [i8; 16],
    table_scale: f32,
    /// Whether to use the AVX2 loop (the CPU has AVX2 and FMA).
    avx2: bool,
}

impl Bnb4Matmul {
    pub fn new(weight: Bnb4Weight) -> Self {
        let table_max = weight.code.iter().fold(0f32, |m, c| m.max(c.abs()));
        let table_scale = if table_max > 0.0 {
            table_max / 127.0
        } else {
            1.0
        };
        let mut levels = [0i8; 16];
        for (l, &c) in levels.iter_mut().zip(&weight.code) {
            *l = (c / table_scale).round().clamp(-127.0, 127.0) as i8;
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Self {
            weight,
            levels,
            table_scale,
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

    /// absmax · table scale for each 32-weight chunk of row `r`.
    fn chunk_scales(&self, r: usize, out: &mut [f32]) {
        let chunks_per_block = self.weight.block_size / QK;
        let blocks_per_row = self.weight.cols / self.weight.block_size;
        for (blk, chunk) in out.chunks_mut(chunks_per_block).enumerate() {
            chunk.fill(self.absmax(r * blocks_per_row + blk) * self.table_scale);
        }
    }

    /// One weight row (16 packed bytes a chunk) · one activation row, given the row's
    /// [`Self::chunk_scales`].
    #[inline]
    fn row_dot(&self, row: &[u8], act: &[ActBlock], scales: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 and FMA were detected; `row` holds 16 bytes per block of `act`,
            // and `scales` one value per block.
            return unsafe { x86::row_dot(&self.levels, row, act, scales) };
        }
        row_dot_scalar(&self.levels, row, act, scales)
    }

    /// Batches below [`GEMM_MIN_ROWS`]: activations to 8 bits in blocks of 32 (ggml's Q8_0,
    /// here in the packed order), integer dot products against the table's 8-bit levels,
    /// output rows split over candle's thread pool.
    fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.weight.rows, self.weight.cols);
        let chunks = cols / QK;
        let mut act = Vec::with_capacity(n * chunks);
        let mut packed_order = vec![0f32; cols];
        for xr in x.chunks(cols).take(n) {
            pair_order(xr, &mut packed_order);
            quantize_row(&packed_order, &mut act);
        }
        let row_bytes = cols / 2;
        by_output_row(
            rows,
            n,
            || vec![0f32; chunks],
            |scales, r, column| {
                self.chunk_scales(r, scales);
                let w = &self.weight.packed[r * row_bytes..(r + 1) * row_bytes];
                for (v, a) in column.iter_mut().zip(act.chunks(chunks)) {
                    *v = self.row_dot(w, a, scales);
                }
            },
        )
    }
}

/// Reorders each 32 columns as their 16 even columns, then their 16 odd ones: the order in
/// which a chunk's 16 bytes give their high nibbles (weights 2i), then their low ones (2i+1).
fn pair_order(x: &[f32], out: &mut [f32]) {
    for (src, dst) in x.chunks_exact(QK).zip(out.chunks_exact_mut(QK)) {
        let (even, odd) = dst.split_at_mut(QK / 2);
        for (i, pair) in src.chunks_exact(2).enumerate() {
            even[i] = pair[0];
            odd[i] = pair[1];
        }
    }
}

fn row_dot_scalar(levels: &[i8; 16], row: &[u8], act: &[ActBlock], scales: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((bytes, a), &s) in row.chunks_exact(QK / 2).zip(act).zip(scales) {
        let mut sum = 0i32;
        for (j, &b) in bytes.iter().enumerate() {
            sum += levels[(b >> 4) as usize] as i32 * a.qs[j] as i32
                + levels[(b & 15) as usize] as i32 * a.qs[QK / 2 + j] as i32;
        }
        acc += sum as f32 * (s * a.d);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActBlock, QK};
    use crate::kernels::q8_activations::x86::{hsum, mul_sum_i8};
    use std::arch::x86_64::*;

    /// The 32 table levels of one chunk's 16 bytes: high nibbles in the low lane, low nibbles
    /// in the high one; `pshufb` looks up 16 at a time in the table held in both lanes.
    #[inline(always)]
    unsafe fn chunk_levels(table: __m256i, p: *const u8) -> __m256i {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let nibble = _mm_set1_epi8(0x0f);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble);
        let low = _mm_and_si128(bytes, nibble);
        _mm256_shuffle_epi8(table, _mm256_set_m128i(low, high))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `row` holds 16 bytes per block of `act`; `scales` has one
    /// value per block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(levels: &[i8; 16], row: &[u8], act: &[ActBlock], scales: &[f32]) -> f32 {
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(levels.as_ptr() as *const __m128i));
        // Two accumulators, so consecutive chunks' multiply-adds do not wait on each other.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let pairs = act.len() / 2;
        for c in 0..pairs {
            let (i, j) = (2 * c, 2 * c + 1);
            let w0 = chunk_levels(table, row.as_ptr().add(i * QK / 2));
            let w1 = chunk_levels(table, row.as_ptr().add(j * QK / 2));
            let x0 = _mm256_loadu_si256(act[i].qs.as_ptr() as *const __m256i);
            let x1 = _mm256_loadu_si256(act[j].qs.as_ptr() as *const __m256i);
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(scales[i] * act[i].d),
                mul_sum_i8(w0, x0),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_set1_ps(scales[j] * act[j].d),
                mul_sum_i8(w1, x1),
                acc1,
            );
        }
        if act.len() % 2 == 1 {
            let i = act.len() - 1;
            let w = chunk_levels(table, row.as_ptr().add(i * QK / 2));
            let x = _mm256_loadu_si256(act[i].qs.as_ptr() as *const __m256i);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scales[i] * act[i].d), mul_sum_i8(w, x), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
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
    use crate::formats::bnb4::{Format, Kind};
    use crate::kernels::test_support::{random, random_values};

    /// Per output, the most the 8-bit path may differ from the exact product with the
    /// dequantized weights: each table value is off by at most half a level (½·ts per unit
    /// absmax) and each activation by half its block's step (½·d), so
    /// |Δy| ≤ Σ ½·ts·absmax·(|x| + ½·d) + ½·d·|w|, summed over the row.
    fn error_budget(q: &Bnb4Weight, k: &Bnb4Matmul, dense: &[f32], x: &[f32]) -> Vec<f64> {
        let (rows, cols) = (q.rows, q.cols);
        let steps: Vec<f64> = x
            .chunks(QK)
            .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0)
            .collect();
        let mut out = Vec::new();
        for xr in x.chunks(cols) {
            let row_steps = &steps[out.len() / rows * (cols / QK)..];
            for r in 0..rows {
                let mut b = 0f64;
                for c in 0..cols {
                    let absmax = k.absmax((r * cols + c) / q.block_size) as f64;
                    let d = row_steps[c / QK];
                    let half_level = 0.5 * k.table_scale as f64 * absmax;
                    b += half_level * (xr[c].abs() as f64 + 0.5 * d)
                        + 0.5 * d * dense[r * cols + c].abs() as f64;
                }
                out.push(b);
            }
        }
        out
    }

    #[test]
    fn kernel_stays_within_its_error_budget_for_both_tables_and_every_batch() {
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
            let dense_values = q.dequantize();
            let dense = Tensor::from_vec(dense_values.clone(), (rows, cols), &Device::Cpu).unwrap();
            let k = Bnb4Matmul::new(q.clone());
            for n in [1, 2, 5, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64] {
                let x = random(n, cols, 300 + n as u64);
                let got = k
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let budget = if n < GEMM_MIN_ROWS {
                    error_budget(&q, &k, &dense_values, &xs)
                } else {
                    // dequantize + gemm: only the order of f32 additions differs.
                    vec![0.0; want.len()]
                };
                let mut used = 0f64;
                for ((g, w), b) in got.iter().zip(&want).zip(&budget) {
                    let err = (g - w).abs() as f64;
                    assert!(err <= b + 1e-5 * scale as f64, "{f:?} n {n}: {err} > {b}");
                    used = used.max(err / (b + 1e-12));
                }
                // The budget is a bound, not a guess: the worst output uses a visible share.
                if n < GEMM_MIN_ROWS {
                    assert!(used > 0.01, "{f:?} n {n}: at most {used:.4} of the budget");
                    // And in aggregate: 8-bit activations and table cost under 1 % RMS.
                    let rms = |v: &mut dyn Iterator<Item = f32>| {
                        (v.map(|e| (e as f64).powi(2)).sum::<f64>() / want.len() as f64).sqrt()
                    };
                    let err = rms(&mut got.iter().zip(&want).map(|(g, w)| g - w));
                    let size = rms(&mut want.iter().copied());
                    assert!(err < 0.01 * size, "{f:?} n {n}: RMS error {err} of {size}");
                }
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
