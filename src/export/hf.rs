//! Writing a Hugging Face folder (config.json, model.safetensors, tokenizer files) from any
//! checkpoint, tensor by tensor: the safetensors header is computed from shapes first, then
//! data is streamed, so memory stays at one tensor. Used by `quantd convert` (GGUF → HF).

use std::io::Write;
use std::path::Path;

use crate::model::checkpoint::{Checkpoint, CheckpointError, Format};
use crate::model::names;
use crate::model::tokenizer_gguf;
use crate::store::sync_dir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

impl HfDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    fn st_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        if self == Self::F32 {
            4
        } else {
            2
        }
    }

    fn encode(self, v: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::F16 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
            Self::BF16 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HfExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor {0}: has no Hugging Face name")]
    Unnamed(String),
    #[error("reading tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

/// One tensor of a safetensors file, declared before its data is written.
pub(super) struct StEntry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// Creates a safetensors file and writes its header; the caller then writes each entry's
/// bytes in order.
pub(super) fn create_safetensors(
    path: &Path,
    entries: &[StEntry],
) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for e in entries {
        header.insert(e.name.clone(), serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.bytes]}));
        offset += e.bytes;
    }
    let mut header_bytes =
        serde_json::to_vec(&serde_json::Value::Object(header)).expect("JSON map serializes");
    // Pad with spaces to a multiple of 8, as the reference writer does, so data stays aligned.
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    Ok(out)
}

/// Writes `ckpt` as an HF folder into `dir` (created; must not hold another model).
/// `progress(done, total)` is called after each tensor.
pub fn write_hf_folder(
    ckpt: &Checkpoint,
    dir: &Path,
    dtype: HfDtype,
    progress: &dyn Fn(usize, usize),
) -> Result<(), HfExportError> {
    std::fs::create_dir_all(dir)?;
    let mut entries = Vec::with_capacity(ckpt.tensors.len());
    let mut declared = Vec::with_capacity(ckpt.tensors.len());
    for t in &ckpt.tensors {
        // Llama 3 RoPE factors live in config.json's rope_scaling on the HF side.
        if names::OPTIONAL_TENSORS.contains(&t.name.as_str()) {
            continue;
        }
        let hf =
            names::gguf_to_hf(&t.name).ok_or_else(|| HfExportError::Unnamed(t.name.clone()))?;
        declared.push(StEntry {
            name: hf,
            dtype: dtype.st_name(),
            shape: t.shape.clone(),
            bytes: t.elem_count() * dtype.size(),
        });
        entries.push(t);
    }
    let mut out = create_safetensors(&dir.join("model.safetensors"), &declared)?;
    let mut buf = Vec::new();
    for (i, t) in entries.iter().enumerate() {
        let values = ckpt.read_f32_hf_layout(t)?;
        buf.clear();
        dtype.encode(&values, &mut buf);
        out.write_all(&buf)?;
        progress(i + 1, entries.len());
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;

    write_side_files(ckpt, dir, dtype.torch_name(), None)?;
    sync_dir(dir)?;
    Ok(())
}

/// Writes config.json (with `torch_dtype` and, for quantized exports, `quantization_config`),
/// generation_config.json and the tokenizer files of `ckpt` into `dir`.
pub(super) fn write_side_files(
    ckpt: &Checkpoint,
    dir: &Path,
    torch_dtype: &str,
    quantization_config: Option<serde_json::Value>,
) -> Result<(), HfExportError> {
    let mut config = ckpt.config.to_hf_json();
    config["torch_dtype"] = serde_json::json!(torch_dtype);
    if let Some(q) = quantization_config {
        config["quantization_config"] = q;
    }
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({
        "bos_token_id": ckpt.config.bos_token_id, "eos_token_id": ckpt.config.eos_token_id}),
    )?;
    match ckpt.format {
        Format::Gguf => {
            let files = tokenizer_gguf::gguf_to_hf(&ckpt.gguf_metadata.iter().cloned().collect())
                .map_err(|e| HfExportError::Tokenizer(e.to_string()))?;
            std::fs::write(dir.join("tokenizer.json"), files.tokenizer_json)?;
            std::fs::write(
                dir.join("tokenizer_config.json"),
                files.tokenizer_config_json,
            )?;
            std::fs::write(
                dir.join("special_tokens_map.json"),
                files.special_tokens_map_json,
            )?;
        }
        Format::HfSafetensors => {
            for name in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                if let Some(p) = ckpt.side_files.get(name) {
                    std::fs::copy(p, dir.join(name))?;
                }
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(v).expect("JSON value serializes"),
    )
}
