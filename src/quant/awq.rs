//! AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"), layer by layer, as AutoAWQ
//! implements it:
//!
//! 1. The layer runs on the calibration windows with its original weights, recording per stage
//!    the mean |x| of every input channel, a sample of inputs to score candidates on, and a
//!    strided sample of tokens for clipping. Its output is the next layer's input (AutoAWQ
//!    propagates the unquantized model).
//! 2. Per scaling group (q/k/v after the attention norm; o after v when v and o are square, as
//!    AutoAWQ skips it for grouped-query attention; gate/up after the FFN norm; down after up):
//!    s = mean|x|^α (with `duo_scaling`, divided by mean_w^(1−α) as AutoAWQ's default), scaled
//!    by 1/√(max s · min s), for α on a grid of `grid` points in [0, 1). Each candidate
//!    quantizes the group's weights as Q(W·s)/s and runs the module the group feeds (the
//!    attention through o, the whole MLP, or down alone); the α with the least squared error
//!    against the original module's output wins.
//! 3. The scales are folded: the previous norm's weight (or the previous linear's rows) is
//!    divided by s and the group's columns multiplied by s, which leaves the float model's
//!    output unchanged.
//! 4. Clipping: for every linear but q and k (whose errors the attention scores amplify), each
//!    group's range is shrunk to the max|w|·(1 − i/grid), i < grid/2, that best preserves the
//!    group's partial dot products on the token sample.
//! 5. Round-to-nearest in `GroupFormat`'s groups, packed exactly into GGML blocks.
//!
//! Departures, on purpose:
//! - Candidates are scored on the first windows, up to `SEARCH_TOKENS` tokens (AutoAWQ scores
//!   every calibration token on a GPU; on two CPU threads that would be 20 extra forward passes
//!   of the whole calibration set). mean|x| still comes from every token.
//! - A group's range includes 0 and its scale and minimum are rounded to f16 first
//!   (`GroupFormat::params`, as GPTQ and the GGML blocks define them); AutoAWQ's
//!   pseudo-quantizer uses the group's own [min, max]. The two agree on any group holding both
//!   signs, which after scaling is nearly every one.
//! - A group is left unscaled when one of its linears (or the linear before it) stays in F16
//!   because its rows do not split into blocks, so every float tensor is written unchanged.

use std::collections::HashSet;
use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::gptq_model::QuantizedTensors;
use super::layerwise::{embed, run_layer, stage_offset, LayerWeights, LayerwiseError, Stage};
use super::tensor_quant::{tensor_error, TensorError};
use crate::formats::groups::GroupFormat;
use crate::kernels::dot::dot;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::servable;
use crate::nn::llama::Block;
use crate::nn::rope::Rope;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    pub format: GroupFormat,
    /// Grid points of α in [0, 1).
    pub grid: usize,
    /// s = mean|x|^α / mean_w^(1−α) instead of mean|x|^α.
    pub duo_scaling: bool,
    /// Search a clipping range per group.
    pub clip: bool,
}

/// Tokens each candidate scale is scored on (whole windows, at least one).
pub const SEARCH_TOKENS: usize = 2048;
/// Tokens the clipping search uses (AutoAWQ's `n_sample_token`).
const CLIP_TOKENS: usize = 512;
/// AutoAWQ's `max_shrink`: ranges shrink down to half the group's max|w|.
const MAX_SHRINK: f64 = 0.5;

/// What the search chose in one layer: α per scaling group (None: not scaled).
#[derive(Debug, Clone, Serialize)]
pub struct LayerChoice {
    pub layer: usize,
    pub qkv: Option<f64>,
    pub o: Option<f64>,
    pub gate_up: Option<f64>,
    pub down: Option<f64>,
}

/// A stage's inputs as AWQ needs them.
struct StageStats {
    /// mean |x| per input channel over every token.
    x_mean: Vec<f32>,
    /// The first windows' inputs, to score candidates on.
    search: Vec<Tensor>,
    /// `[CLIP_TOKENS, cols]` tokens strided over all windows.
    clip: Vec<f32>,
    clip_rows: usize,
}

impl StageStats {
    fn new(inputs: &[Tensor], search_windows: usize) -> candle_core::Result<Self> {
        let cols = inputs[0].dim(1)?;
        let total: usize = inputs.iter().map(|x| x.dim(0).unwrap_or(0)).sum();
        let mut sum = Tensor::zeros(cols, candle_core::DType::F32, &Device::Cpu)?;
        for x in inputs {
            sum = (sum + x.abs()?.sum(0)?)?;
        }
        let x_mean = (sum / total.max(1) as f64)?.to_vec1::<f32>()?;
        let stride = (total / CLIP_TOKENS).max(1);
        let mut clip = Vec::with_capacity(CLIP_TOKENS * cols);
        let mut offset = 0;
        for x in inputs {
            let rows = x.dim(0)?;
            let first = (stride - offset % stride) % stride;
            let picked: Vec<u32> = (first..rows).step_by(stride).map(|r| r as u32).collect();
            offset += rows;
            if picked.is_empty() {
                continue;
            }
            let n = picked.len();
            let idx = Tensor::from_vec(picked, n, &Device::Cpu)?;
            clip.extend(x.index_select(&idx, 0)?.flatten_all()?.to_vec1::<f32>()?);
        }
        let clip_rows = (clip.len() / cols).min(CLIP_TOKENS);
        clip.truncate(clip_rows * cols);
        Ok(Self {
            x_mean,
            search: inputs[..search_windows.min(inputs.len())].to_vec(),
            clip,
            clip_rows,
        })
    }
}

/// Runs AWQ over every layer; returns the tensors it wrote (quantized linears and the norms
/// the scales were folded into) and the α chosen per layer.
pub fn run(
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
    wanted: &HashSet<String>,
    cfg: &AwqConfig,
    mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<(QuantizedTensors, Vec<LayerChoice>), LayerwiseError> {
    let model = &ckpt.config;
    let longest = windows.iter().map(Vec::len).max().unwrap_or(1);
    let rope = servable::load_rope(ckpt, longest)?;
    let mut search_windows = 0;
    let mut tokens = 0;
    while search_windows < windows.len() && (search_windows == 0 || tokens < SEARCH_TOKENS) {
        tokens += windows[search_windows].len();
        search_windows += 1;
    }
    let mut xs = embed(ckpt, windows)?;
    let layers = model.num_hidden_layers;
    let mut out = QuantizedTensors::new();
    let mut choices = Vec::with_capacity(layers);
    let mut check = |done: usize| match progress(done, layers) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(LayerwiseError::Cancelled),
    };
    check(0)?;
    for layer in 0..layers {
        let mut weights = LayerWeights::read(ckpt, layer)?;
        let mut block = weights.block()?;
        let mut stats: Vec<StageStats> = Vec::with_capacity(4);
        let mut record = |_: Stage, _: &mut Block, inputs: &[Tensor]| {
            stats.push(StageStats::new(inputs, search_windows)?);
            Ok(())
        };
        xs = run_layer(&mut block, model, &rope, xs, Some(&mut record))?;
        check(layer)?;
        let is_wanted: Vec<bool> = weights
            .linears
            .iter()
            .map(|l| wanted.contains(&format!("{}.weight", l.name)))
            .collect();
        let group_wanted = |stage: Stage, prev: Option<usize>| {
            let start = stage_offset(stage);
            (start..start + stage.parts().len()).all(|i| is_wanted[i])
                && prev.is_none_or(|i| is_wanted[i])
        };
        let search = Search {
            cfg,
            model,
            rope: &rope,
            weights: &weights,
            block: &block,
        };
        let square_v = weights.linears[2].rows == weights.linears[3].cols;
        let qkv = match group_wanted(Stage::Qkv, None) {
            true => Some(search.best(Stage::Qkv, &stats[0])?),
            false => None,
        };
        let o = match square_v && group_wanted(Stage::Output, Some(2)) {
            true => Some(search.best(Stage::Output, &stats[1])?),
            false => None,
        };
        check(layer)?;
        let gate_up = match group_wanted(Stage::GateUp, None) {
            true => Some(search.best(Stage::GateUp, &stats[2])?),
            false => None,
        };
        let down = match group_wanted(Stage::Down, Some(5)) {
            true => Some(search.best(Stage::Down, &stats[3])?),
            false => None,
        };
        drop(block);
        choices.push(LayerChoice {
            layer,
            qkv: qkv.as_ref().map(|c| c.alpha),
            o: o.as_ref().map(|c| c.alpha),
            gate_up: gate_up.as_ref().map(|c| c.alpha),
            down: down.as_ref().map(|c| c.alpha),
        });

        // Fold the scales: the float model's output does not change.
        if let Some(c) = &qkv {
            weights.attn_norm = weights.attn_norm.broadcast_div(&c.tensor()?)?;
            fold_norm(
                &mut out,
                &format!("blk.{layer}.attn_norm.weight"),
                &weights.attn_norm,
            )?;
        }
        if let Some(c) = &o {
            scale_rows(&mut weights, 2, &c.scales)?;
        }
        if let Some(c) = &gate_up {
            weights.ffn_norm = weights.ffn_norm.broadcast_div(&c.tensor()?)?;
            fold_norm(
                &mut out,
                &format!("blk.{layer}.ffn_norm.weight"),
                &weights.ffn_norm,
            )?;
        }
        if let Some(c) = &down {
            scale_rows(&mut weights, 5, &c.scales)?;
        }
        for (stage, choice) in [
            (Stage::Qkv, &qkv),
            (Stage::Output, &o),
            (Stage::GateUp, &gate_up),
            (Stage::Down, &down),
        ] {
            let Some(c) = choice else { continue };
            let start = stage_offset(stage);
            for i in start..start + stage.parts().len() {
                scale_columns(&mut weights.linears[i].weight, &c.scales);
            }
            let st = &mut stats[Stage::ALL
                .iter()
                .position(|&s| s == stage)
                .expect("a stage")];
            for row in st.clip.chunks_mut(c.scales.len()) {
                for (x, s) in row.iter_mut().zip(&c.scales) {
                    *x /= s;
                }
            }
        }

        // Clip, then round to nearest and pack.
        for (si, stage) in Stage::ALL.iter().enumerate() {
            let start = stage_offset(*stage);
            let parts = start..start + stage.parts().len();
            for (l, _) in weights.linears[parts.clone()]
                .iter_mut()
                .zip(&is_wanted[parts])
                .filter(|(_, &wanted)| wanted)
            {
                let before = l.weight.clone();
                let q_or_k = l.name.ends_with("attn_q") || l.name.ends_with("attn_k");
                if cfg.clip && !q_or_k {
                    clip_groups(&mut l.weight, l.cols, &stats[si], cfg);
                }
                let (bytes, err) = round_and_pack(&l.weight, &before, l.cols, cfg.format);
                out.insert(format!("{}.weight", l.name), (bytes, err));
            }
        }
        check(layer + 1)?;
    }
    Ok((out, choices))
}

/// The scales one α gives.
struct Choice {
    alpha: f64,
    scales: Vec<f32>,
}

impl Choice {
    fn tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.scales, self.scales.len(), &Device::Cpu)
    }
}

struct Search<'a> {
    cfg: &'a AwqConfig,
    model: &'a ModelConfig,
    rope: &'a Rope,
    weights: &'a LayerWeights,
    block: &'a Block,
}

impl Search<'_> {
    /// The output of the module `stage`'s group feeds, computed by `block`.
    fn inspect(&self, stage: Stage, block: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        match stage {
            Stage::Qkv => block
                .o
                .forward(&block.sequence_attention(x, self.model, self.rope)?),
            Stage::Output => block.o.forward(x),
            Stage::GateUp => block.down.forward(&block.ffn_activation(x)?),
            Stage::Down => block.down.forward(x),
        }
    }

    /// The grid search of α for one scaling group.
    fn best(&self, stage: Stage, stats: &StageStats) -> Result<Choice, LayerwiseError> {
        let linears = self.weights.stage(stage);
        let reference: Vec<Tensor> = stats
            .search
            .iter()
            .map(|x| self.inspect(stage, self.block, x))
            .collect::<candle_core::Result<_>>()?;
        let w_mean = if self.cfg.duo_scaling {
            weight_mean(linears, self.cfg.format)
        } else {
            Vec::new()
        };
        let mut best: Option<(f64, Choice)> = None;
        for r in 0..self.cfg.grid {
            let alpha = r as f64 / self.cfg.grid as f64;
            let scales = candidate_scales(&stats.x_mean, &w_mean, alpha);
            let mut block = self.weights.block()?;
            let fake: Vec<Vec<f32>> = linears
                .iter()
                .map(|l| fake_quantize(&l.weight, l.cols, &scales, self.cfg.format))
                .collect();
            self.weights.set(&mut block, stage, &fake)?;
            let mut loss = 0f64;
            let mut count = 0usize;
            for (x, want) in stats.search.iter().zip(&reference) {
                let got = self.inspect(stage, &block, x)?;
                loss += (got - want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                count += want.elem_count();
            }
            let loss = loss / count.max(1) as f64;
            if best.as_ref().is_none_or(|(b, _)| loss < *b) {
                best = Some((loss, Choice { alpha, scales }));
            }
        }
        Ok(best.expect("the grid has at least one point").1)
    }
}

/// AutoAWQ's w_mean: per input channel, the mean over rows of |w| / max|w| of its group.
fn weight_mean(linears: &[super::layerwise::Linear], format: GroupFormat) -> Vec<f32> {
    let cols = linears[0].cols;
    let g = format.group_len(cols);
    let mut sum = vec![0f64; cols];
    let mut rows = 0usize;
    for l in linears {
        for row in l.weight.chunks(cols) {
            for (gi, group) in row.chunks(g).enumerate() {
                let max = group.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6;
                for (j, v) in group.iter().enumerate() {
                    sum[gi * g + j] += (v.abs() / max) as f64;
                }
            }
            rows += 1;
        }
    }
    sum.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
}

/// s = x_mean^α (÷ w_mean^(1−α)), clamped at 1e-4, normalized by √(max·min).
fn candidate_scales(x_mean: &[f32], w_mean: &[f32], alpha: f64) -> Vec<f32> {
    let mut s: Vec<f64> = x_mean
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let v = (x as f64).powf(alpha);
            let v = match w_mean.get(i) {
                Some(&w) => v / ((w as f64).powf(1.0 - alpha) + 1e-4),
                None => v,
            };
            v.max(1e-4)
        })
        .collect();
    let max = s.iter().copied().fold(f64::MIN, f64::max);
    let min = s.iter().copied().fold(f64::MAX, f64::min);
    let norm = (max * min).sqrt();
    for v in &mut s {
        *v /= norm;
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// Q(W·s)/s: what the group computes with these scales.
fn fake_quantize(w: &[f32], cols: usize, scales: &[f32], format: GroupFormat) -> Vec<f32> {
    let g = format.group_len(cols);
    let mut out = Vec::with_capacity(w.len());
    let mut scaled = vec![0f32; cols];
    for row in w.chunks(cols) {
        for ((d, &v), &s) in scaled.iter_mut().zip(row).zip(scales) {
            *d = v * s;
        }
        let (levels, params) = format.round_row(&scaled);
        for (j, &q) in levels.iter().enumerate() {
            out.push(format.dequantize(&params[j / g], q) / scales[j]);
        }
    }
    out
}

fn scale_columns(w: &mut [f32], scales: &[f32]) {
    for row in w.chunks_mut(scales.len()) {
        for (v, s) in row.iter_mut().zip(scales) {
            *v *= s;
        }
    }
}

/// Divides the rows of linear `i` (and its bias) by `scales` (one per row).
fn scale_rows(weights: &mut LayerWeights, i: usize, scales: &[f32]) -> candle_core::Result<()> {
    let l = &mut weights.linears[i];
    for (row, s) in l.weight.chunks_mut(l.cols).zip(scales) {
        for v in row {
            *v /= s;
        }
    }
    if let Some(b) = &weights.biases[i] {
        let s = Tensor::from_slice(scales, scales.len(), &Device::Cpu)?;
        weights.biases[i] = Some(b.broadcast_div(&s)?);
    }
    Ok(())
}

/// A norm weight the scales were folded into, written as F32.
fn fold_norm(out: &mut QuantizedTensors, name: &str, w: &Tensor) -> candle_core::Result<()> {
    let values = w.to_vec1::<f32>()?;
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let exact = TensorError {
        rel_rmse: 0.0,
        snr_db: f64::INFINITY,
    };
    out.insert(name.to_string(), (bytes, exact));
    Ok(())
}

/// Shrinks each group's range to the one that best keeps its partial dot products with the
/// sampled tokens (AutoAWQ's `_search_best_clip`).
fn clip_groups(w: &mut [f32], cols: usize, stats: &StageStats, cfg: &AwqConfig) {
    let format = cfg.format;
    let g = format.group_len(cols);
    let tokens = stats.clip_rows;
    if tokens == 0 {
        return;
    }
    let steps = (MAX_SHRINK * cfg.grid as f64) as usize;
    // The sample regrouped so each group's columns are contiguous per token.
    let groups = cols.div_ceil(g);
    let mut xg: Vec<Vec<f32>> = vec![Vec::with_capacity(tokens * g); groups];
    for t in 0..tokens {
        let row = &stats.clip[t * cols..(t + 1) * cols];
        for (gi, chunk) in row.chunks(g).enumerate() {
            xg[gi].extend_from_slice(chunk);
        }
    }
    let mut reference = vec![0f32; tokens];
    let mut clamped = vec![0f32; g];
    let mut dequant = vec![0f32; g];
    for row in w.chunks_mut(cols) {
        for (gi, group) in row.chunks_mut(g).enumerate() {
            let len = group.len();
            let x = &xg[gi];
            for (t, r) in reference.iter_mut().enumerate() {
                *r = dot(&x[t * len..(t + 1) * len], group);
            }
            let max0 = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut best = (f64::INFINITY, max0);
            for i in 0..steps.max(1) {
                let max = max0 * (1.0 - i as f32 / cfg.grid as f32);
                for (c, &v) in clamped[..len].iter_mut().zip(group.iter()) {
                    *c = v.clamp(-max, max);
                }
                let p = format.params(&clamped[..len]);
                for (d, &c) in dequant[..len].iter_mut().zip(&clamped[..len]) {
                    *d = format.dequantize(&p, format.quantize(&p, c));
                }
                let err: f64 = reference
                    .iter()
                    .enumerate()
                    .map(|(t, &r)| {
                        let e = (dot(&x[t * len..(t + 1) * len], &dequant[..len]) - r) as f64;
                        e * e
                    })
                    .sum();
                if err < best.0 {
                    best = (err, max);
                }
            }
            for v in group.iter_mut() {
                *v = v.clamp(-best.1, best.1);
            }
        }
    }
}

/// Round-to-nearest of the final weights into blocks; the error is against `before` (the
/// scaled weights before clipping).
fn round_and_pack(
    w: &[f32],
    before: &[f32],
    cols: usize,
    format: GroupFormat,
) -> (Vec<u8>, TensorError) {
    let g = format.group_len(cols);
    let mut bytes = Vec::new();
    let mut values = Vec::with_capacity(w.len());
    for row in w.chunks(cols) {
        let (levels, params) = format.round_row(row);
        values.extend(
            levels
                .iter()
                .enumerate()
                .map(|(j, &q)| format.dequantize(&params[j / g], q)),
        );
        format.pack_row(&levels, &params, &mut bytes);
    }
    (bytes, tensor_error(before, &values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_normalized_and_alpha_zero_is_no_scaling() {
        let x = [0.5f32, 2.0, 8.0];
        assert_eq!(candidate_scales(&x, &[], 0.0), vec![1.0, 1.0, 1.0]);
        let s = candidate_scales(&x, &[], 1.0);
        let (max, min) = (8.0f32 / 2.0, 0.5 / 2.0);
        assert!(
            (s[0] - min).abs() < 1e-6 && (s[2] - max).abs() < 1e-6,
            "{s:?}"
        );
    }

    #[test]
    fn fake_quantization_with_unit_scales_is_round_to_nearest() {
        let format = GroupFormat {
            bits: 4,
            group_size: Some(32),
            sym: false,
        };
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 64) as f32 - 32.0) / 100.0)
            .collect();
        let fake = fake_quantize(&w, 64, &[1.0; 64], format);
        let g = format.group_len(64);
        let rtn: Vec<f32> = w
            .chunks(64)
            .flat_map(|row| {
                let (l, p) = format.round_row(row);
                l.iter()
                    .enumerate()
                    .map(|(j, &q)| format.dequantize(&p[j / g], q))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(fake, rtn);
    }
}
