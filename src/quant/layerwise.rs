//! Layer-by-layer calibration (DESIGN §4): the calibration windows go through the embedding,
//! then through one decoder layer at a time, stage by stage (q/k/v, o, gate/up, down). A
//! method quantizes each stage's linears on the inputs they see, and the stage then runs with
//! the weights the method returns, so every later input is computed with the earlier linears
//! already quantized. Memory holds one layer's weights in f32 and the activations of all
//! windows (the hidden states and one stage's inputs), never the whole model.
//!
//! With `true_sequential` off, the stages of a layer run on the original weights (GPTQ's
//! original per-layer order: every Hessian of a layer from unquantized inputs) and the layer's
//! output is recomputed with all its linears quantized before the next layer.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};

use crate::model::checkpoint::Checkpoint;
use crate::model::servable::{self, LoadError};
use crate::nn::linear::QLinear;
use crate::nn::llama::{Block, Embedding};
use crate::nn::rope::Rope;

/// One linear layer's weights, row-major `[rows, cols]` (GGUF layout and name).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The GGUF tensor name without `.weight` (`blk.3.attn_q`).
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub weight: Vec<f32>,
}

/// The linears of a decoder layer that read the same input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// attn_q, attn_k, attn_v: the attention norm's output.
    Qkv,
    /// attn_output: the attention's output.
    Output,
    /// ffn_gate, ffn_up: the FFN norm's output.
    GateUp,
    /// ffn_down: silu(gate) ⊙ up.
    Down,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Qkv, Stage::Output, Stage::GateUp, Stage::Down];

    /// GGUF suffixes of the stage's linears, in order.
    pub fn parts(self) -> &'static [&'static str] {
        match self {
            Self::Qkv => &["attn_q", "attn_k", "attn_v"],
            Self::Output => &["attn_output"],
            Self::GateUp => &["ffn_gate", "ffn_up"],
            Self::Down => &["ffn_down"],
        }
    }
}

/// A calibration method's view of one stage: the linears, the inputs they read (one
/// `[tokens, cols]` tensor per window), and the layer they belong to.
pub struct StageInputs<'a> {
    pub layer: usize,
    pub stage: Stage,
    pub linears: &'a [Linear],
    pub inputs: &'a [Tensor],
}

pub trait StageQuantizer {
    /// Quantizes the stage's linears; returns, per linear in order, the weights the quantized
    /// model computes with (the dequantized values).
    fn quantize(&mut self, stage: StageInputs<'_>) -> Result<Vec<Vec<f32>>, LayerwiseError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LayerwiseError {
    #[error("cancelled")]
    Cancelled,
    #[error("loading: {0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Method(String),
}

/// Runs `windows` through the model layer by layer, letting `quantizer` quantize every stage;
/// returns the windows' hidden states after the last layer (before the output norm).
/// `progress(done, total)` is called after each layer; `Break` stops between stages.
pub fn run(
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
    true_sequential: bool,
    quantizer: &mut dyn StageQuantizer,
    mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Vec<Tensor>, LayerwiseError> {
    let cfg = &ckpt.config;
    let longest = windows.iter().map(Vec::len).max().unwrap_or(1);
    let rope = servable::load_rope(ckpt, longest)?;
    let mut xs = embed(ckpt, windows)?;
    let layers = cfg.num_hidden_layers;
    let mut check = |done: usize| -> Result<(), LayerwiseError> {
        match progress(done, layers) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(LayerwiseError::Cancelled),
        }
    };
    check(0)?;
    for layer in 0..layers {
        let weights = LayerWeights::read(ckpt, layer)?;
        let mut block = weights.block()?;
        let mut quantized: Vec<(Stage, Vec<Vec<f32>>)> = Vec::new();
        let layer_input = xs.clone();
        let mut stage_done =
            |stage: Stage, block: &mut Block, inputs: &[Tensor]| -> Result<(), LayerwiseError> {
                let linears = weights.stage(stage);
                let new = quantizer.quantize(StageInputs {
                    layer,
                    stage,
                    linears,
                    inputs,
                })?;
                if true_sequential {
                    weights.set(block, stage, &new)?;
                }
                quantized.push((stage, new));
                check(layer).map(|_| ())
            };
        xs = run_layer(&mut block, cfg, &rope, xs, Some(&mut stage_done))?;
        if !true_sequential {
            for (stage, new) in &quantized {
                weights.set(&mut block, *stage, new)?;
            }
            xs = run_layer(&mut block, cfg, &rope, layer_input, None)?;
        }
        check(layer + 1)?;
    }
    Ok(xs)
}

pub(crate) type StageHook<'a> =
    dyn FnMut(Stage, &mut Block, &[Tensor]) -> Result<(), LayerwiseError> + 'a;

/// One decoder layer over every window, calling `hook` with each stage's inputs before the
/// stage runs (the hook may replace the stage's weights in `block`).
pub(crate) fn run_layer(
    block: &mut Block,
    cfg: &crate::model::config::ModelConfig,
    rope: &Rope,
    xs: Vec<Tensor>,
    mut hook: Option<&mut StageHook<'_>>,
) -> Result<Vec<Tensor>, LayerwiseError> {
    let eps = cfg.rms_norm_eps as f32;
    let mut call = |stage: Stage, block: &mut Block, inputs: &[Tensor]| match hook.as_deref_mut() {
        Some(h) => h(stage, block, inputs),
        None => Ok(()),
    };
    let norm = |x: &Tensor, w: &Tensor| candle_nn::ops::rms_norm(x, w, eps);

    let hs = xs
        .iter()
        .map(|x| norm(x, &block.attn_norm))
        .collect::<candle_core::Result<Vec<_>>>()?;
    call(Stage::Qkv, block, &hs)?;
    let attn = hs
        .iter()
        .map(|h| block.sequence_attention(h, cfg, rope))
        .collect::<candle_core::Result<Vec<_>>>()?;
    drop(hs);
    call(Stage::Output, block, &attn)?;
    let xs = xs
        .iter()
        .zip(&attn)
        .map(|(x, a)| x + block.o.forward(a)?)
        .collect::<candle_core::Result<Vec<_>>>()?;
    drop(attn);

    let hs = xs
        .iter()
        .map(|x| norm(x, &block.ffn_norm))
        .collect::<candle_core::Result<Vec<_>>>()?;
    call(Stage::GateUp, block, &hs)?;
    let acts = hs
        .iter()
        .map(|h| block.ffn_activation(h))
        .collect::<candle_core::Result<Vec<_>>>()?;
    drop(hs);
    call(Stage::Down, block, &acts)?;
    Ok(xs
        .iter()
        .zip(&acts)
        .map(|(x, a)| x + block.down.forward(a)?)
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// The windows' embeddings, `[tokens, hidden]` each; the table is dropped afterwards.
pub(crate) fn embed(
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
) -> Result<Vec<Tensor>, LayerwiseError> {
    let t = ckpt
        .tensor("token_embd.weight")
        .ok_or_else(|| LoadError::MissingTensor("token_embd.weight".into()))?;
    let table = Embedding::Dense(Tensor::from_vec(
        ckpt.read_f32(t)?,
        t.shape.as_slice(),
        &Device::Cpu,
    )?);
    Ok(windows
        .iter()
        .map(|w| table.forward(&Tensor::from_slice(w, w.len(), &Device::Cpu)?))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// One layer's weights in f32 (the linears in stage order) with their biases and norms.
pub(crate) struct LayerWeights {
    pub linears: Vec<Linear>,
    pub biases: Vec<Option<Tensor>>,
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
}

/// Position of each stage's first linear in `LayerWeights::linears`.
pub(crate) fn stage_offset(stage: Stage) -> usize {
    match stage {
        Stage::Qkv => 0,
        Stage::Output => 3,
        Stage::GateUp => 4,
        Stage::Down => 6,
    }
}

impl LayerWeights {
    pub fn read(ckpt: &Checkpoint, layer: usize) -> Result<Self, LayerwiseError> {
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>), LayerwiseError> {
            let t = ckpt
                .tensor(name)
                .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
            Ok((ckpt.read_f32(t)?, t.shape.clone()))
        };
        let dense = |name: &str| -> Result<Tensor, LayerwiseError> {
            let (v, shape) = read(name)?;
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        };
        let mut linears = Vec::with_capacity(7);
        let mut biases = Vec::with_capacity(7);
        for stage in Stage::ALL {
            for part in stage.parts() {
                let name = format!("blk.{layer}.{part}");
                let (weight, shape) = read(&format!("{name}.weight"))?;
                let bias_name = format!("{name}.bias");
                biases.push(match ckpt.tensor(&bias_name) {
                    Some(_) => Some(dense(&bias_name)?),
                    None => None,
                });
                linears.push(Linear {
                    name,
                    rows: shape[0],
                    cols: shape[1],
                    weight,
                });
            }
        }
        Ok(Self {
            linears,
            biases,
            attn_norm: dense(&format!("blk.{layer}.attn_norm.weight"))?,
            ffn_norm: dense(&format!("blk.{layer}.ffn_norm.weight"))?,
        })
    }

    pub fn stage(&self, stage: Stage) -> &[Linear] {
        let start = stage_offset(stage);
        &self.linears[start..start + stage.parts().len()]
    }

    pub fn linear(&self, i: usize, weight: &[f32]) -> candle_core::Result<QLinear> {
        let l = &self.linears[i];
        QLinear::dense(
            Tensor::from_slice(weight, (l.rows, l.cols), &Device::Cpu)?,
            self.biases[i].clone(),
        )
    }

    /// A block computing with the original weights.
    pub fn block(&self) -> candle_core::Result<Block> {
        let l = |i: usize| self.linear(i, &self.linears[i].weight);
        Ok(Block {
            attn_norm: self.attn_norm.clone(),
            q: l(0)?,
            k: l(1)?,
            v: l(2)?,
            o: l(3)?,
            ffn_norm: self.ffn_norm.clone(),
            gate: l(4)?,
            up: l(5)?,
            down: l(6)?,
        })
    }

    /// Makes `block` compute `stage` with `weights` (one per linear of the stage).
    pub fn set(
        &self,
        block: &mut Block,
        stage: Stage,
        weights: &[Vec<f32>],
    ) -> Result<(), LayerwiseError> {
        if weights.len() != stage.parts().len() {
            return Err(LayerwiseError::Method(format!(
                "the method returned {} weight matrices for {} linears",
                weights.len(),
                stage.parts().len()
            )));
        }
        let start = stage_offset(stage);
        for (k, w) in weights.iter().enumerate() {
            let i = start + k;
            let new = self.linear(i, w)?;
            match i {
                0 => block.q = new,
                1 => block.k = new,
                2 => block.v = new,
                3 => block.o = new,
                4 => block.gate = new,
                5 => block.up = new,
                _ => block.down = new,
            }
        }
        Ok(())
    }
}
