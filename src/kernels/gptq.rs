//! Matrix × activations for weights in the GPTQ layout (`formats::gptq_layout`): 2-, 3-, 4- and
//! 8-bit integer groups with a scale and an integer zero point each, which no GGML block holds.
//!
//! Activations stay in f32 (unlike the GGML kernels, nothing is rounded to 8 bits), so results
//! equal the dequantized weights' up to the order of f32 additions. Per group, the kernel sums
//! x·q over the group's columns and applies the group's parameters once:
//! y += s·Σ x·q − s·z·Σ x. The inner loop runs over all outputs of one packed word row, which
//! the layout keeps contiguous, so it vectorises (shift, mask, convert, multiply-add). At or
//! above [`GEMM_MIN_ROWS`] input rows the weights are dequantized for the call and multiplied
//! with gemm, as the GGML path does.

use candle_core::{Device, Result, Tensor};

use crate::formats::gptq_layout::{PackedLinear, PACK};
use crate::kernels::LinearKernel;
use crate::kernels::GEMM_MIN_ROWS;

pub struct GptqMatmul {
    bits: u8,
    rows: usize,
    cols: usize,
    group_len: usize,
    /// `[groups, rows]` in f32: the scales, and scale × zero.
    scales: Vec<f32>,
    scaled_zeros: Vec<f32>,
    /// The weights as stored; the kernel reads `qweight` (`[cols·bits/32, rows]`) directly.
    packed: PackedLinear,
}

impl GptqMatmul {
    /// Gives the weights back when the groups are not contiguous in column order (act-order
    /// files with a permuted `g_idx`); those are served from dequantized weights.
    pub fn new(packed: PackedLinear) -> std::result::Result<Self, PackedLinear> {
        let Some(group_len) = packed.contiguous_group_len() else {
            return Err(packed);
        };
        let groups = packed.groups();
        let rows = packed.rows;
        let mut scales = Vec::with_capacity(groups * rows);
        let mut scaled_zeros = Vec::with_capacity(groups * rows);
        for g in 0..groups {
            for r in 0..rows {
                let s = packed.scales[g * rows + r].to_f32();
                scales.push(s);
                scaled_zeros.push(s * packed.zero(g, r) as f32);
            }
        }
        Ok(Self {
            bits: packed.bits,
            rows,
            cols: packed.cols,
            group_len,
            scales,
            scaled_zeros,
            packed,
        })
    }

    /// y = W·x for one activation row.
    fn gemv(&self, x: &[f32], y: &mut [f32], group_acc: &mut [f32]) {
        let (rows, bits) = (self.rows, self.bits as usize);
        let mask = (1u32 << bits) - 1;
        y.fill(0.0);
        for (g, c0) in (0..self.cols).step_by(self.group_len).enumerate() {
            let c1 = (c0 + self.group_len).min(self.cols);
            group_acc.fill(0.0);
            for c in (c0..c1).step_by(PACK) {
                let words = &self.packed.qweight[c / PACK * bits * rows..][..bits * rows];
                for (j, &xj) in x[c..c + PACK].iter().enumerate() {
                    let bit = j * bits;
                    let (w, shift) = (bit / 32, (bit % 32) as u32);
                    let lo = &words[w * rows..(w + 1) * rows];
                    if shift as usize + bits <= 32 {
                        for (a, &q) in group_acc.iter_mut().zip(lo) {
                            *a += xj * ((q >> shift) & mask) as f32;
                        }
                    } else {
                        // A 3-bit value split across two words.
                        let hi = &words[(w + 1) * rows..(w + 2) * rows];
                        for ((a, &l), &h) in group_acc.iter_mut().zip(lo).zip(hi) {
                            *a += xj * (((l >> shift) | (h << (32 - shift))) & mask) as f32;
                        }
                    }
                }
            }
            let sum_x: f32 = x[c0..c1].iter().sum();
            let s = &self.scales[g * rows..(g + 1) * rows];
            let sz = &self.scaled_zeros[g * rows..(g + 1) * rows];
            for (((yo, &a), &s), &sz) in y.iter_mut().zip(group_acc.iter()).zip(s).zip(sz) {
                *yo += s * a - sz * sum_x;
            }
        }
    }
}

impl LinearKernel for GptqMatmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "gptq kernel: input has {cols} columns, weight {}",
                self.cols
            );
        }
        if n >= GEMM_MIN_ROWS {
            // Transient: the f32 copy lives for this call only.
            let w = Tensor::from_vec(
                self.packed.dequantize(),
                (self.rows, self.cols),
                &Device::Cpu,
            )?;
            return x.matmul(&w.t()?);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * self.rows];
        let mut group_acc = vec![0f32; self.rows];
        for (xr, yr) in xs.chunks(cols).zip(out.chunks_mut(self.rows)) {
            self.gemv(xr, yr, &mut group_acc);
        }
        Tensor::from_vec(out, (n, self.rows), &Device::Cpu)
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn storage_bytes(&self) -> usize {
        self.packed.stored_bytes() + (self.scales.len() + self.scaled_zeros.len()) * 4
    }

    fn kind(&self) -> String {
        format!("gptq-{}bit", self.bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::groups::GroupFormat;
    use crate::kernels::test_support::{max_abs_diff, random, random_values};

    fn packed(format: GroupFormat, rows: usize, cols: usize) -> PackedLinear {
        let w = random_values(rows * cols, 11);
        let (mut levels, mut params) = (Vec::new(), Vec::new());
        for row in w.chunks(cols) {
            let (l, p) = format.round_row(row);
            levels.extend(l);
            params.extend(p);
        }
        PackedLinear::from_levels(format, rows, cols, &levels, &params)
    }

    #[test]
    fn kernel_equals_the_dequantized_weights_for_every_width_and_batch() {
        for (bits, group, sym) in [
            (3, Some(128), false),
            (3, Some(32), true),
            (2, Some(64), false),
            (8, None, false),
            (4, Some(128), false),
        ] {
            let format = GroupFormat {
                bits,
                group_size: group,
                sym,
            };
            // 320 columns: with groups of 128 the last group is 64.
            let (rows, cols) = (96, 320);
            let p = packed(format, rows, cols);
            let dense = Tensor::from_vec(p.dequantize(), (rows, cols), &Device::Cpu).unwrap();
            let Ok(k) = GptqMatmul::new(p) else {
                panic!("contiguous groups")
            };
            for n in [1, 2, 7, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64] {
                let x = random(n, cols, 100 + n as u64);
                let got = k.forward(&x).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                assert_eq!(got.dims(), &[n, rows]);
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff <= 1e-5 * scale.max(1.0), "{format:?} n {n}: {diff}");
            }
        }
    }

    #[test]
    fn permuted_groups_are_left_to_the_dense_path() {
        let format = GroupFormat {
            bits: 3,
            group_size: Some(32),
            sym: false,
        };
        let mut p = packed(format, 32, 64);
        p.g_idx.swap(0, 40);
        assert!(GptqMatmul::new(p).is_err());
    }
}
