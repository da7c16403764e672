//! Integer groups as GPTQ and AWQ define them, and their exact packing into GGML blocks
//! (DESIGN §4, "Exact GGML packing").
//!
//! A row is cut into groups of `group_size` columns (or is one group); each group has a scale
//! and, when asymmetric, a zero point, found as GPTQ's `Quantizer.find_params` does: the range
//! [min(w, 0), max(w, 0)] (symmetric: ±max|w|) over 2^bits − 1 steps. The scale and the minimum
//! are rounded to f16 *before* any weight is rounded, because that is what a GGML block stores:
//! what the method optimises is what is served.
//!
//! - 4-bit symmetric, q ∈ [0, 15], w = d·(q − 8): a Q4_0 block.
//! - 4-bit asymmetric, w = s·(q − z) = d·q + m with d = s, m = −s·z: a Q4_1 block.
//! - 8-bit symmetric, q ∈ [0, 255], w = d·(q − 128): a Q8_0 block (int8 q − 128).
//!
//! A group of 128 is four blocks of 32 with equal parameters, so any group length that is a
//! multiple of 32 packs exactly.
//!
//! The other formats (3- and 2-bit, asymmetric 8-bit) have no GGML block. They are stored in
//! the GPTQ layout ([`super::gptq_layout`]) with an integer zero point, w = d·(q − z), and run
//! on quantd's own kernel.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Columns per GGML block.
pub const BLOCK: usize = 32;

/// Bits, group length and symmetry of an integer format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupFormat {
    pub bits: u8,
    /// Columns per group; `None` is one group per row (per channel).
    pub group_size: Option<usize>,
    pub sym: bool,
}

/// One group's parameters, both exactly representable in f16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// The step between levels.
    pub d: f32,
    /// Asymmetric GGML blocks: the value of level 0 (−d·z rounded to f16). Otherwise unused (0).
    pub m: f32,
    /// The level that stands for zero: 2^(bits−1) when symmetric. The GPTQ layout stores it as
    /// an integer; a Q4_1 block stores `m` instead.
    pub z: u32,
}

impl GroupFormat {
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// The level that stands for zero in a symmetric group.
    fn sym_zero(&self) -> f32 {
        (1u32 << (self.bits - 1)) as f32
    }

    /// Whether tensors in this format are stored in the GPTQ layout rather than GGML blocks.
    pub fn uses_layout(&self) -> bool {
        self.ggml_dtype().is_none()
    }

    /// Whether a `[rows, cols]` weight fits the GPTQ layout: columns pack 32 to `bits` words,
    /// and one group's zero points of all rows into whole words.
    pub fn fits_layout(&self, rows: usize, cols: usize) -> bool {
        cols.is_multiple_of(BLOCK)
            && (rows * self.bits as usize).is_multiple_of(32)
            && self.group_len(cols).is_multiple_of(BLOCK)
    }

    /// The GGML block type these groups pack into exactly, if one exists.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match (self.bits, self.sym) {
            (4, true) => Some(GgmlDType::Q4_0),
            (4, false) => Some(GgmlDType::Q4_1),
            (8, true) => Some(GgmlDType::Q8_0),
            _ => None,
        }
    }

    /// Columns per group for rows of `row_len`.
    pub fn group_len(&self, row_len: usize) -> usize {
        self.group_size.unwrap_or(row_len).min(row_len)
    }

    /// Whether rows of `row_len` pack into GGML blocks: every group, the last one included,
    /// must be whole blocks.
    pub fn packs(&self, row_len: usize) -> bool {
        self.ggml_dtype().is_some()
            && row_len.is_multiple_of(BLOCK)
            && self.group_len(row_len).is_multiple_of(BLOCK)
    }

    /// GPTQ's `find_params` on one group, with d (and m) rounded to f16.
    pub fn params(&self, w: &[f32]) -> GroupParams {
        let mut lo = w.iter().copied().fold(0f32, f32::min);
        let mut hi = w.iter().copied().fold(0f32, f32::max);
        if self.sym {
            hi = hi.max(-lo);
            lo = -hi;
        }
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let maxq = self.maxq() as f32;
        let d = f16::from_f32((hi - lo) / maxq).to_f32();
        if self.sym {
            return GroupParams {
                d,
                m: 0.0,
                z: self.sym_zero() as u32,
            };
        }
        let zero = if d > 0.0 { (-lo / d).round() } else { 0.0 };
        let zero = zero.clamp(0.0, maxq);
        GroupParams {
            d,
            m: if self.uses_layout() {
                0.0
            } else {
                f16::from_f32(-d * zero).to_f32()
            },
            z: zero as u32,
        }
    }

    /// The level of `w` in a group with `p`.
    #[inline]
    pub fn quantize(&self, p: &GroupParams, w: f32) -> u32 {
        let maxq = self.maxq() as f32;
        let q = if p.d == 0.0 {
            if self.sym {
                self.sym_zero()
            } else {
                0.0
            }
        } else if self.sym {
            (w / p.d).round() + self.sym_zero()
        } else if self.uses_layout() {
            (w / p.d).round() + p.z as f32
        } else {
            ((w - p.m) / p.d).round()
        };
        q.clamp(0.0, maxq) as u32
    }

    /// The value level `q` stands for, computed as ggml's dequantization (GGML blocks) or
    /// quantd's GPTQ-layout kernel does.
    #[inline]
    pub fn dequantize(&self, p: &GroupParams, q: u32) -> f32 {
        if self.sym {
            (q as f32 - self.sym_zero()) * p.d
        } else if self.uses_layout() {
            (q as f32 - p.z as f32) * p.d
        } else {
            q as f32 * p.d + p.m
        }
    }

    /// Round-to-nearest of one row: its levels and each group's parameters.
    pub fn round_row(&self, row: &[f32]) -> (Vec<u32>, Vec<GroupParams>) {
        let g = self.group_len(row.len());
        let mut levels = Vec::with_capacity(row.len());
        let mut params = Vec::with_capacity(row.len().div_ceil(g));
        for group in row.chunks(g) {
            let p = self.params(group);
            levels.extend(group.iter().map(|&w| self.quantize(&p, w)));
            params.push(p);
        }
        (levels, params)
    }

    /// The stored bytes of a `[rows, cols]` weight from its levels (row-major) and group
    /// parameters (`[rows, groups]`): GGML blocks, or the GPTQ layout's parts in
    /// [`super::gptq_layout::PackedLinear::to_bytes`] order.
    pub fn encode(
        &self,
        levels: &[u32],
        params: &[GroupParams],
        rows: usize,
        cols: usize,
    ) -> Vec<u8> {
        if self.uses_layout() {
            return super::gptq_layout::PackedLinear::from_levels(
                *self, rows, cols, levels, params,
            )
            .to_bytes();
        }
        let groups = cols.div_ceil(self.group_len(cols));
        let mut bytes = Vec::new();
        for r in 0..rows {
            self.pack_row(
                &levels[r * cols..(r + 1) * cols],
                &params[r * groups..(r + 1) * groups],
                &mut bytes,
            );
        }
        bytes
    }

    /// Appends one row of levels and group parameters as GGML blocks. The row must pack
    /// ([`GroupFormat::packs`]).
    pub fn pack_row(&self, levels: &[u32], params: &[GroupParams], out: &mut Vec<u8>) {
        let dtype = self
            .ggml_dtype()
            .expect("pack_row needs a GGML-packable format");
        let g = self.group_len(levels.len());
        for (b, block) in levels.chunks(BLOCK).enumerate() {
            let p = params[b * BLOCK / g];
            out.extend_from_slice(&f16::from_f32(p.d).to_le_bytes());
            match dtype {
                GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                    if dtype == GgmlDType::Q4_1 {
                        out.extend_from_slice(&f16::from_f32(p.m).to_le_bytes());
                    }
                    for j in 0..BLOCK / 2 {
                        out.push((block[j] | (block[j + BLOCK / 2] << 4)) as u8);
                    }
                }
                _ => out.extend(block.iter().map(|&q| (q as i32 - 128) as i8 as u8)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml_blocks::dequantize;

    fn row(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0) * 0.07 + 0.01)
            .collect()
    }

    #[test]
    fn packed_blocks_dequantize_in_ggml_to_exactly_the_group_values() {
        for (bits, sym, group) in [
            (4, true, Some(128)),
            (4, false, Some(128)),
            (4, false, Some(32)),
            (4, true, None),
            (8, true, Some(64)),
        ] {
            let f = GroupFormat {
                bits,
                group_size: group,
                sym,
            };
            // 576 columns: with groups of 128 the last group is 64 (two blocks).
            let w = row(576, bits as usize);
            assert!(f.packs(w.len()));
            let (levels, params) = f.round_row(&w);
            let mut bytes = Vec::new();
            f.pack_row(&levels, &params, &mut bytes);
            let ggml = dequantize(&bytes, 1, w.len(), f.ggml_dtype().unwrap()).unwrap();
            let g = f.group_len(w.len());
            for (i, (&got, &q)) in ggml.iter().zip(&levels).enumerate() {
                let want = f.dequantize(&params[i / g], q);
                assert_eq!(got, want, "{f:?} column {i}");
            }
        }
    }

    #[test]
    fn params_follow_gptq_find_params_with_f16_scales() {
        let f = GroupFormat {
            bits: 4,
            group_size: Some(4),
            sym: false,
        };
        // Range [min(w, 0), max(w, 0)] = [0, 1.5]: d = 1.5 / 15, z = 0.
        let p = f.params(&[0.3, 1.5, 0.7, 0.2]);
        assert_eq!(p.d, f16::from_f32(0.1).to_f32());
        assert_eq!(p.m, 0.0);
        assert_eq!(f.quantize(&p, 1.5), 15);
        // Symmetric 4-bit: d = 2·max|w| / 15, zero level 8.
        let s = GroupFormat { sym: true, ..f };
        let p = s.params(&[-0.75, 0.5, 0.0, 0.1]);
        assert_eq!(p.d, f16::from_f32(0.1).to_f32());
        assert_eq!(s.quantize(&p, 0.0), 8);
        assert_eq!(s.dequantize(&p, 8), 0.0);
        // An all-zero group gets the range [−1, 1] and stores zeros exactly.
        let z = f.params(&[0.0; 4]);
        assert_eq!(f.dequantize(&z, f.quantize(&z, 0.0)), 0.0);
    }
}
