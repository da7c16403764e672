//! Rotary position embeddings: cos/sin tables built once per model from the config's theta and
//! scaling (linear, or Llama 3's per-frequency factors), applied in llama.cpp's interleaved
//! layout (llama, mistral: quantd keeps Q/K rows permuted as in GGUF) or NEOX's half-split
//! layout (qwen2).

use candle_core::{Device, Result, Tensor};

use super::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1) rotate together: llama.cpp's `LLAMA_ROPE_TYPE_NORM`.
    Interleaved,
    /// Pairs (i, i + d/2) rotate together: HF's `rotate_half`, llama.cpp's NEOX.
    Neox,
}

pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain values, for single-token decoding.
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
    half: usize,
    layout: RopeLayout,
    max_positions: usize,
}

impl Rope {
    /// `freq_factors` divide each frequency (Llama 3 scaling, GGUF `rope_freqs.weight`).
    pub fn new(
        cfg: &ModelConfig,
        freq_factors: Option<&[f32]>,
        layout: RopeLayout,
        max_positions: usize,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let linear = match &cfg.rope_scaling {
            Some(s) if s.kind == "linear" && s.factor > 0.0 => s.factor,
            _ => 1.0,
        };
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                f / factor as f64
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let p = pos as f64 / linear;
            for f in &inv_freq {
                // Angles in f64 so long contexts keep their precision, stored as f32.
                let a = p * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (max_positions, half), &Device::Cpu)?,
            sin: Tensor::from_slice(&sin, (max_positions, half), &Device::Cpu)?,
            cos_values: cos,
            sin_values: sin,
            half,
            layout,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates one position's heads in place: `x` is `[heads][head_dim]` at position `pos`
    /// (the caller checked `pos` against the table).
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        let cos = &self.cos_values[pos * half..(pos + 1) * half];
        let sin = &self.sin_values[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(2 * half) {
            for i in 0..half {
                let (a, b) = match self.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// `x`: `[1, heads, t, head_dim]` contiguous, for positions `start..start + t`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        if start + t > self.max_positions {
            candle_core::bail!(
                "position {} is beyond the {} positions this model was loaded for",
                start + t,
                self.max_positions
            );
        }
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
            RopeLayout::Neox => candle_nn::rotary_emb::rope(x, &cos, &sin),
        }
    }
}
