//! The GPTQ tensor layout, for integer groups that have no GGML block (3- and 2-bit, asymmetric
//! 8-bit): how quantd stores them, serves them (`kernels::gptq`) and exports them.
//!
//! The layout is AutoGPTQ's and GPTQModel's, for a linear with `rows` outputs and `cols` inputs:
//! - `qweight` `[cols·bits/32, rows]` int32: the levels of each output's column, as one
//!   little-endian bit stream of `bits`-bit values along the input dimension. 32 values fill
//!   exactly `bits` words; 3-bit values cross word boundaries (AutoGPTQ's 3-bit `pack` writes
//!   the same stream).
//! - `qzeros` `[groups, rows·bits/32]` int32: each group's zero levels, one stream per group
//!   along the outputs.
//! - `scales` `[groups, rows]` f16, and `g_idx` `[cols]` int32: the group of each column.
//!
//! A weight is w = scale·(q − zero). quantd stores zeros as they are (GPTQModel's `gptq_v2`
//! convention); GPTQ v1 files store zero − 1, which the exporter writes for symmetric groups.
//! In a GGUF each part is its own tensor, named after the weight: `blk.0.attn_q.qweight`,
//! `.qzeros`, `.scales`, `.g_idx` for `blk.0.attn_q.weight`.

use half::f16;

use super::groups::{GroupFormat, GroupParams};

/// Values per `bits` 32-bit words of a stream.
pub const PACK: usize = 32;

/// The suffixes of the parts in a GGUF, in the order they are written, and their element types.
pub const PARTS: [(&str, PartType); 4] = [
    ("qweight", PartType::I32),
    ("qzeros", PartType::I32),
    ("scales", PartType::F16),
    ("g_idx", PartType::I32),
];

/// Element types of the parts of quantd's own tensor forms (here and `int8_rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    I8,
    I32,
    F16,
    F32,
}

impl PartType {
    pub fn elem_bytes(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::F16 => 2,
            Self::I32 | Self::F32 => 4,
        }
    }

    /// The GGUF tensor type a part is stored as.
    pub fn tensor_type(self) -> crate::formats::gguf::TensorType {
        use crate::formats::gguf::TensorType;
        use candle_core::quantized::GgmlDType;
        match self {
            Self::I8 => TensorType::I8,
            Self::I32 => TensorType::I32,
            Self::F16 => GgmlDType::F16.into(),
            Self::F32 => GgmlDType::F32.into(),
        }
    }
}

/// `values` (each below 2^bits) as a little-endian bit stream; `values.len()·bits` must be a
/// multiple of 32.
pub fn pack_stream(values: impl IntoIterator<Item = u32>, bits: u8, out: &mut Vec<u32>) {
    let (mut word, mut filled) = (0u64, 0u32);
    for v in values {
        word |= (v as u64) << filled;
        filled += bits as u32;
        if filled >= 32 {
            out.push(word as u32);
            word >>= 32;
            filled -= 32;
        }
    }
    debug_assert_eq!(filled, 0, "a stream must end on a word boundary");
}

/// Value `i` of a `bits`-bit stream.
#[inline]
pub fn stream_value(words: &[u32], bits: u8, i: usize) -> u32 {
    stream_value_at(|k| words[k], bits, i)
}

/// Value `i` of a `bits`-bit stream whose word `k` is `word(k)` (for streams stored strided,
/// as `qweight`'s columns are).
#[inline]
fn stream_value_at(word: impl Fn(usize) -> u32, bits: u8, i: usize) -> u32 {
    let bit = i * bits as usize;
    let (w, shift) = (bit / 32, (bit % 32) as u32);
    let mut v = (word(w) >> shift) as u64;
    if shift + bits as u32 > 32 {
        v |= (word(w + 1) as u64) << (32 - shift);
    }
    (v & ((1u64 << bits) - 1)) as u32
}

/// One linear in the GPTQ layout (see the module header).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedLinear {
    pub bits: u8,
    pub rows: usize,
    pub cols: usize,
    pub qweight: Vec<u32>,
    pub qzeros: Vec<u32>,
    pub scales: Vec<f16>,
    pub g_idx: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct LayoutError(pub String);

impl PackedLinear {
    /// Packs levels (row-major `[rows, cols]`) and group parameters (`[rows, groups]`) that
    /// `format` made. The shape must fit ([`GroupFormat::fits_layout`]).
    pub fn from_levels(
        format: GroupFormat,
        rows: usize,
        cols: usize,
        levels: &[u32],
        params: &[GroupParams],
    ) -> Self {
        assert!(format.fits_layout(rows, cols), "{rows}x{cols} does not fit");
        let bits = format.bits;
        let g = format.group_len(cols);
        let groups = cols.div_ceil(g);
        let words_per_col = cols * bits as usize / 32;
        let mut per_output = Vec::with_capacity(words_per_col);
        let mut qweight = vec![0u32; words_per_col * rows];
        for r in 0..rows {
            per_output.clear();
            pack_stream(
                levels[r * cols..(r + 1) * cols].iter().copied(),
                bits,
                &mut per_output,
            );
            for (k, &w) in per_output.iter().enumerate() {
                qweight[k * rows + r] = w;
            }
        }
        let mut qzeros = Vec::with_capacity(groups * rows * bits as usize / 32);
        let mut scales = Vec::with_capacity(groups * rows);
        for gi in 0..groups {
            pack_stream(
                (0..rows).map(|r| params[r * groups + gi].z),
                bits,
                &mut qzeros,
            );
            scales.extend((0..rows).map(|r| f16::from_f32(params[r * groups + gi].d)));
        }
        Self {
            bits,
            rows,
            cols,
            qweight,
            qzeros,
            scales,
            g_idx: (0..cols).map(|c| (c / g) as u32).collect(),
        }
    }

    pub fn groups(&self) -> usize {
        self.scales.len() / self.rows
    }

    /// Row-major shapes of the parts, in [`PARTS`] order.
    pub fn part_shapes(bits: u8, rows: usize, cols: usize, groups: usize) -> [Vec<usize>; 4] {
        let b = bits as usize;
        [
            vec![cols * b / 32, rows],
            vec![groups, rows * b / 32],
            vec![groups, rows],
            vec![cols],
        ]
    }

    /// The parts' little-endian bytes, concatenated in [`PARTS`] order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.stored_bytes());
        for w in self.qweight.iter().chain(&self.qzeros) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for s in &self.scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        for g in &self.g_idx {
            out.extend_from_slice(&g.to_le_bytes());
        }
        out
    }

    /// Byte lengths of the parts for these shapes, in [`PARTS`] order.
    pub fn part_lengths(bits: u8, rows: usize, cols: usize, groups: usize) -> [usize; 4] {
        let shapes = Self::part_shapes(bits, rows, cols, groups);
        std::array::from_fn(|i| shapes[i].iter().product::<usize>() * PARTS[i].1.elem_bytes())
    }

    pub fn stored_bytes(&self) -> usize {
        Self::part_lengths(self.bits, self.rows, self.cols, self.groups())
            .iter()
            .sum()
    }

    /// Checks the parts' row-major shapes against a `[rows, cols]` weight and each other;
    /// returns the bits and the number of groups.
    pub fn check_shapes(
        rows: usize,
        cols: usize,
        shapes: [&[usize]; 4],
    ) -> Result<(u8, usize), LayoutError> {
        let err = |m: String| Err(LayoutError(m));
        let [qw_shape, _, sc_shape, _] = shapes;
        if cols == 0 || rows == 0 || !cols.is_multiple_of(PACK) {
            return err(format!(
                "a {rows}x{cols} weight does not fit the GPTQ layout (inputs must be a multiple of 32)"
            ));
        }
        let bits = match qw_shape {
            [words, r] if *r == rows && (words * 32).is_multiple_of(cols) => words * 32 / cols,
            _ => {
                return err(format!(
                    "qweight shape {qw_shape:?} does not fit {rows}x{cols}"
                ))
            }
        };
        if ![2, 3, 4, 8].contains(&bits) {
            return err(format!(
                "qweight holds {bits}-bit values; 2, 3, 4 or 8 are supported"
            ));
        }
        let groups = match sc_shape {
            [g, r] if *r == rows && *g > 0 && *g <= cols => *g,
            _ => {
                return err(format!(
                    "scales shape {sc_shape:?} does not fit {rows} outputs"
                ))
            }
        };
        let bits = bits as u8;
        let want = Self::part_shapes(bits, rows, cols, groups);
        for ((name, _), (want, got)) in PARTS.iter().zip(want.iter().zip(shapes)) {
            if want.as_slice() != got {
                return err(format!("{name} has shape {got:?}, expected {want:?}"));
            }
        }
        Ok((bits, groups))
    }

    /// Reads the parts of a `[rows, cols]` weight from their bytes and row-major shapes (as a
    /// GGUF or safetensors file holds them), checking that they agree with each other.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        parts: [(&[usize], &[u8]); 4],
    ) -> Result<Self, LayoutError> {
        let err = |m: String| Err(LayoutError(m));
        let (bits, groups) = Self::check_shapes(rows, cols, parts.map(|p| p.0))?;
        let [qw, qz, sc, gi] = parts.map(|p| p.1);
        let lengths = Self::part_lengths(bits, rows, cols, groups);
        for ((name, _), (want, got)) in
            PARTS
                .iter()
                .zip(lengths.iter().zip([qw.len(), qz.len(), sc.len(), gi.len()]))
        {
            if *want != got {
                return err(format!("{name} has {got} bytes, expected {want}"));
            }
        }
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let g_idx = words(gi);
        if let Some((c, g)) = g_idx
            .iter()
            .enumerate()
            .find(|(_, &g)| g as usize >= groups)
        {
            return err(format!("g_idx[{c}] = {g}, but there are {groups} groups"));
        }
        let scales: Vec<f16> = sc
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return err(format!("scales[{i}] is not finite"));
        }
        Ok(Self {
            bits,
            rows,
            cols,
            qweight: words(qw),
            qzeros: words(qz),
            scales,
            g_idx,
        })
    }

    /// The zero level of output `r` in group `g`.
    #[inline]
    pub fn zero(&self, g: usize, r: usize) -> u32 {
        let per_group = self.rows * self.bits as usize / 32;
        stream_value(&self.qzeros[g * per_group..], self.bits, r)
    }

    /// The level of output `r`, input `c`.
    #[inline]
    pub fn level(&self, r: usize, c: usize) -> u32 {
        stream_value_at(|k| self.qweight[k * self.rows + r], self.bits, c)
    }

    /// The weights as f32, row-major `[rows, cols]`: scale·(q − zero) in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols, bits) = (self.rows, self.cols, self.bits as u32);
        let groups = self.groups();
        let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
        let zeros: Vec<f32> = (0..groups * rows)
            .map(|i| self.zero(i / rows, i % rows) as f32)
            .collect();
        let mask = (1u64 << bits) - 1;
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_mut(cols).enumerate() {
            // Read this output's stream word by word, `bits` at a time.
            let (mut acc, mut have, mut word) = (0u64, 0u32, 0usize);
            for (c, v) in row.iter_mut().enumerate() {
                if have < bits {
                    acc |= (self.qweight[word * rows + r] as u64) << have;
                    have += 32;
                    word += 1;
                }
                let q = (acc & mask) as f32;
                acc >>= bits;
                have -= bits;
                let g = self.g_idx[c] as usize * rows + r;
                *v = scales[g] * (q - zeros[g]);
            }
        }
        out
    }

    /// Group length when `g_idx` is column / length (groups contiguous in column order, as
    /// quantd writes them); `None` for act-order files whose `g_idx` is a permutation.
    pub fn contiguous_group_len(&self) -> Option<usize> {
        // The first group's length; the last group may be shorter.
        let g = self.g_idx.iter().take_while(|&&gi| gi == 0).count().max(1);
        let contiguous = self
            .g_idx
            .iter()
            .enumerate()
            .all(|(c, &gi)| gi as usize == c / g);
        (contiguous && self.cols.div_ceil(g) == self.groups()).then_some(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(rows: usize, cols: usize, bits: u8, seed: u32) -> Vec<u32> {
        (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) >> 7 & ((1 << bits) - 1))
            .collect()
    }

    #[test]
    fn streams_round_trip_and_match_autogptq_3bit_packing() {
        for bits in [2u8, 3, 4, 8] {
            let v = levels(1, 64, bits, bits as u32);
            let mut words = Vec::new();
            pack_stream(v.iter().copied(), bits, &mut words);
            assert_eq!(words.len(), 64 * bits as usize / 32);
            for (i, &want) in v.iter().enumerate() {
                assert_eq!(stream_value(&words, bits, i), want, "bits {bits} value {i}");
            }
        }
        // AutoGPTQ's 3-bit pack: values 0..9 at 3·j, value 10's low two bits at 30 and its top
        // bit as bit 0 of the next word, value 11 at bit 1 of that word.
        let mut v = vec![0u32; 32];
        v[10] = 0b101;
        v[11] = 0b011;
        let mut words = Vec::new();
        pack_stream(v, 3, &mut words);
        assert_eq!(words[0], 0b01 << 30);
        assert_eq!(words[1], 0b1 | (0b011 << 1));
    }

    #[test]
    fn packed_weights_dequantize_to_the_format_values_and_survive_bytes() {
        for (bits, sym, group) in [(3, false, Some(64)), (2, true, Some(32)), (8, false, None)] {
            let f = GroupFormat {
                bits,
                group_size: group,
                sym,
            };
            let (rows, cols) = (64, 192);
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 2003) as f32 / 1001.5 - 1.0) * 0.05 + 0.01)
                .collect();
            let mut all_levels = Vec::new();
            let mut all_params = Vec::new();
            for row in w.chunks(cols) {
                let (l, p) = f.round_row(row);
                all_levels.extend(l);
                all_params.extend(p);
            }
            let packed = PackedLinear::from_levels(f, rows, cols, &all_levels, &all_params);
            let g = f.group_len(cols);
            let groups = cols.div_ceil(g);
            let deq = packed.dequantize();
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(packed.level(r, c), all_levels[r * cols + c]);
                    let want =
                        f.dequantize(&all_params[r * groups + c / g], all_levels[r * cols + c]);
                    assert_eq!(deq[r * cols + c], want, "{f:?} ({r}, {c})");
                }
            }
            assert_eq!(packed.contiguous_group_len(), Some(g));
            let bytes = packed.to_bytes();
            let lens = PackedLinear::part_lengths(bits, rows, cols, groups);
            let shapes = PackedLinear::part_shapes(bits, rows, cols, groups);
            let mut at = 0;
            let slices: Vec<&[u8]> = lens
                .iter()
                .map(|&n| {
                    at += n;
                    &bytes[at - n..at]
                })
                .collect();
            let parts = std::array::from_fn(|i| (shapes[i].as_slice(), slices[i]));
            assert_eq!(PackedLinear::from_parts(rows, cols, parts).unwrap(), packed);
        }
    }

    #[test]
    fn inconsistent_parts_are_refused_by_name() {
        let f = GroupFormat {
            bits: 3,
            group_size: Some(32),
            sym: false,
        };
        let (rows, cols) = (32, 64);
        let lv = vec![1u32; rows * cols];
        let p = vec![
            GroupParams {
                d: 0.5,
                m: 0.0,
                z: 3
            };
            rows * 2
        ];
        let packed = PackedLinear::from_levels(f, rows, cols, &lv, &p);
        let bytes = packed.to_bytes();
        let lens = PackedLinear::part_lengths(3, rows, cols, 2);
        let shapes = PackedLinear::part_shapes(3, rows, cols, 2);
        let mut at = 0;
        let mut slices: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| {
                at += n;
                bytes[at - n..at].to_vec()
            })
            .collect();
        // A group index past the last group.
        slices[3][0] = 9;
        let parts = std::array::from_fn(|i| (shapes[i].as_slice(), slices[i].as_slice()));
        let e = PackedLinear::from_parts(rows, cols, parts).unwrap_err();
        assert!(e.0.contains("g_idx[0] = 9"), "{e}");
        let bad_shape = [cols, rows];
        let mut parts: [(&[usize], &[u8]); 4] =
            std::array::from_fn(|i| (shapes[i].as_slice(), slices[i].as_slice()));
        parts[0].0 = &bad_shape;
        let e = PackedLinear::from_parts(rows, cols, parts).unwrap_err();
        assert!(e.0.contains("qweight"), "{e}");
    }
}
