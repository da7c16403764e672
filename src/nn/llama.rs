//! The Llama-family decoder (llama, mistral, qwen2) on candle: RMSNorm, RoPE, grouped-query
//! attention with optional q/k/v biases, SwiGLU, tied or separate output head.
//!
//! One forward call runs a batch of sequences of any lengths (prompts being prefilled next to
//! sequences decoding one token): the linear layers see all their rows stacked into one matrix,
//! so weights stream from memory once per step for the whole batch, while attention runs per
//! sequence against that sequence's own cache.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Result, Tensor};

use super::attention::causal_attention;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::QLinear;
use super::rope::Rope;
use crate::kernels::dot::dot;
use crate::kernels::int8::OutlierSnapshot;

/// Receives each linear layer's input rows, before the layer runs: `(name, [rows, in])`, the
/// name being the GGUF tensor name without `.weight` (`blk.3.attn_q`, `output`).
pub type CaptureHook<'a> = dyn FnMut(&str, &Tensor) + 'a;

pub enum Embedding {
    Dense(Tensor),
    /// Rows are dequantized on lookup; the table stays in blocks.
    Ggml(Arc<QTensor>),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(ids, 0),
            Self::Ggml(q) => q.embedding(ids),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Ggml(q) => q.storage_size_in_bytes(),
        }
    }
}

pub struct Block {
    pub attn_norm: Tensor,
    pub q: QLinear,
    pub k: QLinear,
    pub v: QLinear,
    pub o: QLinear,
    pub ffn_norm: Tensor,
    pub gate: QLinear,
    pub up: QLinear,
    pub down: QLinear,
}

impl Block {
    /// Self-attention of one whole sequence at positions `0..t`, with no cache: `h` is the
    /// normalized input `[t, hidden]`, the result `[t, heads·head_dim]` is the input of `o`.
    /// Calibration runs a layer stage by stage on stored activations through this.
    pub fn sequence_attention(&self, h: &Tensor, cfg: &ModelConfig, rope: &Rope) -> Result<Tensor> {
        let t = h.dim(0)?;
        let d = cfg.head_dim;
        let split = |m: Tensor, n: usize| -> Result<Tensor> {
            m.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = rope.apply(&split(self.q.forward(h)?, cfg.num_attention_heads)?, 0)?;
        let k = rope.apply(&split(self.k.forward(h)?, cfg.num_key_value_heads)?, 0)?;
        let v = split(self.v.forward(h)?, cfg.num_key_value_heads)?;
        causal_attention(&q, &k, &v, 0)
    }

    /// SwiGLU's product silu(gate·h) ⊙ (up·h), the input of `down`.
    pub fn ffn_activation(&self, h: &Tensor) -> Result<Tensor> {
        candle_nn::ops::silu(&self.gate.forward(h)?)? * self.up.forward(h)?
    }
}

pub struct Llama {
    pub config: ModelConfig,
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    pub output_norm: Tensor,
    pub output: QLinear,
    /// True when `output` shares its storage with the embedding table.
    pub tied_output: bool,
    pub rope: Rope,
}

/// One sequence's share of a batched forward call.
pub struct SeqStep<'a> {
    /// New tokens, after whatever `cache` already holds.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Which new positions get logits.
    pub logits: Logits,
}

/// The positions of a step whose logits are computed; the output layer is the largest matmul,
/// so generation asks for one row and scoring for just the rows it scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last new position (generation).
    Last,
    /// New positions `i..` (0 = every one: prompt logprobs; ctx/2 = perplexity's half),
    /// at least the last.
    From(usize),
}

/// One linear's LLM.int8() outlier columns over the calls so far.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerOutliers {
    /// GGUF name of the weight's layer (`blk.3.ffn_down`).
    pub tensor: String,
    #[serde(flatten)]
    pub counts: OutlierSnapshot,
}

impl Llama {
    /// Outlier columns per linear, for models served by the LLM.int8() kernel (empty for
    /// others), in layer order.
    pub fn outlier_report(&self) -> Vec<LayerOutliers> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let named = [
                ("attn_q", &b.q),
                ("attn_k", &b.k),
                ("attn_v", &b.v),
                ("attn_output", &b.o),
                ("ffn_gate", &b.gate),
                ("ffn_up", &b.up),
                ("ffn_down", &b.down),
            ];
            for (name, l) in named {
                if let Some(counts) = l.outliers() {
                    out.push(LayerOutliers {
                        tensor: format!("blk.{i}.{name}"),
                        counts,
                    });
                }
            }
        }
        out
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    pub fn vocab_size(&self) -> usize {
        self.output.out_features()
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let norm = |t: &Tensor| t.elem_count() * 4;
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                norm(&b.attn_norm)
                    + norm(&b.ffn_norm)
                    + [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                        .iter()
                        .map(|l| l.storage_bytes())
                        .sum::<usize>()
            })
            .sum();
        let output = if self.tied_output {
            0
        } else {
            self.output.storage_bytes()
        };
        self.embed.bytes() + blocks + norm(&self.output_norm) + output
    }

    /// Bytes one cached position takes (keys and values, all layers, f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.blocks.len() * self.config.num_key_value_heads * self.config.head_dim * 4
    }

    /// Runs the new tokens of every sequence, appends them to the caches, and returns per
    /// sequence the logits `[rows, vocab]`: one row (the last position) or one per new token.
    pub fn forward(
        &self,
        seqs: &mut [SeqStep<'_>],
        mut hook: Option<&mut CaptureHook<'_>>,
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        let (heads, kv_heads, head_dim) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut ids = Vec::new();
        for s in seqs.iter_mut() {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            let needed = s.cache.len() + s.tokens.len();
            if needed > self.max_positions() {
                candle_core::bail!(
                    "{needed} positions exceed the {} this model was loaded for",
                    self.max_positions()
                );
            }
            s.cache.reserve(
                self.blocks.len(),
                kv_heads,
                head_dim,
                needed,
                self.max_positions(),
            )?;
            ids.extend_from_slice(s.tokens);
        }
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, &Device::Cpu)?;
        let mut x = self.embed.forward(&ids)?;
        let eps = cfg.rms_norm_eps as f32;
        let mut capture = |name: String, t: &Tensor| {
            if let Some(h) = hook.as_deref_mut() {
                h(&name, t);
            }
        };

        for (li, block) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            for part in ["attn_q", "attn_k", "attn_v"] {
                capture(format!("blk.{li}.{part}"), &h);
            }
            let q = block.q.forward(&h)?;
            let k = block.k.forward(&h)?;
            let v = block.v.forward(&h)?;
            // Plain copies of the projections only when a sequence decodes a single token;
            // prompt chunks read the tensors directly.
            let (q_rows, k_rows, v_rows) = if seqs.iter().any(|s| s.tokens.len() == 1) {
                (
                    q.flatten_all()?.to_vec1::<f32>()?,
                    k.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                )
            } else {
                Default::default()
            };
            let (hq, hk) = (heads * head_dim, kv_heads * head_dim);
            let mut attn = vec![0f32; rows * hq];
            let mut row = 0;
            for s in seqs.iter_mut() {
                let t = s.tokens.len();
                let start = s.cache.len();
                let out = &mut attn[row * hq..(row + t) * hq];
                if t == 1 {
                    self.decode_attention(
                        li,
                        s.cache,
                        &q_rows[row * hq..(row + 1) * hq],
                        &k_rows[row * hk..(row + 1) * hk],
                        &v_rows[row * hk..(row + 1) * hk],
                        out,
                    );
                } else {
                    let split = |m: &Tensor, n: usize| -> Result<Tensor> {
                        m.narrow(0, row, t)?
                            .reshape((1, t, n, head_dim))?
                            .transpose(1, 2)?
                            .contiguous()
                    };
                    let q = self.rope.apply(&split(&q, heads)?, start)?;
                    let k = self.rope.apply(&split(&k, kv_heads)?, start)?;
                    let v = split(&v, kv_heads)?;
                    s.cache.write(
                        li,
                        &k.flatten_all()?.to_vec1::<f32>()?,
                        &v.flatten_all()?.to_vec1::<f32>()?,
                        t,
                    );
                    let (k_all, v_all) = if start == 0 {
                        (k, v)
                    } else {
                        let (k_old, v_old) = s.cache.history(li)?;
                        (Tensor::cat(&[k_old, k], 2)?, Tensor::cat(&[v_old, v], 2)?)
                    };
                    let o = causal_attention(&q, &k_all, &v_all, start)?;
                    out.copy_from_slice(&o.flatten_all()?.to_vec1::<f32>()?);
                }
                row += t;
            }
            let attn = Tensor::from_vec(attn, (rows, hq), &Device::Cpu)?;
            capture(format!("blk.{li}.attn_output"), &attn);
            x = (x + block.o.forward(&attn)?)?;

            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            capture(format!("blk.{li}.ffn_gate"), &h);
            capture(format!("blk.{li}.ffn_up"), &h);
            let act = block.ffn_activation(&h)?;
            capture(format!("blk.{li}.ffn_down"), &act);
            x = (x + block.down.forward(&act)?)?;
        }

        // Only the rows whose logits are wanted go through the (large) output layer.
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut row = 0u32;
        for s in seqs.iter_mut() {
            let t = s.tokens.len() as u32;
            let from = match s.logits {
                Logits::Last => t - 1,
                Logits::From(i) => (i as u32).min(t - 1),
            };
            wanted.extend(row + from..row + t);
            counts.push((t - from) as usize);
            row += t;
            s.cache.commit(t as usize);
        }
        let n = wanted.len();
        let x = if n == rows {
            x
        } else {
            x.index_select(&Tensor::from_vec(wanted, n, &Device::Cpu)?, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, eps)?;
        capture("output".to_string(), &x);
        let logits = self.output.forward(&x)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for c in counts {
            out.push(logits.narrow(0, start, c)?);
            start += c;
        }
        Ok(out)
    }

    /// One new position of one sequence, on plain values: RoPE, cache write, and attention
    /// over every cached position, head by head. Decoding runs this once per layer per
    /// sequence, where a tensor-op version would pay a dozen dispatches for a few microseconds
    /// of arithmetic.
    fn decode_attention(
        &self,
        layer: usize,
        cache: &mut KvCache,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) {
        let cfg = &self.config;
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let pos = cache.len();
        let mut q = q.to_vec();
        let mut k = k.to_vec();
        self.rope.rotate(&mut q, pos);
        self.rope.rotate(&mut k, pos);
        cache.write(layer, &k, v, 1);
        let (keys, values, head_stride) = cache.layer(layer);
        let n = pos + 1;
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut scores = vec![0f32; n];
        for h in 0..heads {
            let g = h / group;
            let qh = &q[h * d..(h + 1) * d];
            let kh = &keys[g * head_stride..g * head_stride + n * d];
            let mut max = f32::NEG_INFINITY;
            for (s, kj) in scores.iter_mut().zip(kh.chunks_exact(d)) {
                *s = dot(qh, kj) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[h * d..(h + 1) * d];
            o.fill(0.0);
            let vh = &values[g * head_stride..g * head_stride + n * d];
            let inv = 1.0 / sum;
            for (s, vj) in scores.iter().zip(vh.chunks_exact(d)) {
                let p = s * inv;
                for (o, x) in o.iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
        }
    }
}
