//! GGUF `tokenizer.*` values back to Hugging Face files, for "gpt2" (byte-level BPE)
//! vocabularies: the vocabulary read and checked for shape, the pre-tokenizer that splits text as
//! llama.cpp does for the GGUF's pre name, and a post-processor adding BOS/EOS where asked.
//!
//! `gguf_to_hf` in the parent module assembles the three files from what `GgufVocab` reads.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};

use super::{
    Result, TokenizerGgufError, CONTROL, KEY_ADD_BOS, KEY_ADD_EOS, KEY_CHAT_TEMPLATE, KEY_MERGES,
    KEY_MODEL, KEY_PRE, KEY_TOKENS, KEY_TYPES, USER_DEFINED,
};

/// The `tokenizer.*` keys of a gpt2-vocabulary GGUF, checked for shape.
pub(super) struct GgufVocab<'a> {
    metadata: &'a HashMap<String, Value>,
    pub(super) tokens: Vec<&'a str>,
    pub(super) types: Vec<i64>,
    merges: Vec<&'a str>,
    pre: &'a str,
    pub(super) add_bos: bool,
    pub(super) add_eos: bool,
    pub(super) chat_template: Option<&'a str>,
    pub(super) context_length: Option<i64>,
}

impl<'a> GgufVocab<'a> {
    pub(super) fn read(metadata: &'a HashMap<String, Value>) -> Result<Self> {
        let model =
            meta_str(metadata, KEY_MODEL)?.ok_or_else(|| meta_error(KEY_MODEL, "is missing"))?;
        if model != "gpt2" {
            return Err(TokenizerGgufError::UnsupportedModel(model.into()));
        }
        let tokens = meta_strings(metadata, KEY_TOKENS)?;
        let types = meta_array(metadata, KEY_TYPES)?
            .iter()
            .map(value_int)
            .collect::<Option<Vec<i64>>>();
        let types =
            types.ok_or_else(|| meta_error(KEY_TYPES, "holds a value that is not an integer"))?;
        if types.len() != tokens.len() {
            return Err(meta_error(
                KEY_TYPES,
                format!("has {} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = meta_str(metadata, KEY_PRE)?.unwrap_or("default");
        // llama.cpp's own default when the file is silent: llama3-style vocabularies add BOS.
        let add_bos = meta_bool(metadata, KEY_ADD_BOS)?.unwrap_or(LLAMA3_PRES.contains(&pre));
        let arch = meta_str(metadata, "general.architecture")?;
        Ok(GgufVocab {
            metadata,
            tokens,
            types,
            // A BPE vocabulary without merges (pure byte-level) is written without the key.
            merges: if metadata.contains_key(KEY_MERGES) {
                meta_strings(metadata, KEY_MERGES)?
            } else {
                Vec::new()
            },
            pre,
            add_bos,
            add_eos: meta_bool(metadata, KEY_ADD_EOS)?.unwrap_or(false),
            chat_template: meta_str(metadata, KEY_CHAT_TEMPLATE)?,
            context_length: arch
                .and_then(|a| metadata.get(&format!("{a}.context_length")))
                .and_then(value_int),
        })
    }

    /// Ids of CONTROL and USER_DEFINED tokens, which become tokenizer.json added_tokens.
    pub(super) fn added_ids(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tokens.len()).filter(|&i| {
            self.types[i] == i64::from(CONTROL) || self.types[i] == i64::from(USER_DEFINED)
        })
    }

    /// bos/eos/unk/pad as (name, (text, id)), in that order, for those the GGUF names.
    pub(super) fn special_tokens(&self) -> Result<Vec<(&'static str, (&'a str, u32))>> {
        let mut found = Vec::new();
        for (name, key) in [
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
        ] {
            let key = format!("tokenizer.ggml.{key}");
            let Some(id) = self.metadata.get(&key) else {
                continue;
            };
            let text = value_int(id)
                .and_then(|id| usize::try_from(id).ok())
                .and_then(|id| self.tokens.get(id));
            let text = text.ok_or_else(|| {
                meta_error(
                    &key,
                    format!("is not a token id below {}", self.tokens.len()),
                )
            })?;
            found.push((name, (*text, value_int(id).unwrap_or_default() as u32)));
        }
        Ok(found)
    }

    pub(super) fn tokenizer_json(&self, specials: &[(&str, (&str, u32))]) -> Result<Json> {
        let vocab: Map<String, Json> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let merges = self
            .merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
            .collect::<Option<Vec<Json>>>()
            .ok_or_else(|| {
                meta_error(
                    KEY_MERGES,
                    "holds an entry without a space between its two parts",
                )
            })?;
        let added: Vec<Json> = self
            .added_ids()
            .map(|i| {
                json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": self.types[i] == i64::from(CONTROL)})
            })
            .collect();
        let special = |name: &str| specials.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        let bos = special("bos").filter(|_| self.add_bos);
        let eos = special("eos").filter(|_| self.add_eos);
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre_tokenizer_json(self.pre)?,
            "post_processor": post_processor_json(bos, eos),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": LLAMA3_PRES.contains(&self.pre), "vocab": vocab, "merges": merges},
        }))
    }
}

/// Pre names llama.cpp maps to its LLAMA3 pre-tokenizer (which also sets ignore_merges and BOS).
const LLAMA3_PRES: [&str; 9] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
];
/// Pre names llama.cpp splits as digits one by one, then GPT-2 style.
const DIGITS_PRES: [&str; 6] = [
    "smollm",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];
/// Pre names llama.cpp maps to its QWEN2 regex.
const QWEN2_PRES: [&str; 3] = ["qwen2", "deepseek-r1-qwen", "stablelm2"];
/// The original tokenizer.json regexes llama.cpp quotes beside its rewritten copies.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer that splits text as llama.cpp does for this pre name.
fn pre_tokenizer_json(pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool, trim_offsets: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex});
    let split = |regex: &str, trim_offsets: bool| {
        let split = json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        json!({"type": "Sequence", "pretokenizers": [split, byte_level(false, trim_offsets)]})
    };
    Ok(match pre {
        p if DIGITS_PRES.contains(&p) => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true, true)]})
        }
        "gpt2" | "gpt-2" | "default" => byte_level(true, true),
        p if LLAMA3_PRES.contains(&p) => split(LLAMA3_REGEX, true),
        p if QWEN2_PRES.contains(&p) => split(QWEN2_REGEX, false),
        other => return Err(TokenizerGgufError::UnsupportedPre(other.into())),
    })
}

/// ByteLevel alone, or followed by a template adding BOS/EOS where the GGUF asks for them.
fn post_processor_json(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    if bos.is_none() && eos.is_none() {
        return byte_level;
    }
    let special = |(text, _): (&str, u32), type_id: u32| json!({"SpecialToken": {"id": text, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let around = |id: &str, type_id: u32| -> Vec<Json> {
        bos.map(|b| special(b, type_id))
            .into_iter()
            .chain([sequence(id, type_id)])
            .chain(eos.map(|e| special(e, type_id)))
            .collect()
    };
    let special_tokens: Map<String, Json> = bos
        .into_iter()
        .chain(eos)
        .map(|(text, id)| {
            (
                text.to_owned(),
                json!({"id": text, "ids": [id], "tokens": [text]}),
            )
        })
        .collect();
    let pair: Vec<Json> = around("A", 0).into_iter().chain(around("B", 1)).collect();
    let template = json!({"type": "TemplateProcessing", "single": around("A", 0), "pair": pair, "special_tokens": special_tokens});
    json!({"type": "Sequence", "processors": [byte_level, template]})
}

fn meta_error(key: &str, problem: impl Into<String>) -> TokenizerGgufError {
    TokenizerGgufError::Metadata {
        key: key.into(),
        problem: problem.into(),
    }
}

fn meta_str<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(meta_error(
            key,
            format!("should be a string, is {:?}", other.value_type()),
        )),
    }
}

fn meta_bool(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(meta_error(
            key,
            format!("should be a bool, is {:?}", other.value_type()),
        )),
    }
}

fn meta_array<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    match metadata.get(key) {
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(meta_error(
            key,
            format!("should be an array, is {:?}", other.value_type()),
        )),
        None => Err(meta_error(key, "is missing")),
    }
}

fn meta_strings<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    let items = meta_array(metadata, key)?;
    let strings: Option<Vec<&str>> = items
        .iter()
        .map(|v| {
            if let Value::String(s) = v {
                Some(s.as_str())
            } else {
                None
            }
        })
        .collect();
    strings.ok_or_else(|| meta_error(key, "holds a value that is not a string"))
}

/// Any GGUF integer type widened, since writers differ in the width they pick for ids.
pub(super) fn value_int(value: &Value) -> Option<i64> {
    Some(match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => i64::try_from(v).ok()?,
        Value::I64(v) => v,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pre_names_are_refused_and_qwen2_gets_its_split_regex() {
        assert!(matches!(
            pre_tokenizer_json("tekken"),
            Err(TokenizerGgufError::UnsupportedPre(_))
        ));
        let qwen = pre_tokenizer_json("qwen2").unwrap();
        assert_eq!(qwen["pretokenizers"][0]["pattern"]["Regex"], QWEN2_REGEX);
        assert_eq!(qwen["pretokenizers"][1]["use_regex"], false);
    }
}
