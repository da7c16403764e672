//! Model hyper-parameters from GGUF metadata (`{arch}.*` keys), read the way llama.cpp reads
//! them, with the same caps as an HF config.json.

use super::checkpoint::CheckpointError;
use super::config::ModelConfig;
use crate::formats::gguf::{GgufFile, Value};

fn invalid(file: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        file: file.to_string(),
        message: message.into(),
    }
}

fn meta_u64(f: &GgufFile, key: &str) -> Option<u64> {
    match f.get(key)? {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I32(v) if *v >= 0 => Some(*v as u64),
        Value::I64(v) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

fn meta_f64(f: &GgufFile, key: &str) -> Option<f64> {
    match f.get(key)? {
        Value::F32(v) => Some(*v as f64),
        Value::F64(v) => Some(*v),
        _ => None,
    }
}

/// Hyper-parameters from `{arch}.*` keys, as llama.cpp reads them.
pub fn config_from_gguf(f: &GgufFile) -> Result<ModelConfig, CheckpointError> {
    let arch_name = match f.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(invalid("gguf", "general.architecture is missing")),
    };
    let architecture = Architecture::from_model_type(&arch_name)
        .filter(|a| a.gguf_arch() == arch_name)
        .ok_or_else(|| ConfigError::UnsupportedArchitecture(arch_name.clone()))?;
    let need = |key: &str| {
        meta_u64(f, &format!("{arch_name}.{key}"))
            .ok_or_else(|| invalid("gguf", format!("{arch_name}.{key} is missing")))
    };
    let hidden = need("embedding_length")? as usize;
    let heads = need("attention.head_count")? as usize;
    let check = |field: &str, v: usize, max: usize| {
        if v == 0 || v > max {
            Err(invalid(
                "gguf",
                format!("{arch_name}.{field} = {v} is outside 1..={max}"),
            ))
        } else {
            Ok(v)
        }
    };
    use super::config::*;
    let vocab = match f.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => meta_u64(f, &format!("{arch_name}.vocab_size")).unwrap_or(0) as usize,
    };
    let tensor_has = |n: &str| f.tensors.iter().any(|t| t.name == n);
    let rope_scaling = match f.get(&format!("{arch_name}.rope.scaling.type")) {
        Some(Value::String(kind)) if kind != "none" => Some(RopeScaling {
            kind: kind.clone(),
            factor: meta_f64(f, &format!("{arch_name}.rope.scaling.factor")).unwrap_or(1.0),
            original_max_position_embeddings: meta_u64(
                f,
                &format!("{arch_name}.rope.scaling.original_context_length"),
            ),
            low_freq_factor: None,
            high_freq_factor: None,
        }),
        _ => None,
    };
    let head_dim = match meta_u64(f, &format!("{arch_name}.attention.key_length")) {
        Some(v) => check(
            "attention.key_length",
            usize::try_from(v).unwrap_or(usize::MAX),
            MAX_HIDDEN,
        )?,
        None => hidden / heads.max(1),
    };
    let token_id = |key: &str| meta_u64(f, key).map(|v| v as u32);
    let cfg = ModelConfig {
        architecture,
        vocab_size: check("vocab_size", vocab, MAX_VOCAB)?,
        hidden_size: check("embedding_length", hidden, MAX_HIDDEN)?,
        intermediate_size: check(
            "feed_forward_length",
            need("feed_forward_length")? as usize,
            MAX_INTERMEDIATE,
        )?,
        num_hidden_layers: check("block_count", need("block_count")? as usize, MAX_LAYERS)?,
        num_attention_heads: check("attention.head_count", heads, MAX_HEADS)?,
        num_key_value_heads: check(
            "attention.head_count_kv",
            meta_u64(f, &format!("{arch_name}.attention.head_count_kv")).unwrap_or(heads as u64)
                as usize,
            MAX_HEADS,
        )?,
        head_dim,
        max_position_embeddings: check(
            "context_length",
            meta_u64(f, &format!("{arch_name}.context_length")).unwrap_or(4096) as usize,
            MAX_CONTEXT,
        )?,
        rms_norm_eps: meta_f64(f, &format!("{arch_name}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_theta: meta_f64(f, &format!("{arch_name}.rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        // A head of its own may be stored in parts (`output.int8_weight`, ...), not whole.
        tie_word_embeddings: !f.tensors.iter().any(|t| t.name.starts_with("output.")),
        attention_bias: tensor_has("blk.0.attn_q.bias"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
    };
    cfg.validate()?;
    if f.get("tokenizer.ggml.model").is_none() {
        return Err(invalid(
            "gguf",
            "tokenizer.ggml.model is missing: the file carries no tokenizer",
        ));
    }
    Ok(cfg)
}
