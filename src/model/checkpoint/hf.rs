//! Opening an HF checkpoint: config.json and the tokenizer checked within their limits, the
//! shards named by the index (or every `*.safetensors` file), each header read and every
//! tensor mapped to its GGUF name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{
    invalid, is_plain_file_name, mmap, order_and_check, CheckLimits, Checkpoint, CheckpointError,
    Format, SourceDtype, TensorRef, HF_SIDE_FILES,
};
use crate::model::config::ModelConfig;
use crate::model::names;
use crate::model::safetensors as st;
use crate::model::sniff::{sniff_file, FileKind};

impl Checkpoint {
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
            parts: Vec::new(),
        })
    }
}

pub(super) fn read_json(
    path: &Path,
    name: &str,
    limit: u64,
) -> Result<serde_json::Value, CheckpointError> {
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
