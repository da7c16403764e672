//! Int8 rows: the weight form of `int8-dynamic` and `llm-int8` (DESIGN §4). Each output row of
//! a linear is quantized symmetrically to int8 with its own scale, absmax / 127, the recipe of
//! PyTorch's per-channel `quantize_dynamic` weights and of bitsandbytes' `Linear8bitLt`
//! (whose `SCB` is absmax, i.e. 127 × our scale). Levels stay in [−127, 127] so the AVX2
//! kernel's sign trick cannot overflow. [`WeightScale::PerTensor`] is PyTorch's default
//! weight observer instead: one scale for the whole tensor, absmax / 127.5, levels in
//! [−128, 127] (stored as the same scale on every row); the kernel runs −128 exactly only
//! against unsigned activations (`torch`).
//!
//! In a GGUF a weight `blk.0.attn_q.weight` is two tensors: `blk.0.attn_q.int8_weight`
//! `[rows, cols]` I8 and `blk.0.attn_q.int8_scale` `[rows]` F32. llama.cpp cannot run these
//! files; they are for quantd's int8 kernel (`kernels::int8`). GGUF metadata
//! [`ACTIVATIONS_KEY`] / [`THRESHOLD_KEY`] say how that kernel quantizes activations.

use super::gptq_layout::{LayoutError, PartType};

/// Part suffixes in the order written, and their element types.
pub const PARTS: [(&str, PartType); 2] =
    [("int8_weight", PartType::I8), ("int8_scale", PartType::F32)];

/// GGUF metadata: `per_token`, `torch` or `llm-int8`.
pub const ACTIVATIONS_KEY: &str = "quantd.int8.activations";
/// GGUF metadata: LLM.int8()'s outlier threshold (f32).
pub const THRESHOLD_KEY: &str = "quantd.int8.threshold";

/// How the weights' scales are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightScale {
    /// absmax / 127 per output row (PyTorch's `per_channel_dynamic_qconfig`, bitsandbytes).
    PerChannel,
    /// One scale for the tensor, as PyTorch's default weight observer (`MinMaxObserver`, qint8,
    /// `per_tensor_symmetric`): absmax / ((127 − (−128)) / 2), levels clamped to [−128, 127].
    PerTensor,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]` in [−127, 127].
    pub levels: Vec<i8>,
    /// One per row: w ≈ scale · level.
    pub scales: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes a row-major `[rows, cols]` weight. All-zero rows get scale 0.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        let mut levels = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(rows);
        for row in w.chunks(cols) {
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = absmax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            levels.extend(
                row.iter()
                    .map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8),
            );
            scales.push(scale);
        }
        Self {
            rows,
            cols,
            levels,
            scales,
        }
    }

    /// Quantizes a row-major `[rows, cols]` weight by `scale`.
    pub fn quantize_with(w: &[f32], rows: usize, cols: usize, scale: WeightScale) -> Self {
        match scale {
            WeightScale::PerChannel => Self::quantize(w, rows, cols),
            WeightScale::PerTensor => Self::quantize_per_tensor(w, rows, cols),
        }
    }

    /// PyTorch's `quantize_per_tensor` under its default observer: scale = absmax / 127.5
    /// (float32, as the observer computes it), q = clamp(round(w / scale), −128, 127) with
    /// round half to even (`nearbyint`). An all-zero tensor gets scale 0.
    pub fn quantize_per_tensor(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = absmax / 127.5;
        let levels = w
            .iter()
            .map(|&v| {
                if scale > 0.0 {
                    (v / scale).round_ties_even().clamp(-128.0, 127.0) as i8
                } else {
                    0
                }
            })
            .collect();
        Self {
            rows,
            cols,
            levels,
            scales: vec![scale; rows],
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.levels
            .chunks(self.cols)
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| q as f32 * s))
            .collect()
    }

    pub fn part_shapes(rows: usize, cols: usize) -> [Vec<usize>; 2] {
        [vec![rows, cols], vec![rows]]
    }

    /// Bytes of both parts.
    pub fn stored_bytes(rows: usize, cols: usize) -> usize {
        rows * cols + rows * 4
    }

    /// The parts' little-endian bytes, concatenated in [`PARTS`] order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::stored_bytes(self.rows, self.cols));
        out.extend(self.levels.iter().map(|&q| q as u8));
        for s in &self.scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Reads a `[rows, cols]` weight from its parts (row-major shape and bytes).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        parts: [(&[usize], &[u8]); 2],
    ) -> Result<Self, LayoutError> {
        let want = Self::part_shapes(rows, cols);
        for (((name, _), want), (shape, _)) in PARTS.iter().zip(&want).zip(&parts) {
            if want.as_slice() != *shape {
                return Err(LayoutError(format!(
                    "{name} has shape {shape:?}, expected {want:?}"
                )));
            }
        }
        let [(_, q), (_, s)] = parts;
        if q.len() != rows * cols || s.len() != rows * 4 {
            return Err(LayoutError(format!(
                "int8 parts hold {} and {} bytes, expected {} and {}",
                q.len(),
                s.len(),
                rows * cols,
                rows * 4
            )));
        }
        // −128 (per-tensor weights) is read; whether a kernel can run it depends on how it
        // quantizes activations (`kernels::int8::check_levels`).
        let levels: Vec<i8> = q.iter().map(|&b| b as i8).collect();
        let scales: Vec<f32> = s
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(LayoutError(format!(
                "int8_scale[{i}] = {} is not a finite non-negative number",
                scales[i]
            )));
        }
        Ok(Self {
            rows,
            cols,
            levels,
            scales,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_to_absmax_over_127_and_survive_their_bytes() {
        let w = [0.5, -1.27, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0];
        let q = Int8Rows::quantize(&w, 2, 4);
        assert_eq!(q.scales, vec![0.01, 0.0]);
        assert_eq!(q.levels, vec![50, -127, 0, 1, 0, 0, 0, 0]);
        let back = q.dequantize();
        assert!((back[1] + 1.27).abs() < 1e-6);
        let bytes = q.to_bytes();
        let (lv, sc) = bytes.split_at(8);
        let read = Int8Rows::from_parts(2, 4, [(&[2, 4], lv), (&[2], sc)]).unwrap();
        assert_eq!(read, q);
    }

    #[test]
    fn per_tensor_rows_follow_pytorchs_default_observer() {
        // absmax 127.5 → scale 1: −127.5 rounds to even −128; +127.5 rounds to 128, clamped
        // to 127; 1.5 → 2 and 0.5 → 0 (half to even).
        let w = [127.5, -127.5, 1.5, 0.5, -0.0, 50.0];
        let q = Int8Rows::quantize_per_tensor(&w, 2, 3);
        assert_eq!(q.scales, vec![1.0; 2]);
        assert_eq!(q.levels, vec![127, -128, 2, 0, 0, 50]);
        let bytes = q.to_bytes();
        let (lv, sc) = bytes.split_at(6);
        let read = Int8Rows::from_parts(2, 3, [(&[2, 3], lv), (&[2], sc)]).unwrap();
        assert_eq!(read, q, "−128 survives its bytes");
        assert_eq!(
            Int8Rows::quantize_per_tensor(&[0.0; 4], 2, 2).scales,
            [0.0; 2]
        );
    }

    #[test]
    fn bad_parts_are_refused_with_the_part_named() {
        let q = Int8Rows::quantize(&[1.0; 8], 2, 4).to_bytes();
        let (lv, sc) = q.split_at(8);
        let e = Int8Rows::from_parts(2, 4, [(&[4, 2], lv), (&[2], sc)]).unwrap_err();
        assert!(e.0.contains("int8_weight"), "{}", e.0);
        let nan = f32::NAN.to_le_bytes().repeat(2);
        let e = Int8Rows::from_parts(2, 4, [(&[2, 4], lv), (&[2], &nan)]).unwrap_err();
        assert!(e.0.contains("int8_scale[0]"), "{}", e.0);
    }
}
