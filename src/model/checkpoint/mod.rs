//! A validated checkpoint on disk: an HF safetensors folder (one file or index + shards) or a
//! single GGUF file. Opening one checks everything DESIGN §8 asks for (formats by content,
//! headers, shapes against the config, shard names); afterwards tensors can be read one at a
//! time, in GGUF naming and layout, whatever the source. Memory stays bounded: sources are
//! memory-mapped and each tensor's pages are released once it has been read. `hf` opens
//! safetensors folders, `gguf` opens GGUF files; both end in `order_and_check`.

mod gguf;
mod hf;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use memmap2::Mmap;

use super::config::{ConfigError, ModelConfig};
use super::names;
use super::safetensors::StDtype;
use super::sniff::sniff_file;
use crate::formats::bnb4::Bnb4Weight;
use crate::formats::gguf::Value;
use crate::formats::gptq_layout::{LayoutError, PackedLinear};
use crate::formats::int8_rows::Int8Rows;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Format {
    #[serde(rename = "hf-safetensors")]
    HfSafetensors,
    #[serde(rename = "gguf")]
    Gguf,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HfSafetensors => "hf-safetensors",
            Self::Gguf => "gguf",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: unsupported file type: {what}")]
    Refused { file: String, what: &'static str },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
}

fn invalid(file: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        file: file.to_string(),
        message: message.into(),
    }
}

/// Size limits that apply while validating uploads.
#[derive(Debug, Clone, Copy)]
pub struct CheckLimits {
    pub max_safetensors_header: u64,
    pub max_tokenizer: u64,
    pub max_small_json: u64,
}

/// Where a tensor's bytes are and how they are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    Safetensors(StDtype),
    Ggml(GgmlDType),
    /// Derived from the config (Llama 3 RoPE factors); `file` indexes `Checkpoint::computed`.
    Computed,
    /// Integer groups in the GPTQ layout (`formats::gptq_layout`), stored as four GGUF tensors;
    /// `file` indexes `Checkpoint::parts`.
    GptqLayout {
        bits: u8,
    },
    /// Int8 rows (`formats::int8_rows`), stored as two GGUF tensors; `file` indexes
    /// `Checkpoint::parts`.
    Int8Rows,
    /// bitsandbytes' 4-bit blocks (`formats::bnb4`), stored as three or six GGUF tensors; `file`
    /// indexes `Checkpoint::parts`.
    Bnb4,
}

/// One stored part of a weight kept as several GGUF tensors (GPTQ layout, int8 rows, bnb4).
#[derive(Debug, Clone)]
struct LayoutPart {
    shape: Vec<usize>,
    file: usize,
    offset: u64,
    len: u64,
}

#[derive(Debug, Clone)]
pub struct TensorRef {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    pub dtype: SourceDtype,
    file: usize,
    offset: u64,
    len: u64,
}

impl TensorRef {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct Checkpoint {
    pub format: Format,
    pub config: ModelConfig,
    /// In llama.cpp's order: token_embd, blk.0.*, ..., output_norm, output.
    pub tensors: Vec<TensorRef>,
    /// HF side files by name (config.json, tokenizer.json, ...); empty for GGUF.
    pub side_files: BTreeMap<String, PathBuf>,
    /// GGUF metadata (GGUF sources only).
    pub gguf_metadata: Vec<(String, Value)>,
    maps: Vec<Mmap>,
    computed: Vec<Vec<f32>>,
    /// The parts of each weight stored as several tensors (GPTQ layout, int8 rows, bnb4), in
    /// its format's `PARTS` order; such a weight's `TensorRef::file` indexes this.
    parts: Vec<Vec<LayoutPart>>,
}

/// Names an HF upload may contain besides weights.
pub const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
];

/// Whether an uploaded file holds weights (the rest are configs and tokenizers).
pub fn is_weights_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

/// A shard name from an index must be a plain file name of the same upload.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
        && name.len() <= 255
}

fn mmap(path: &Path, name: &str) -> Result<Mmap, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        file: name.to_string(),
        source,
    })?;
    // SAFETY: quantd owns these files (content-addressed blobs, never modified in place).
    unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
        file: name.to_string(),
        source,
    })
}

impl Checkpoint {
    /// Refuses pickles and archives whatever their names, then opens the set as a GGUF (one
    /// `.gguf` file) or an HF folder.
    pub fn open(
        files: &BTreeMap<String, PathBuf>,
        limits: CheckLimits,
    ) -> Result<Self, CheckpointError> {
        for (name, path) in files {
            if !is_plain_file_name(name) {
                return Err(invalid(
                    name,
                    "file names must be plain names without paths or control characters",
                ));
            }
            let kind = sniff_file(path).map_err(|source| CheckpointError::Io {
                file: name.clone(),
                source,
            })?;
            if kind.is_refused_archive_or_pickle() {
                return Err(CheckpointError::Refused {
                    file: name.clone(),
                    what: kind.describe(),
                });
            }
        }
        let ggufs: Vec<_> = files.keys().filter(|n| n.ends_with(".gguf")).collect();
        match ggufs.as_slice() {
            [] => Self::open_hf(files, limits),
            [one] if files.len() == 1 => Self::open_gguf(files[*one].as_path(), one),
            _ => Err(invalid(
                ggufs[0],
                "a GGUF upload is exactly one .gguf file with nothing beside it",
            )),
        }
    }

    /// (GGUF name, row-major shape) of every tensor, in write order: what plans are made from.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }

    /// A side file (config.json, tokenizer_config.json, ...) parsed as JSON, if the checkpoint
    /// has it. Its size was checked when the checkpoint was opened.
    pub fn side_json(&self, name: &str) -> Result<Option<serde_json::Value>, CheckpointError> {
        self.side_files
            .get(name)
            .map(|path| hf::read_json(path, name, u64::MAX))
            .transpose()
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.elem_count() as u64).sum()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The shapes and bytes of a multi-part weight's parts, for its format's `from_parts`; the
    /// pages are released once `decode` has read them.
    fn decode_parts<T>(
        &self,
        t: &TensorRef,
        decode: impl FnOnce(&[(&[usize], &[u8])]) -> Result<T, LayoutError>,
    ) -> Result<T, LayoutError> {
        let parts = &self.parts[t.file];
        let inputs: Vec<(&[usize], &[u8])> = parts
            .iter()
            .map(|p| {
                let bytes = &self.maps[p.file][p.offset as usize..(p.offset + p.len) as usize];
                (p.shape.as_slice(), bytes)
            })
            .collect();
        let decoded = decode(&inputs).map_err(|e| LayoutError(format!("{}: {e}", t.name)));
        for p in parts {
            self.release_range(p.file, p.offset, p.len);
        }
        decoded
    }

    /// A GPTQ-layout weight's parts, decoded and checked; `None` for other tensors.
    pub fn packed_linear(&self, t: &TensorRef) -> Option<Result<PackedLinear, LayoutError>> {
        let SourceDtype::GptqLayout { .. } = t.dtype else {
            return None;
        };
        Some(self.decode_parts(t, |inputs| {
            let inputs = inputs
                .try_into()
                .map_err(|_| LayoutError("GPTQ layout needs 4 parts".into()))?;
            PackedLinear::from_parts(t.shape[0], t.shape[1], inputs)
        }))
    }

    /// An int8-rows weight, decoded and checked; `None` for other tensors.
    pub fn int8_rows(&self, t: &TensorRef) -> Option<Result<Int8Rows, LayoutError>> {
        if t.dtype != SourceDtype::Int8Rows {
            return None;
        }
        Some(self.decode_parts(t, |inputs| {
            let inputs = inputs
                .try_into()
                .map_err(|_| LayoutError("int8 rows need 2 parts".into()))?;
            Int8Rows::from_parts(t.shape[0], t.shape[1], inputs)
        }))
    }

    /// A bnb4 weight, decoded and checked; `None` for other tensors.
    pub fn bnb4_weight(&self, t: &TensorRef) -> Option<Result<Bnb4Weight, LayoutError>> {
        if t.dtype != SourceDtype::Bnb4 {
            return None;
        }
        Some(self.decode_parts(t, |inputs| {
            Bnb4Weight::from_parts(t.shape[0], t.shape[1], inputs)
        }))
    }

    /// The raw bytes of a tensor as stored (not defined for GPTQ-layout weights, which are
    /// several tensors: see [`Checkpoint::packed_linear`]).
    pub fn raw_bytes(&self, t: &TensorRef) -> &[u8] {
        &self.maps[t.file][t.offset as usize..(t.offset + t.len) as usize]
    }

    /// A tensor as f32 values in GGUF layout (Q/K rows permuted for llama.cpp when the source
    /// is HF). Releases the source pages afterwards so reading a model tensor by tensor keeps
    /// the resident set at one tensor.
    pub fn read_f32(&self, t: &TensorRef) -> candle_core::Result<Vec<f32>> {
        if t.dtype == SourceDtype::Computed {
            return Ok(self.computed[t.file].clone());
        }
        if let Some(packed) = self.packed_linear(t) {
            return packed
                .map(|p| p.dequantize())
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        if let Some(rows) = self.int8_rows(t) {
            return rows
                .map(|r| r.dequantize())
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        if let Some(w) = self.bnb4_weight(t) {
            return w
                .map(|w| w.dequantize())
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        let bytes = self.raw_bytes(t);
        let values = match t.dtype {
            SourceDtype::Safetensors(dtype) => {
                let v = decode_float(bytes, dtype);
                match names::qk_permute_heads(&self.config, &t.name) {
                    Some(heads) => {
                        names::permute_qk(&v, heads, t.shape.get(1).copied().unwrap_or(1))
                    }
                    None => v,
                }
            }
            SourceDtype::Computed
            | SourceDtype::GptqLayout { .. }
            | SourceDtype::Int8Rows
            | SourceDtype::Bnb4 => {
                unreachable!("handled above")
            }
            // Float tensors of a GGUF decode directly; going through candle copies them twice.
            SourceDtype::Ggml(GgmlDType::F32) => decode_float(bytes, StDtype::F32),
            SourceDtype::Ggml(GgmlDType::F16) => decode_float(bytes, StDtype::F16),
            SourceDtype::Ggml(GgmlDType::BF16) => decode_float(bytes, StDtype::BF16),
            SourceDtype::Ggml(dtype) => {
                let q = QTensor::new(
                    candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Borrowed(bytes),
                        &candle_core::Device::Cpu,
                        dtype,
                    )?,
                    t.shape.as_slice(),
                )?;
                q.dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        };
        self.release(t);
        Ok(values)
    }

    /// Like [`read_f32`](Self::read_f32) but in HF layout (Q/K rows in rotate-half order).
    pub fn read_f32_hf_layout(&self, t: &TensorRef) -> candle_core::Result<Vec<f32>> {
        let v = self.read_f32(t)?;
        Ok(match names::qk_permute_heads(&self.config, &t.name) {
            Some(heads) => names::unpermute_qk(&v, heads, t.shape.get(1).copied().unwrap_or(1)),
            None => v,
        })
    }

    fn release(&self, t: &TensorRef) {
        self.release_range(t.file, t.offset, t.len);
    }

    fn release_range(&self, file: usize, offset: u64, len: u64) {
        let map = &self.maps[file];
        let page = 4096u64;
        let start = offset / page * page;
        let end = (offset + len).min(map.len() as u64);
        // SAFETY: DontNeed on a read-only private file mapping only drops cached pages; later
        // reads fault them in again from the file.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )
        };
    }
}

/// Checks that exactly the tensors the config needs are there, with the right shapes, and
/// returns them in llama.cpp's order.
fn order_and_check(
    cfg: &ModelConfig,
    mut found: HashMap<String, TensorRef>,
    file: &str,
) -> Result<Vec<TensorRef>, CheckpointError> {
    let mut ordered = Vec::with_capacity(found.len());
    let optional = names::OPTIONAL_TENSORS
        .iter()
        .map(|n| n.to_string())
        .filter(|n| found.contains_key(n));
    let optional: Vec<String> = optional.collect();
    for name in optional.into_iter().chain(names::required_tensors(cfg)) {
        let t = found
            .remove(&name)
            .ok_or_else(|| invalid(file, format!("tensor {name} is missing")))?;
        let expected = names::expected_shape(cfg, &name).expect("known tensors have shapes");
        if t.shape != expected {
            return Err(invalid(
                file,
                format!(
                    "tensor {name} has shape {:?} but config.json implies {expected:?}",
                    t.shape
                ),
            ));
        }
        ordered.push(t);
    }
    if let Some(extra) = found.keys().min() {
        return Err(invalid(file, format!("unexpected tensor {extra} (layer beyond num_hidden_layers, or a bias the config does not declare)")));
    }
    Ok(ordered)
}

/// Decodes little-endian F32/F16/BF16 bytes.
pub fn decode_float(bytes: &[u8], dtype: StDtype) -> Vec<f32> {
    match dtype {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => unreachable!("non-float dtype {other:?} is refused when the checkpoint is opened"),
    }
}
