//! Turns a checkpoint into everything serving needs: the decoder on candle (quantized tensors
//! kept as GGML blocks, float tensors as f32), the tokenizer, the chat template and the tokens
//! that end a generation. HF folders and GGUF files (quantd's and llama.cpp's) load the same
//! way because [`Checkpoint`] hands out tensors in GGUF naming and layout.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::checkpoint::{Checkpoint, SourceDtype, TensorRef};
use super::tokenizer_gguf;
use crate::formats::gguf::Value;
use crate::formats::int8_rows;
use crate::kernels::bnb4::Bnb4Matmul;
use crate::kernels::gptq::GptqMatmul;
use crate::kernels::int8::{check_levels, Activations, Int8Matmul};
use crate::nn::linear::QLinear;
use crate::nn::llama::{Block, Embedding, Llama};
use crate::nn::rope::{Rope, RopeLayout};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("tensor {0} is missing")]
    MissingTensor(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// A model ready to run: weights, tokenizer, and the template and tokens around them.
pub struct Servable {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    /// Jinja source from tokenizer_config.json or GGUF `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Any of these ends a generation with `finish_reason: "stop"`.
    pub stop_token_ids: Vec<u32>,
}

/// Loads the model for at most `max_positions` positions (capped by its own context length).
pub fn load(ckpt: &Checkpoint, max_positions: usize) -> Result<Servable, LoadError> {
    let llama = load_llama(ckpt, max_positions)?;
    let (tokenizer, tokenizer_config) = tokenizer_and_config(ckpt)?;
    let token_text = |key: &str| -> Option<String> {
        match tokenizer_config.get(key)? {
            Json::String(s) => Some(s.clone()),
            // {"content": "<s>", ...} (AddedToken form)
            Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let bos_token = token_text("bos_token");
    let eos_token = token_text("eos_token");
    let mut stop_token_ids: Vec<u32> = Vec::new();
    stop_token_ids.extend(ckpt.config.eos_token_id);
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        stop_token_ids.push(id);
    }
    if let Ok(Some(g)) = ckpt.side_json("generation_config.json") {
        match g.get("eos_token_id") {
            Some(Json::Array(ids)) => {
                stop_token_ids.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            Some(v) => stop_token_ids.extend(v.as_u64().map(|v| v as u32)),
            None => {}
        }
    }
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(v) = gguf_value(ckpt, key).and_then(|v| v.to_u32().ok()) {
            stop_token_ids.push(v);
        }
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    Ok(Servable {
        llama,
        tokenizer,
        chat_template: tokenizer_config
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        bos_token,
        eos_token,
        stop_token_ids,
    })
}

/// The model's tokenizer alone (calibration needs it without the weights).
pub fn load_tokenizer(ckpt: &Checkpoint) -> Result<Tokenizer, LoadError> {
    Ok(tokenizer_and_config(ckpt)?.0)
}

fn tokenizer_and_config(ckpt: &Checkpoint) -> Result<(Tokenizer, Json), LoadError> {
    let (json, config) = tokenizer_files(ckpt)?;
    let tokenizer =
        Tokenizer::from_bytes(&json).map_err(|e| LoadError::Tokenizer(e.to_string()))?;
    Ok((tokenizer, config))
}

fn gguf_value<'a>(ckpt: &'a Checkpoint, key: &str) -> Option<&'a Value> {
    ckpt.gguf_metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// tokenizer.json bytes and tokenizer_config.json, from the HF side files or rebuilt from the
/// GGUF metadata.
fn tokenizer_files(ckpt: &Checkpoint) -> Result<(Vec<u8>, Json), LoadError> {
    let tok_err = |e: String| LoadError::Tokenizer(e);
    if let Some(path) = ckpt.side_files.get("tokenizer.json") {
        let bytes = std::fs::read(path).map_err(|e| tok_err(e.to_string()))?;
        let config = ckpt
            .side_json("tokenizer_config.json")
            .map_err(|e| tok_err(e.to_string()))?
            .unwrap_or(Json::Null);
        return Ok((bytes, config));
    }
    if ckpt.gguf_metadata.is_empty() {
        return Err(tok_err("the model has no tokenizer.json".into()));
    }
    let metadata: HashMap<String, Value> = ckpt.gguf_metadata.iter().cloned().collect();
    let files = tokenizer_gguf::gguf_to_hf(&metadata).map_err(|e| tok_err(e.to_string()))?;
    let config =
        serde_json::from_slice(&files.tokenizer_config_json).map_err(|e| tok_err(e.to_string()))?;
    Ok((files.tokenizer_json, config))
}

fn tensor<'a>(ckpt: &'a Checkpoint, name: &str) -> Result<&'a TensorRef, LoadError> {
    ckpt.tensor(name)
        .ok_or_else(|| LoadError::MissingTensor(name.to_string()))
}

/// The rotary embedding of `ckpt`'s decoder for at most `max_positions` positions.
pub fn load_rope(ckpt: &Checkpoint, max_positions: usize) -> Result<Rope, LoadError> {
    let cfg = &ckpt.config;
    let freq_factors = match ckpt.tensor("rope_freqs.weight") {
        Some(t) => Some(ckpt.read_f32(t)?),
        None => cfg.llama3_rope_factors(),
    };
    // Checkpoint hands out llama/mistral Q/K rows permuted as in GGUF, which pairs with
    // llama.cpp's interleaved rotation; qwen2 keeps HF's order and rotates halves.
    let layout = if cfg.architecture.permutes_qk() {
        RopeLayout::Interleaved
    } else {
        RopeLayout::Neox
    };
    let positions = max_positions.min(cfg.max_position_embeddings).max(1);
    Ok(Rope::new(cfg, freq_factors.as_deref(), layout, positions)?)
}

/// A float tensor as f32 in GGUF layout.
fn read_dense(ckpt: &Checkpoint, t: &TensorRef) -> Result<Tensor, LoadError> {
    let values = ckpt.read_f32(t)?;
    Ok(Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?)
}

/// A tensor kept as GGML blocks when it is stored as blocks, or as f16 when it is F16 (half
/// the memory of f32, and what decode reads; `kernels::f16` multiplies it).
fn read_blocks(ckpt: &Checkpoint, t: &TensorRef) -> Result<Option<Arc<QTensor>>, LoadError> {
    match t.dtype {
        SourceDtype::Ggml(dtype) if !matches!(dtype, GgmlDType::F32 | GgmlDType::BF16) => {
            let storage = QStorage::from_data(
                std::borrow::Cow::Borrowed(ckpt.raw_bytes(t)),
                &Device::Cpu,
                dtype,
            )?;
            Ok(Some(Arc::new(QTensor::new(storage, t.shape.as_slice())?)))
        }
        _ => Ok(None),
    }
}

fn linear(ckpt: &Checkpoint, name: &str) -> Result<QLinear, LoadError> {
    let t = tensor(ckpt, &format!("{name}.weight"))?;
    let bias = match ckpt.tensor(&format!("{name}.bias")) {
        Some(b) => Some(read_dense(ckpt, b)?),
        None => None,
    };
    if let Some(packed) = ckpt.packed_linear(t) {
        let packed =
            packed.map_err(|e| LoadError::Candle(candle_core::Error::Msg(e.to_string())))?;
        return Ok(match GptqMatmul::new(packed) {
            Ok(k) => QLinear::custom(Arc::new(k), bias),
            // Permuted groups: served from the dequantized weights.
            Err(packed) => QLinear::dense(
                Tensor::from_vec(packed.dequantize(), t.shape.as_slice(), &Device::Cpu)?,
                bias,
            )?,
        });
    }
    if let Some(w) = ckpt.bnb4_weight(t) {
        let w = w.map_err(|e| LoadError::Candle(candle_core::Error::Msg(e.to_string())))?;
        return Ok(QLinear::custom(Arc::new(Bnb4Matmul::new(w)), bias));
    }
    if let Some(rows) = ckpt.int8_rows(t) {
        let rows = rows.map_err(|e| LoadError::Candle(candle_core::Error::Msg(e.to_string())))?;
        let activations = int8_activations(ckpt)?;
        check_levels(&rows, activations)
            .map_err(|m| LoadError::Candle(candle_core::Error::Msg(format!("{name}: {m}"))))?;
        let kernel = Int8Matmul::new(&rows, activations);
        return Ok(QLinear::custom(Arc::new(kernel), bias));
    }
    Ok(match read_blocks(ckpt, t)? {
        Some(q) => QLinear::ggml(q, bias)?,
        None => QLinear::dense(read_dense(ckpt, t)?, bias)?,
    })
}

/// How the file's int8 rows quantize activations (GGUF metadata written with them); per token
/// when the file does not say.
fn int8_activations(ckpt: &Checkpoint) -> Result<Activations, LoadError> {
    let bad = |m: String| LoadError::Candle(candle_core::Error::Msg(m));
    let mode = match gguf_value(ckpt, int8_rows::ACTIVATIONS_KEY) {
        None => return Ok(Activations::PerToken),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(bad(format!(
                "{} is not a string",
                int8_rows::ACTIVATIONS_KEY
            )))
        }
    };
    Ok(match mode {
        "per_token" => Activations::PerToken,
        "torch" => Activations::Torch,
        "llm-int8" => {
            let threshold = match gguf_value(ckpt, int8_rows::THRESHOLD_KEY) {
                Some(v) => v
                    .to_f32()
                    .map_err(|_| bad(format!("{} is not an f32", int8_rows::THRESHOLD_KEY)))?,
                None => 6.0,
            };
            if !(threshold.is_finite() && threshold > 0.0) {
                return Err(bad(format!(
                    "{} = {threshold} is not a positive number",
                    int8_rows::THRESHOLD_KEY
                )));
            }
            Activations::Outliers { threshold }
        }
        other => {
            return Err(bad(format!(
                "{} = {other:?}: expected per_token, torch or llm-int8",
                int8_rows::ACTIVATIONS_KEY
            )))
        }
    })
}

pub fn load_llama(ckpt: &Checkpoint, max_positions: usize) -> Result<Llama, LoadError> {
    let cfg = ckpt.config.clone();
    let embd = tensor(ckpt, "token_embd.weight")?;
    let (embed, tied_head) = match read_blocks(ckpt, embd)? {
        Some(q) => (Embedding::Ggml(q.clone()), QLinear::ggml(q, None)?),
        None => {
            let t = read_dense(ckpt, embd)?;
            (Embedding::Dense(t.clone()), QLinear::dense(t, None)?)
        }
    };
    let (output, tied_output) = if ckpt.tensor("output.weight").is_some() {
        (linear(ckpt, "output")?, false)
    } else {
        (tied_head, true)
    };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("blk.{i}");
        blocks.push(Block {
            attn_norm: read_dense(ckpt, tensor(ckpt, &format!("{p}.attn_norm.weight"))?)?,
            q: linear(ckpt, &format!("{p}.attn_q"))?,
            k: linear(ckpt, &format!("{p}.attn_k"))?,
            v: linear(ckpt, &format!("{p}.attn_v"))?,
            o: linear(ckpt, &format!("{p}.attn_output"))?,
            ffn_norm: read_dense(ckpt, tensor(ckpt, &format!("{p}.ffn_norm.weight"))?)?,
            gate: linear(ckpt, &format!("{p}.ffn_gate"))?,
            up: linear(ckpt, &format!("{p}.ffn_up"))?,
            down: linear(ckpt, &format!("{p}.ffn_down"))?,
        });
    }
    let rope = load_rope(ckpt, max_positions)?;
    Ok(Llama {
        embed,
        blocks,
        output_norm: read_dense(ckpt, tensor(ckpt, "output_norm.weight")?)?,
        output,
        tied_output,
        rope,
        config: cfg,
    })
}
