//! A validated checkpoint on disk: an HF safetensors folder (one file or index + shards) or a
//! single GGUF file. Opening one checks everything DESIGN §8 asks for (formats by content,
//! headers, shapes against the config, shard names); afterwards tensors can be read one at a
//! time, in GGUF naming and layout, whatever the source. Memory stays bounded: sources are
//! memory-mapped and each tensor's pages are released once it has been read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use memmap2::Mmap;

use super::config::{ConfigError, ModelConfig};
use super::names;
use super::safetensors::{self as st, StDtype};
use super::sniff::{sniff_file, FileKind};
use crate::formats::bnb4::{self, Bnb4Weight};
use crate::formats::gguf::{GgufFile, GgufTensorInfo, TensorType, Value};
use crate::formats::gptq_layout::{self, LayoutError, PackedLinear};
use crate::formats::int8_rows::{self, Int8Rows};

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
    /// Integer groups in the GPTQ layout (`quant::gptq_layout`), stored as four GGUF tensors;
    /// `file` indexes `Checkpoint::layouts`.
    GptqLayout {
        bits: u8,
    },
    /// Int8 rows (`quant::int8_rows`), stored as two GGUF tensors; `file` indexes
    /// `Checkpoint::int8`.
    Int8Rows,
    /// bitsandbytes' 4-bit blocks (`quant::bnb4`), stored as three or six GGUF tensors; `file`
    /// indexes `Checkpoint::bnb4`.
    Bnb4,
}

/// One stored part (qweight, qzeros, scales, g_idx) of a GPTQ-layout weight.
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
    /// The parts of each GPTQ-layout weight, in `gptq_layout::PARTS` order.
    layouts: Vec<[LayoutPart; 4]>,
    /// The parts of each int8-rows weight, in `int8_rows::PARTS` order.
    int8: Vec<[LayoutPart; 2]>,
    /// The parts of each bnb4 weight, in `bnb4::PARTS` order (three or six).
    bnb4: Vec<Vec<LayoutPart>>,
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

fn read_json(path: &Path, name: &str, limit: u64) -> Result<serde_json::Value, CheckpointError> {
    let io = |source| CheckpointError::Io {
        file: name.to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limit {
        return Err(invalid(
            name,
            format!("{len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(name, format!("invalid JSON: {e}")))
}

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

    pub fn open_hf(
        files: &BTreeMap<String, PathBuf>,
        limits: CheckLimits,
    ) -> Result<Self, CheckpointError> {
        for name in files.keys() {
            if !is_plain_file_name(name) {
                return Err(invalid(
                    name,
                    "file names must be plain names without paths",
                ));
            }
            if !HF_SIDE_FILES.contains(&name.as_str()) && !name.ends_with(".safetensors") {
                return Err(CheckpointError::Refused {
                    file: name.clone(),
                    what: "not part of an HF checkpoint (expected config.json, tokenizer.json, \
                           tokenizer_config.json, generation_config.json, *.safetensors, \
                           model.safetensors.index.json)",
                });
            }
        }
        let config_path = files
            .get("config.json")
            .ok_or_else(|| invalid("config.json", "missing from the upload"))?;
        let config_json = read_json(config_path, "config.json", limits.max_small_json)?;
        let config = ModelConfig::from_hf_json(&config_json)?;
        for side in [
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
        ] {
            if let Some(p) = files.get(side) {
                read_json(p, side, limits.max_small_json)?;
            }
        }
        let tok = files
            .get("tokenizer.json")
            .ok_or_else(|| invalid("tokenizer.json", "missing from the upload"))?;
        check_tokenizer(tok, limits.max_tokenizer)?;

        let shards = shard_names(files, limits)?;
        let mut maps = Vec::new();
        let mut found: HashMap<String, TensorRef> = HashMap::new();
        for shard in &shards {
            let path = &files[shard];
            let kind = sniff_file(path).map_err(|source| CheckpointError::Io {
                file: shard.clone(),
                source,
            })?;
            if kind != FileKind::Safetensors {
                return Err(invalid(
                    shard,
                    format!("not a safetensors file (looks like {})", kind.describe()),
                ));
            }
            let header =
                st::read_header(path, shard, limits.max_safetensors_header).map_err(|e| {
                    invalid(
                        shard,
                        e.to_string()
                            .trim_start_matches(&format!("{shard}: "))
                            .to_string(),
                    )
                })?;
            let file_index = maps.len();
            maps.push(mmap(path, shard)?);
            for t in header.tensors {
                if names::is_ignorable_hf(&t.name) {
                    continue;
                }
                let gguf = names::hf_to_gguf(&t.name).ok_or_else(|| {
                    invalid(
                        shard,
                        format!(
                            "unexpected tensor {:?} for a {} model",
                            t.name,
                            config.architecture.name()
                        ),
                    )
                })?;
                if gguf == "output.weight" && config.tie_word_embeddings {
                    // Tied checkpoints sometimes store the head anyway; llama.cpp ignores it too.
                    continue;
                }
                if !t.dtype.is_float() {
                    return Err(invalid(
                        shard,
                        format!(
                            "tensor {:?} has dtype {}; only F32, F16 and BF16 weights are accepted",
                            t.name,
                            t.dtype.name()
                        ),
                    ));
                }
                let r = TensorRef {
                    name: gguf.clone(),
                    shape: t.shape,
                    dtype: SourceDtype::Safetensors(t.dtype),
                    file: file_index,
                    offset: t.offset,
                    len: t.len,
                };
                if found.insert(gguf, r).is_some() {
                    return Err(invalid(shard, format!("tensor {:?} appears twice", t.name)));
                }
            }
        }
        let mut computed = Vec::new();
        if let Some(factors) = config.llama3_rope_factors() {
            let name = "rope_freqs.weight".to_string();
            let r = TensorRef {
                name: name.clone(),
                shape: vec![factors.len()],
                dtype: SourceDtype::Computed,
                file: 0,
                offset: 0,
                len: factors.len() as u64 * 4,
            };
            computed.push(factors);
            found.insert(name, r);
        }
        let tensors = order_and_check(&config, found, "model.safetensors")?;
        Ok(Self {
            format: Format::HfSafetensors,
            config,
            tensors,
            side_files: files
                .iter()
                .filter(|(n, _)| !n.ends_with(".safetensors"))
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            gguf_metadata: Vec::new(),
            maps,
            computed,
            layouts: Vec::new(),
            int8: Vec::new(),
            bnb4: Vec::new(),
        })
    }

    pub fn open_gguf(path: &Path, name: &str) -> Result<Self, CheckpointError> {
        let file = GgufFile::open(path).map_err(|e| invalid(name, e.to_string()))?;
        let config = super::gguf_config::config_from_gguf(&file).map_err(|e| match e {
            CheckpointError::Invalid { message, .. } => invalid(name, message),
            other => other,
        })?;
        let mut found = HashMap::new();
        let mut parts: BTreeMap<String, [Option<&GgufTensorInfo>; 4]> = BTreeMap::new();
        let mut int8_parts: BTreeMap<String, [Option<&GgufTensorInfo>; 2]> = BTreeMap::new();
        let mut bnb4_parts: BTreeMap<String, [Option<&GgufTensorInfo>; 6]> = BTreeMap::new();
        for t in &file.tensors {
            let (prefix, suffix) = t.name.rsplit_once('.').unwrap_or((&t.name, ""));
            if let Some(i) = bnb4::PARTS.iter().position(|(s, _)| *s == suffix) {
                // The absmax is F32, or I8 codes with double quantization.
                let ok = bnb4::PARTS[i].1.tensor_type() == t.dtype
                    || (suffix == "bnb4_absmax" && t.dtype == TensorType::I8);
                if !ok {
                    return Err(invalid(
                        name,
                        format!("tensor {} has type {}", t.name, t.dtype.name()),
                    ));
                }
                bnb4_parts.entry(prefix.to_string()).or_default()[i] = Some(t);
                continue;
            }
            let gptq_part = gptq_layout::PARTS.iter().position(|(s, _)| *s == suffix);
            let int8_part = int8_rows::PARTS.iter().position(|(s, _)| *s == suffix);
            let want = match (gptq_part, int8_part) {
                (Some(i), _) => Some(gptq_layout::PARTS[i].1),
                (_, Some(i)) => Some(int8_rows::PARTS[i].1),
                _ => None,
            };
            if let Some(want) = want {
                if want.tensor_type() != t.dtype {
                    return Err(invalid(
                        name,
                        format!("tensor {} has type {}", t.name, t.dtype.name()),
                    ));
                }
                match (gptq_part, int8_part) {
                    (Some(i), _) => parts.entry(prefix.to_string()).or_default()[i] = Some(t),
                    (_, Some(i)) => int8_parts.entry(prefix.to_string()).or_default()[i] = Some(t),
                    _ => unreachable!("want is Some"),
                }
                continue;
            }
            let dtype = match t.dtype.ggml() {
                Some(dtype) => dtype,
                None => {
                    return Err(invalid(
                        name,
                        format!(
                            "tensor {} has type {}, which only GPTQ-layout and int8 parts may have",
                            t.name,
                            t.dtype.name()
                        ),
                    ))
                }
            };
            found.insert(
                t.name.clone(),
                TensorRef {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: SourceDtype::Ggml(dtype),
                    file: 0,
                    offset: t.offset,
                    len: t.size,
                },
            );
        }
        let mut layouts = Vec::new();
        for (prefix, p) in parts {
            let weight = format!("{prefix}.weight");
            let [Some(qweight), Some(qzeros), Some(scales), Some(g_idx)] = p else {
                let missing = gptq_layout::PARTS
                    .iter()
                    .zip(&p)
                    .filter(|(_, t)| t.is_none())
                    .map(|((s, _), _)| format!("{prefix}.{s}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(invalid(
                    name,
                    format!("GPTQ-layout tensor {missing} is missing"),
                ));
            };
            let (rows, cols) = match (qweight.shape.as_slice(), g_idx.shape.as_slice()) {
                ([_, rows], [cols]) => (*rows, *cols),
                _ => {
                    return Err(invalid(
                        name,
                        format!("{prefix}.qweight/g_idx are not 2-D/1-D"),
                    ))
                }
            };
            let all = [qweight, qzeros, scales, g_idx];
            let (bits, _) = PackedLinear::check_shapes(rows, cols, all.map(|t| t.shape.as_slice()))
                .map_err(|e| invalid(name, format!("{prefix}: {e}")))?;
            if found.contains_key(&weight) {
                return Err(invalid(
                    name,
                    format!("{weight} is stored both as a tensor and in the GPTQ layout"),
                ));
            }
            found.insert(
                weight.clone(),
                TensorRef {
                    name: weight,
                    shape: vec![rows, cols],
                    dtype: SourceDtype::GptqLayout { bits },
                    file: layouts.len(),
                    offset: 0,
                    len: all.iter().map(|t| t.size).sum(),
                },
            );
            layouts.push(all.map(|t| LayoutPart {
                shape: t.shape.clone(),
                file: 0,
                offset: t.offset,
                len: t.size,
            }));
        }
        let mut int8 = Vec::new();
        for (prefix, p) in int8_parts {
            let weight = format!("{prefix}.weight");
            let [Some(levels), Some(scales)] = p else {
                return Err(invalid(
                    name,
                    format!("int8 weight {prefix} needs both {prefix}.int8_weight and {prefix}.int8_scale"),
                ));
            };
            let [rows, cols] = levels.shape[..] else {
                return Err(invalid(name, format!("{prefix}.int8_weight is not 2-D")));
            };
            if scales.shape != [rows] {
                return Err(invalid(
                    name,
                    format!(
                        "{prefix}.int8_scale has shape {:?}, expected [{rows}]",
                        scales.shape
                    ),
                ));
            }
            if found.contains_key(&weight) {
                return Err(invalid(
                    name,
                    format!("{weight} is stored both as a tensor and as int8 rows"),
                ));
            }
            found.insert(
                weight.clone(),
                TensorRef {
                    name: weight,
                    shape: vec![rows, cols],
                    dtype: SourceDtype::Int8Rows,
                    file: int8.len(),
                    offset: 0,
                    len: levels.size + scales.size,
                },
            );
            int8.push([levels, scales].map(|t| LayoutPart {
                shape: t.shape.clone(),
                file: 0,
                offset: t.offset,
                len: t.size,
            }));
        }
        let mut bnb4 = Vec::new();
        for (prefix, p) in bnb4_parts {
            let weight = format!("{prefix}.weight");
            let present: Vec<&GgufTensorInfo> = p.iter().map_while(|t| *t).collect();
            let double = p[2].is_some_and(|t| t.dtype == TensorType::I8);
            let want = if double { 6 } else { 3 };
            if present.len() != want || p.iter().filter(|t| t.is_some()).count() != want {
                let names: Vec<String> = bnb4::Format::parts(double)
                    .iter()
                    .map(|(s, _)| format!("{prefix}.{s}"))
                    .collect();
                return Err(invalid(
                    name,
                    format!("bnb4 weight {prefix} needs exactly {}", names.join(", ")),
                ));
            }
            let [rows, packed_cols] = present[0].shape[..] else {
                return Err(invalid(name, format!("{prefix}.bnb4_weight is not 2-D")));
            };
            if found.contains_key(&weight) {
                return Err(invalid(
                    name,
                    format!("{weight} is stored both as a tensor and in bnb4 parts"),
                ));
            }
            found.insert(
                weight.clone(),
                TensorRef {
                    name: weight,
                    shape: vec![rows, packed_cols * 2],
                    dtype: SourceDtype::Bnb4,
                    file: bnb4.len(),
                    offset: 0,
                    len: present.iter().map(|t| t.size).sum(),
                },
            );
            bnb4.push(
                present
                    .iter()
                    .map(|t| LayoutPart {
                        shape: t.shape.clone(),
                        file: 0,
                        offset: t.offset,
                        len: t.size,
                    })
                    .collect(),
            );
        }
        let tensors = order_and_check(&config, found, name)?;
        Ok(Self {
            format: Format::Gguf,
            config,
            tensors,
            side_files: BTreeMap::new(),
            gguf_metadata: file.metadata,
            maps: vec![mmap(path, name)?],
            computed: Vec::new(),
            layouts,
            int8,
            bnb4,
        })
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
            .map(|path| read_json(path, name, u64::MAX))
            .transpose()
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.elem_count() as u64).sum()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A GPTQ-layout weight's parts, decoded and checked; `None` for other tensors.
    pub fn packed_linear(&self, t: &TensorRef) -> Option<Result<PackedLinear, LayoutError>> {
        let SourceDtype::GptqLayout { .. } = t.dtype else {
            return None;
        };
        let parts = &self.layouts[t.file];
        let bytes = parts
            .each_ref()
            .map(|p| &self.maps[p.file][p.offset as usize..(p.offset + p.len) as usize]);
        let inputs = std::array::from_fn(|i| (parts[i].shape.as_slice(), bytes[i]));
        let packed = PackedLinear::from_parts(t.shape[0], t.shape[1], inputs)
            .map_err(|e| LayoutError(format!("{}: {e}", t.name)));
        for p in parts {
            self.release_range(p.file, p.offset, p.len);
        }
        Some(packed)
    }

    /// An int8-rows weight, decoded and checked; `None` for other tensors.
    pub fn int8_rows(&self, t: &TensorRef) -> Option<Result<Int8Rows, LayoutError>> {
        if t.dtype != SourceDtype::Int8Rows {
            return None;
        }
        let parts = &self.int8[t.file];
        let inputs = parts.each_ref().map(|p| {
            let bytes = &self.maps[p.file][p.offset as usize..(p.offset + p.len) as usize];
            (p.shape.as_slice(), bytes)
        });
        let rows = Int8Rows::from_parts(t.shape[0], t.shape[1], inputs)
            .map_err(|e| LayoutError(format!("{}: {e}", t.name)));
        for p in parts {
            self.release_range(p.file, p.offset, p.len);
        }
        Some(rows)
    }

    /// A bnb4 weight, decoded and checked; `None` for other tensors.
    pub fn bnb4_weight(&self, t: &TensorRef) -> Option<Result<Bnb4Weight, LayoutError>> {
        if t.dtype != SourceDtype::Bnb4 {
            return None;
        }
        let parts = &self.bnb4[t.file];
        let inputs: Vec<(&[usize], &[u8])> = parts
            .iter()
            .map(|p| {
                let bytes = &self.maps[p.file][p.offset as usize..(p.offset + p.len) as usize];
                (p.shape.as_slice(), bytes)
            })
            .collect();
        let weight = Bnb4Weight::from_parts(t.shape[0], t.shape[1], &inputs)
            .map_err(|e| LayoutError(format!("{}: {e}", t.name)));
        for p in parts {
            self.release_range(p.file, p.offset, p.len);
        }
        Some(weight)
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

fn check_tokenizer(path: &Path, limit: u64) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        file: "tokenizer.json".into(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limit {
        return Err(invalid(
            "tokenizer.json",
            format!("{len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    tokenizers::Tokenizer::from_bytes(&bytes)
        .map(|_| ())
        .map_err(|e| {
            invalid(
                "tokenizer.json",
                format!("does not load as a tokenizer: {e}"),
            )
        })
}

/// The safetensors files to read: those named by the index (all of which must be plain names
/// present in the upload), or every `*.safetensors` file when there is no index.
fn shard_names(
    files: &BTreeMap<String, PathBuf>,
    limits: CheckLimits,
) -> Result<Vec<String>, CheckpointError> {
    const INDEX: &str = "model.safetensors.index.json";
    let uploaded: Vec<String> = files
        .keys()
        .filter(|n| n.ends_with(".safetensors"))
        .cloned()
        .collect();
    let Some(index_path) = files.get(INDEX) else {
        if uploaded.is_empty() {
            return Err(invalid(
                "model.safetensors",
                "no *.safetensors file in the upload",
            ));
        }
        return Ok(uploaded);
    };
    let index = read_json(index_path, INDEX, limits.max_small_json)?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid(INDEX, "weight_map must be an object"))?;
    let mut shards = HashSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| invalid(INDEX, format!("weight_map[{tensor:?}] must be a string")))?;
        if !is_plain_file_name(shard) || !shard.ends_with(".safetensors") {
            return Err(invalid(
                INDEX,
                format!("shard name {shard:?} must be a plain *.safetensors file name"),
            ));
        }
        if !files.contains_key(shard) {
            return Err(invalid(
                INDEX,
                format!("shard {shard:?} is named by the index but not uploaded"),
            ));
        }
        shards.insert(shard.to_string());
    }
    if let Some(extra) = uploaded.iter().find(|u| !shards.contains(u.as_str())) {
        return Err(invalid(
            extra,
            "this safetensors file is not named by model.safetensors.index.json",
        ));
    }
    let mut shards: Vec<String> = shards.into_iter().collect();
    shards.sort();
    Ok(shards)
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
