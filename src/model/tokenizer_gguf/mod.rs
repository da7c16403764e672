//! Tokenizer metadata between Hugging Face files and GGUF key/values.
//!
//! This module owns the translation that llama.cpp's `convert_hf_to_gguf.py` performs for
//! BPE vocabularies (`get_vocab_base` / `_set_vocab_gpt2`, `_set_vocab_llama_hf` and gguf-py's
//! `SpecialVocab`), reproduced step by step so that a GGUF written by quantd tokenizes in
//! llama.cpp exactly like one written by convert. It also owns the way back for `gpt2`
//! vocabularies, so that a model that only exists as a GGUF can be served through the
//! `tokenizers` crate. The pre-tokenizer name is found the way convert finds it: the ids of a
//! fixed probe text are hashed and looked up in a table copied from convert_hf_to_gguf.py.
//!
//! The public entry points live here. `to_gguf` writes the vocabulary, merges and chat template,
//! `special` reproduces `SpecialVocab` (special token ids and the add_bos/add_eos flags),
//! `pre_hash` holds the probe text and the hash table, and `to_hf` reads a GGUF vocabulary back.

mod pre_hash;
mod special;
mod to_gguf;
mod to_hf;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use tokenizers::Tokenizer;

use special::SpecialVocab;
use to_gguf::{
    apply_llama_architecture_rules, is_sentencepiece_style, write_gpt2_vocab, write_llama_hf_vocab,
    KvList,
};
use to_hf::GgufVocab;

/// What can go wrong converting tokenizer metadata; each names the file and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerGgufError {
    #[error("tokenizer.json is not valid JSON: {0}")]
    TokenizerJsonSyntax(#[source] serde_json::Error),
    #[error("tokenizer.json could not be loaded by the tokenizers crate: {0}")]
    TokenizerLoad(String),
    #[error("tokenizer.json: {field} {problem}")]
    TokenizerJson { field: String, problem: String },
    #[error("{file}: {field} {problem}")]
    Config {
        file: &'static str,
        field: String,
        problem: String,
    },
    #[error("GGUF metadata {key}: {problem}")]
    Metadata { key: String, problem: String },
    #[error("GGUF tokenizer.ggml.model is {0:?}; only \"gpt2\" vocabularies convert back to Hugging Face files")]
    UnsupportedModel(String),
    #[error("GGUF tokenizer.ggml.pre is {0:?}, which has no Hugging Face pre-tokenizer here (known: smollm, gpt2, default, llama-bpe, qwen2 and their llama.cpp aliases)")]
    UnsupportedPre(String),
    #[error("could not serialise {file}: {source}")]
    Serialize {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, TokenizerGgufError>;

/// The three Hugging Face tokenizer files rebuilt from GGUF metadata, as JSON bytes.
#[derive(Debug, Clone)]
pub struct HfTokenizerFiles {
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config_json: Vec<u8>,
    pub special_tokens_map_json: Vec<u8>,
}

// gguf-py's TokenType values (llama.cpp's llama_token_type).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Builds the `tokenizer.*` GGUF key/values convert_hf_to_gguf.py would write for these files.
///
/// A BPE tokenizer.json with `byte_fallback` and a `Sequence` decoder is a sentencepiece-style
/// vocabulary (convert's `LlamaHfVocab`, model "llama", pre "default", scores, no merges); any
/// other BPE one is byte-level (convert's `get_vocab_base`, model "gpt2"). Special token ids
/// come from tokenizer_config.json, then config.json, then generation_config.json (quantd's
/// addition: convert itself never reads that last file).
pub fn hf_to_gguf_kv(
    tokenizer_json: &[u8],
    tokenizer_config: Option<&Json>,
    config: &Json,
    generation_config: Option<&Json>,
) -> Result<Vec<(String, Value)>> {
    let json: Json =
        serde_json::from_slice(tokenizer_json).map_err(TokenizerGgufError::TokenizerJsonSyntax)?;
    let tokenizer = Tokenizer::from_bytes(tokenizer_json)
        .map_err(|e| TokenizerGgufError::TokenizerLoad(e.to_string()))?;
    let mut kv = KvList::default();
    let sentencepiece_style = is_sentencepiece_style(&json)?;
    let n_vocab = if sentencepiece_style {
        Some(write_llama_hf_vocab(&mut kv, &tokenizer, tokenizer_config)?)
    } else {
        write_gpt2_vocab(&mut kv, &tokenizer, config)?;
        None
    };
    let mut special =
        SpecialVocab::from_tokenizer_files(&json, tokenizer_config, n_vocab, !sentencepiece_style)?;
    special.read_ids(config, "config.json")?;
    if let Some(generation_config) = generation_config {
        special.read_ids(generation_config, "generation_config.json")?;
    }
    special.write(&mut kv);
    apply_llama_architecture_rules(&mut kv, config);
    Ok(kv.0)
}

/// Rebuilds tokenizer.json, tokenizer_config.json and special_tokens_map.json from the
/// `tokenizer.*` metadata of a GGUF with a "gpt2" (byte-level BPE) vocabulary.
pub fn gguf_to_hf(metadata: &HashMap<String, Value>) -> Result<HfTokenizerFiles> {
    let vocab = GgufVocab::read(metadata)?;
    let specials = vocab.special_tokens()?;
    let tokenizer_json = vocab.tokenizer_json(&specials)?;
    let special_map: Map<String, Json> = specials
        .iter()
        .map(|(name, (text, _))| (format!("{name}_token"), json!(text)))
        .collect();
    let mut config = special_map.clone();
    config.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    if let Some(context_length) = vocab.context_length {
        config.insert("model_max_length".into(), json!(context_length));
    }
    config.insert("add_prefix_space".into(), json!(false));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("add_bos_token".into(), json!(vocab.add_bos));
    config.insert("add_eos_token".into(), json!(vocab.add_eos));
    let additional: Vec<&str> = vocab
        .added_ids()
        .filter(|&i| vocab.types[i] == i64::from(CONTROL))
        .map(|i| vocab.tokens[i])
        .collect();
    config.insert("additional_special_tokens".into(), json!(additional));
    if let Some(template) = vocab.chat_template {
        config.insert("chat_template".into(), json!(template));
    }
    let to_vec = |file: &'static str, value: &Json, pretty: bool| {
        let bytes = if pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        };
        bytes.map_err(|source| TokenizerGgufError::Serialize { file, source })
    };
    Ok(HfTokenizerFiles {
        tokenizer_json: to_vec("tokenizer.json", &tokenizer_json, false)?,
        tokenizer_config_json: to_vec("tokenizer_config.json", &Json::Object(config), true)?,
        special_tokens_map_json: to_vec(
            "special_tokens_map.json",
            &Json::Object(special_map),
            true,
        )?,
    })
}

#[cfg(test)]
mod tests;
