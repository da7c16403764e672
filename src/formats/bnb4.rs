//! bitsandbytes' 4-bit formats (DESIGN §4 `nf4`, `fp4`): each block of `block_size` weights
//! (along a row) keeps its absmax, and each weight the index of the nearest of 16 values in
//! [−1, 1]: NF4's normal quantiles (QLoRA) or bitsandbytes' FP4 (e2m1). Two indices share a
//! byte, the first weight in the high nibble, as bitsandbytes packs them.
//!
//! With double quantization (QLoRA §3) the absmax values are stored in 8 bits: their mean is
//! taken off (`offset`), and the rest is quantized blockwise (256 per block, each block's
//! absmax in f32) to the nearest value of bitsandbytes' signed dynamic 8-bit map. At block 64
//! that is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight, against 4.5 without.
//!
//! Quantization follows bitsandbytes' reference (`backends/default/ops.py` `quantize_4bit`):
//! x · (1/absmax), clamped to [−1, 1], bucketed by the midpoints between sorted table values
//! (a value on a midpoint goes to the lower one).
//!
//! In a GGUF a weight `blk.0.attn_q.weight` is stored as [`PARTS`] beside each other:
//! `.bnb4_weight` `[rows, cols/2]` I8 (the packed bytes), `.bnb4_code` `[16]` F32 (the table, so
//! NF4 and FP4 files differ only in it), `.bnb4_absmax` `[blocks]` F32, or I8 with double
//! quantization plus `.bnb4_absmax_scale` `[ceil(blocks/256)]`, `.bnb4_absmax_offset` `[1]` and
//! `.bnb4_absmax_code` `[256]`, all F32.

use super::gptq_layout::{LayoutError, PartType};

/// NF4's 16 values (bitsandbytes `get_4bit_type("nf4")`), ascending.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (`get_4bit_type("fp4")`): in bit-pattern order, the values
/// [0, 0.0625, 8, 12, 4, 6, 2, 3] and their negatives, divided by 12.
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// Absmax values per block of the double quantization.
pub const NESTED_BLOCK: usize = 256;

/// Block sizes bitsandbytes accepts.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Part suffixes and types; the last three exist only with double quantization, and
/// `bnb4_absmax` is I8 there.
pub const PARTS: [(&str, PartType); 6] = [
    ("bnb4_weight", PartType::I8),
    ("bnb4_code", PartType::F32),
    ("bnb4_absmax", PartType::F32),
    ("bnb4_absmax_scale", PartType::F32),
    ("bnb4_absmax_offset", PartType::F32),
    ("bnb4_absmax_code", PartType::F32),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nf4,
    Fp4,
}

impl Kind {
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4,
            Self::Fp4 => &FP4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The kind whose table this is, if any.
    pub fn of_table(code: &[f32]) -> Option<Self> {
        [Self::Nf4, Self::Fp4]
            .into_iter()
            .find(|k| k.table().as_slice() == code)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub kind: Kind,
    pub block_size: usize,
    pub double_quant: bool,
}

impl Format {
    /// Whether rows of `cols` weights split into whole blocks (and bytes).
    pub fn fits(&self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.block_size)
    }

    /// Bytes of every part of a `[rows, cols]` weight.
    pub fn stored_bytes(&self, rows: usize, cols: usize) -> usize {
        Self::part_shapes(self.double_quant, rows, cols, self.block_size)
            .iter()
            .zip(Self::parts(self.double_quant))
            .map(|(shape, (_, ty))| shape.iter().product::<usize>() * ty.elem_bytes())
            .sum()
    }

    /// Shapes of the parts present, in [`PARTS`] order.
    pub fn part_shapes(
        double_quant: bool,
        rows: usize,
        cols: usize,
        block: usize,
    ) -> Vec<Vec<usize>> {
        let blocks = rows * cols / block;
        let mut shapes = vec![vec![rows, cols / 2], vec![16], vec![blocks]];
        if double_quant {
            shapes.extend([vec![blocks.div_ceil(NESTED_BLOCK)], vec![1], vec![256]]);
        }
        shapes
    }

    /// The parts present: (suffix, type), `bnb4_absmax` as I8 with double quantization.
    pub fn parts(double_quant: bool) -> Vec<(&'static str, PartType)> {
        let mut parts: Vec<_> = PARTS[..if double_quant { 6 } else { 3 }].to_vec();
        if double_quant {
            parts[2].1 = PartType::I8;
        }
        parts
    }
}

/// The absmax of each block, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    /// absmax[b] = code[q[b]] · scale[b / 256] + offset.
    Double {
        q: Vec<u8>,
        scale: Vec<f32>,
        offset: f32,
        code: Vec<f32>,
    },
}

impl Absmax {
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::Double {
                q,
                scale,
                offset,
                code,
            } => q
                .iter()
                .enumerate()
                .map(|(b, &i)| code[i as usize] * scale[b / NESTED_BLOCK] + offset)
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4Weight {
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    /// The 16 values the indices select.
    pub code: Vec<f32>,
    /// `[rows, cols/2]`: weight 2i in the high nibble of byte i, 2i+1 in the low one.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// Index of the nearest of `sorted` values' buckets: how many midpoints lie strictly below
/// `x` (torch.bucketize, right=False).
fn bucket(midpoints: &[f32], x: f32) -> usize {
    midpoints.partition_point(|&m| m < x)
}

/// (midpoints between sorted table values, table index of each sorted position).
fn sorted_bounds(code: &[f32]) -> (Vec<f32>, Vec<usize>) {
    let mut order: Vec<usize> = (0..code.len()).collect();
    order.sort_by(|&a, &b| code[a].total_cmp(&code[b]));
    let mid = order
        .windows(2)
        .map(|w| (code[w[0]] + code[w[1]]) / 2.0)
        .collect();
    (mid, order)
}

impl Bnb4Weight {
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: Format) -> Self {
        assert!(format.fits(cols) && w.len() == rows * cols);
        let code = format.kind.table().to_vec();
        let (mid, order) = sorted_bounds(&code);
        let mut packed = vec![0u8; w.len() / 2];
        let mut absmax = Vec::with_capacity(w.len() / format.block_size);
        for (b, block) in w.chunks(format.block_size).enumerate() {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = 1.0 / am.max(1e-38);
            for (i, &x) in block.iter().enumerate() {
                let q = order[bucket(&mid, (x * inv).clamp(-1.0, 1.0))] as u8;
                let at = b * format.block_size + i;
                packed[at / 2] |= if at.is_multiple_of(2) { q << 4 } else { q };
            }
            absmax.push(am);
        }
        let absmax = if format.double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Self {
            rows,
            cols,
            block_size: format.block_size,
            code,
            packed,
            absmax,
        }
    }

    pub fn format(&self) -> Option<Format> {
        Some(Format {
            kind: Kind::of_table(&self.code)?,
            block_size: self.block_size,
            double_quant: matches!(self.absmax, Absmax::Double { .. }),
        })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax.values();
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (i, &byte) in self.packed.iter().enumerate() {
            let am = absmax[2 * i / self.block_size];
            out.push(self.code[(byte >> 4) as usize] * am);
            out.push(self.code[(byte & 15) as usize] * am);
        }
        out
    }

    /// The parts' little-endian bytes in [`PARTS`] order (those present).
    pub fn to_bytes(&self) -> Vec<u8> {
        let f32s = |out: &mut Vec<u8>, v: &[f32]| {
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
        let mut out = self.packed.clone();
        f32s(&mut out, &self.code);
        match &self.absmax {
            Absmax::F32(v) => f32s(&mut out, v),
            Absmax::Double {
                q,
                scale,
                offset,
                code,
            } => {
                out.extend_from_slice(q);
                f32s(&mut out, scale);
                f32s(&mut out, &[*offset]);
                f32s(&mut out, code);
            }
        }
        out
    }

    /// Reads a `[rows, cols]` weight from its parts (shape, bytes), in [`PARTS`] order: three
    /// without double quantization, six with it.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        parts: &[(&[usize], &[u8])],
    ) -> Result<Self, LayoutError> {
        let err = |m: String| Err(LayoutError(m));
        let double = match parts.len() {
            3 => false,
            6 => true,
            n => return err(format!("a bnb4 weight has 3 or 6 parts, found {n}")),
        };
        let (absmax_shape, _) = parts[2];
        let blocks = match absmax_shape {
            [b] if *b > 0 && (rows * cols).is_multiple_of(*b) => *b,
            _ => {
                return err(format!(
                    "bnb4_absmax has shape {absmax_shape:?} for a {rows}x{cols} weight"
                ))
            }
        };
        let block_size = rows * cols / blocks;
        if !BLOCK_SIZES.contains(&block_size) || !cols.is_multiple_of(block_size) {
            return err(format!("block size {block_size} (from bnb4_absmax) is not one of {BLOCK_SIZES:?} dividing the {cols} columns"));
        }
        let want = Format::part_shapes(double, rows, cols, block_size);
        let types = Format::parts(double);
        for (((name, ty), want), (shape, bytes)) in types.iter().zip(&want).zip(parts) {
            if want.as_slice() != *shape {
                return err(format!("{name} has shape {shape:?}, expected {want:?}"));
            }
            if bytes.len() != want.iter().product::<usize>() * ty.elem_bytes() {
                return err(format!(
                    "{name} holds {} bytes, expected {}",
                    bytes.len(),
                    want.iter().product::<usize>() * ty.elem_bytes()
                ));
            }
        }
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let finite = |name: &str, v: &[f32]| match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(LayoutError(format!("{name}[{i}] is not finite"))),
            None => Ok(()),
        };
        let code = f32s(parts[1].1);
        finite("bnb4_code", &code)?;
        let absmax = if double {
            let (scale, offset, nested) = (f32s(parts[3].1), f32s(parts[4].1)[0], f32s(parts[5].1));
            finite("bnb4_absmax_scale", &scale)?;
            finite("bnb4_absmax_offset", &[offset])?;
            finite("bnb4_absmax_code", &nested)?;
            Absmax::Double {
                q: parts[2].1.to_vec(),
                scale,
                offset,
                code: nested,
            }
        } else {
            let v = f32s(parts[2].1);
            finite("bnb4_absmax", &v)?;
            Absmax::F32(v)
        };
        Ok(Self {
            rows,
            cols,
            block_size,
            code,
            packed: parts[0].1.to_vec(),
            absmax,
        })
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 8-bit values with a dynamic exponent,
/// ascending. Computed in f64 and rounded to f32; bitsandbytes builds it in f32 steps, so single
/// entries may differ in the last bit (the table travels with every file, so readers use ours).
pub fn dynamic_map() -> Vec<f32> {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7 {
        let items = (1usize << i) + 1;
        let bounds: Vec<f64> = (0..items)
            .map(|k| 0.1 + 0.9 * k as f64 / (items - 1) as f64)
            .collect();
        let scale = 10f64.powi(i - 6);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    let mut out: Vec<f32> = data.into_iter().map(|v| v as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

/// QLoRA's double quantization of absmax values: the mean taken off, then blocks of 256
/// quantized to the nearest value of [`dynamic_map`] times the block's absmax.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let code = dynamic_map();
    let mut q = Vec::with_capacity(absmax.len());
    let mut scale = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
    for block in absmax.chunks(NESTED_BLOCK) {
        let centred: Vec<f32> = block.iter().map(|&v| v - offset).collect();
        let am = centred.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if am > 0.0 { 1.0 / am } else { 0.0 };
        for &v in &centred {
            q.push(nearest(&code, (v * inv).clamp(-1.0, 1.0)) as u8);
        }
        scale.push(am);
    }
    Absmax::Double {
        q,
        scale,
        offset,
        code,
    }
}

/// Index of the value of ascending `code` nearest to `x` (the lower one on a tie).
fn nearest(code: &[f32], x: f32) -> usize {
    let i = code.partition_point(|&c| c < x);
    if i == 0 {
        0
    } else if i == code.len() || x - code[i - 1] <= code[i] - x {
        i - 1
    } else {
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(kind: Kind, double_quant: bool) -> Format {
        Format {
            kind,
            block_size: 64,
            double_quant,
        }
    }

    #[test]
    fn every_table_value_is_its_own_nearest_level() {
        for kind in [Kind::Nf4, Kind::Fp4] {
            // One block holding the table (scaled by 2) four times: absmax is 2.
            let w: Vec<f32> = (0..64).map(|i| 2.0 * kind.table()[i % 16]).collect();
            let q = Bnb4Weight::quantize(&w, 1, 64, format(kind, false));
            assert_eq!(q.absmax, Absmax::F32(vec![2.0]));
            let back = q.dequantize();
            // −0 and 0 are the same weight; otherwise exact.
            assert_eq!(back, w, "{kind:?}");
            assert_eq!(q.format(), Some(format(kind, false)));
        }
    }

    #[test]
    fn values_go_to_the_nearest_level_and_midpoints_to_the_lower_one() {
        let mut w = vec![0f32; 64];
        w[0] = 1.0; // absmax 1
        w[1] = (NF4[8] + NF4[9]) / 2.0; // midpoint → lower (8)
        w[2] = (NF4[8] + NF4[9]) / 2.0 + 1e-4; // → 9
        w[3] = -0.6; // nearest −0.5251 (2)
        let q = Bnb4Weight::quantize(&w, 1, 64, format(Kind::Nf4, false));
        assert_eq!(q.packed[0], (15 << 4) | 8);
        assert_eq!(q.packed[1], (9 << 4) | 2);
    }

    #[test]
    fn the_dynamic_map_has_bitsandbytes_shape() {
        let m = dynamic_map();
        assert_eq!(m.len(), 256);
        assert_eq!((m[0], m[255]), (-0.99296875, 1.0));
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(m.contains(&0.0));
        // The smallest magnitudes: 1e-6 · 0.55 (the one mean at exponent −6).
        let smallest = m.iter().filter(|v| **v > 0.0).fold(1f32, |a, &b| a.min(b));
        assert!((smallest - 0.55e-6).abs() < 1e-12, "{smallest}");
    }

    #[test]
    fn double_quantization_keeps_absmax_within_its_8_bit_step_and_saves_bits() {
        let (rows, cols) = (64, 512);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * (1.0 + (i / 64 % 17) as f32))
            .collect();
        let plain = Bnb4Weight::quantize(&w, rows, cols, format(Kind::Nf4, false));
        let double = Bnb4Weight::quantize(&w, rows, cols, format(Kind::Nf4, true));
        let (a, b) = (plain.absmax.values(), double.absmax.values());
        // The 8-bit code's step is at most (1 − 0.1)/64 of a nested block's largest deviation
        // from the mean, so each absmax is off by at most half that.
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let spread = a.iter().fold(0f32, |m, v| m.max((v - mean).abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 0.9 / 64.0 / 2.0 * spread * 1.001,
            "absmax error {worst} of {spread}"
        );
        assert!(worst > 0.0, "the codes are lossy");
        let bits = |f: Format| f.stored_bytes(rows, cols) as f64 * 8.0 / (rows * cols) as f64;
        let (b_plain, b_double) = (
            bits(format(Kind::Nf4, false)),
            bits(format(Kind::Nf4, true)),
        );
        // 4 + 32/64, plus the 16-entry table; with double quantization 4 + 8/64 + 32/(64·256)
        // plus the offset and both tables (0.27 bits on this small weight, 0.01–0.03 on
        // SmolLM2's linears).
        let n = (rows * cols) as f64;
        assert_eq!(b_plain, 4.5 + 16.0 * 32.0 / n);
        let blocks = n / 64.0;
        let nested = (blocks / 256.0).ceil();
        let want = 4.0 + (blocks * 8.0 + nested * 32.0 + (1.0 + 16.0 + 256.0) * 32.0) / n;
        assert!((b_double - want).abs() < 1e-9, "{b_double} vs {want}");
    }

    #[test]
    fn parts_round_trip_and_bad_parts_are_named() {
        for double in [false, true] {
            let w: Vec<f32> = (0..128 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
            let f = format(Kind::Fp4, double);
            let q = Bnb4Weight::quantize(&w, 128, 64, f);
            let bytes = q.to_bytes();
            assert_eq!(bytes.len(), f.stored_bytes(128, 64));
            let shapes = Format::part_shapes(double, 128, 64, 64);
            let types = Format::parts(double);
            let mut parts = Vec::new();
            let mut at = 0;
            for (shape, (_, ty)) in shapes.iter().zip(&types) {
                let len = shape.iter().product::<usize>() * ty.elem_bytes();
                parts.push((shape.as_slice(), &bytes[at..at + len]));
                at += len;
            }
            let back = Bnb4Weight::from_parts(128, 64, &parts).unwrap();
            assert_eq!(back, q);
            assert_eq!(back.format(), Some(f));
            let mut bad = parts.clone();
            let wrong = [128usize, 64];
            bad[0].0 = &wrong;
            let e = Bnb4Weight::from_parts(128, 64, &bad).unwrap_err();
            assert!(e.0.contains("bnb4_weight"), "{}", e.0);
        }
    }
}
