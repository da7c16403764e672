//! The metadata of a GGUF quantd writes: `general.*`, the architecture's hyper-parameters under
//! llama.cpp's key names, the full tokenizer (`tokenizer.ggml.*`, chat template) and `quantize.*`
//! provenance keys.

use crate::formats::gguf::Value;
use crate::model::checkpoint::{Checkpoint, CheckpointError, Format};
use crate::model::tokenizer_gguf;

/// Everything but `quantize.*`: general, hyper-parameters and tokenizer.
pub fn model_metadata(
    ckpt: &Checkpoint,
    model_name: &str,
    file_type: u32,
    quantized: bool,
) -> Result<Vec<(String, Value)>, CheckpointError> {
    let c = &ckpt.config;
    let arch = c.architecture.gguf_arch();
    let s = |v: &str| Value::String(v.to_string());
    let u = |v: usize| Value::U32(v as u32);
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s(model_name)),
        ("general.file_type".into(), Value::U32(file_type)),
        (
            "general.alignment".into(),
            Value::U32(crate::formats::gguf::ALIGNMENT as u32),
        ),
    ];
    if quantized {
        kv.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let mut hp = |key: &str, v: Value| kv.push((format!("{arch}.{key}"), v));
    hp("vocab_size", u(c.vocab_size));
    hp("context_length", u(c.max_position_embeddings));
    hp("embedding_length", u(c.hidden_size));
    hp("block_count", u(c.num_hidden_layers));
    hp("feed_forward_length", u(c.intermediate_size));
    hp("rope.dimension_count", u(c.head_dim));
    hp("attention.head_count", u(c.num_attention_heads));
    hp("attention.head_count_kv", u(c.num_key_value_heads));
    hp(
        "attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps as f32),
    );
    hp("rope.freq_base", Value::F32(c.rope_theta as f32));
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        hp("attention.key_length", u(c.head_dim));
        hp("attention.value_length", u(c.head_dim));
    }
    // llama.cpp's converter writes scaling keys for linear and YaRN only; Llama 3 scaling
    // travels as the `rope_freqs.weight` tensor instead.
    if let Some(r) = c
        .rope_scaling
        .as_ref()
        .filter(|r| r.kind == "linear" || r.kind == "yarn")
    {
        hp("rope.scaling.type", s(&r.kind));
        hp("rope.scaling.factor", Value::F32(r.factor as f32));
        if let Some(orig) = r.original_max_position_embeddings {
            hp(
                "rope.scaling.original_context_length",
                Value::U32(orig as u32),
            );
        }
    }
    match ckpt.format {
        Format::Gguf => kv.extend(
            ckpt.gguf_metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned(),
        ),
        Format::HfSafetensors => {
            let tok_path =
                ckpt.side_files
                    .get("tokenizer.json")
                    .ok_or_else(|| CheckpointError::Invalid {
                        file: "tokenizer.json".into(),
                        message: "missing".into(),
                    })?;
            let tok = std::fs::read(tok_path).map_err(|source| CheckpointError::Io {
                file: "tokenizer.json".into(),
                source,
            })?;
            let config = ckpt.side_json("config.json")?.unwrap_or_default();
            let tok_cfg = ckpt.side_json("tokenizer_config.json")?;
            let gen_cfg = ckpt.side_json("generation_config.json")?;
            let tokenizer =
                tokenizer_gguf::hf_to_gguf_kv(&tok, tok_cfg.as_ref(), &config, gen_cfg.as_ref())
                    .map_err(|e| CheckpointError::Invalid {
                        file: "tokenizer.json".into(),
                        message: e.to_string(),
                    })?;
            kv.extend(tokenizer);
        }
    }
    Ok(kv)
}

/// `quantize.*` keys recording how a file was made.
pub fn provenance(
    method: &str,
    params: &serde_json::Value,
    source_digest: Option<&str>,
    job_id: Option<&str>,
) -> Vec<(String, Value)> {
    let mut kv = vec![
        (
            "quantize.tool".to_string(),
            Value::String(format!("quantd {}", env!("CARGO_PKG_VERSION"))),
        ),
        (
            "quantize.method".to_string(),
            Value::String(method.to_string()),
        ),
        (
            "quantize.params".to_string(),
            Value::String(params.to_string()),
        ),
    ];
    if let Some(d) = source_digest {
        kv.push((
            "quantize.source_sha256".to_string(),
            Value::String(d.trim_start_matches("sha256:").to_string()),
        ));
    }
    if let Some(j) = job_id {
        kv.push(("quantize.job_id".to_string(), Value::String(j.to_string())));
    }
    kv
}
