//! Hugging Face tokenizer files to GGUF `tokenizer.*` values: the vocabulary (convert's
//! `_set_vocab_gpt2` and `LlamaHfVocab`), merges, chat templates and the Llama rule that runs
//! after the tokenizer files have had their say.
//!
//! `KvList` collects the key/values in the order convert writes them; `special` adds the special
//! token ids and flags to the same list.

use std::collections::HashSet;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::pre_hash::detect_pre;
use super::{
    Result, TokenizerGgufError, BYTE, CONTROL, KEY_ADD_BOS, KEY_CHAT_TEMPLATE, KEY_MODEL, KEY_PRE,
    KEY_SCORES, KEY_TOKENS, KEY_TYPES, NORMAL, UNUSED, USER_DEFINED,
};

/// GGUF key/values in insertion order. Setting a key again overwrites it in place, as gguf-py's
/// GGUFWriter does when convert writes a key twice (add_bos_token for 49152-token llamas).
#[derive(Default)]
pub(super) struct KvList(pub(super) Vec<(String, Value)>);

impl KvList {
    pub(super) fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

pub(super) fn string_array(items: impl IntoIterator<Item = String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

/// Mirrors LlamaModel.set_vocab's fall-through: `LlamaHfVocab` accepts a BPE model with
/// byte_fallback and a Sequence decoder, except Llama 3 style (ignore_merges, no byte_fallback).
pub(super) fn is_sentencepiece_style(json: &Json) -> Result<bool> {
    let model = &json["model"];
    let kind = model["type"]
        .as_str()
        .unwrap_or(if model["merges"].is_array() {
            "BPE"
        } else {
            ""
        });
    if kind != "BPE" {
        return Err(TokenizerGgufError::TokenizerJson {
            field: "model.type".into(),
            problem: format!("is {kind:?}; only BPE vocabularies are converted"),
        });
    }
    let byte_fallback = model["byte_fallback"].as_bool();
    let llama3 = model["ignore_merges"].as_bool() == Some(true) && !byte_fallback.unwrap_or(true);
    Ok(!llama3 && byte_fallback == Some(true) && json["decoder"]["type"] == "Sequence")
}

/// convert's `get_vocab_base` + `_set_vocab_gpt2` token list, types and pre-tokenizer name.
pub(super) fn write_gpt2_vocab(
    kv: &mut KvList,
    tokenizer: &Tokenizer,
    config: &Json,
) -> Result<()> {
    let vocab = tokenizer.get_vocab(true);
    let vocab_size = config_vocab_size(config).unwrap_or(vocab.len() as u64);
    if let Some(max_id) = vocab
        .values()
        .max()
        .filter(|&&id| u64::from(id) >= vocab_size)
    {
        return Err(TokenizerGgufError::Config {
            file: "config.json",
            field: "vocab_size".into(),
            problem: format!("is {vocab_size}, but tokenizer.json has token id {max_id}"),
        });
    }
    let added = tokenizer.get_added_tokens_decoder();
    let (tokens, types): (Vec<String>, Vec<i32>) = (0..vocab_size as u32)
        .map(|id| match (tokenizer.id_to_token(id), added.get(&id)) {
            (None, _) => (format!("[PAD{id}]"), UNUSED),
            (Some(token), None) => (token, NORMAL),
            (Some(token), Some(a)) if a.special || looks_special(&token) => (token, CONTROL),
            // llama.cpp expects user-defined tokens pre-normalized: sentencepiece spaces as spaces.
            (Some(token), Some(_)) => (token.replace('\u{2581}', " "), USER_DEFINED),
        })
        .unzip();
    kv.set(KEY_MODEL, Value::String("gpt2".into()));
    kv.set(KEY_PRE, Value::String(detect_pre(tokenizer)?.into()));
    kv.set(KEY_TOKENS, string_array(tokens));
    kv.set(
        KEY_TYPES,
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    Ok(())
}

/// `hparams["vocab_size"]`, which convert also finds in a multimodal model's text_config.
fn config_vocab_size(config: &Json) -> Option<u64> {
    config["vocab_size"]
        .as_u64()
        .or_else(|| config["text_config"]["vocab_size"].as_u64())
}

/// convert's `does_token_look_special`: added tokens some models forget to mark special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{FF5C}") && token.ends_with("\u{FF5C}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// gguf-py's `LlamaHfVocab`: base vocabulary by id, then added tokens beyond it; every score
/// is -1000 and no merges are written (convert's SpecialVocab is built with load_merges off).
pub(super) fn write_llama_hf_vocab(
    kv: &mut KvList,
    tokenizer: &Tokenizer,
    tokenizer_config: Option<&Json>,
) -> Result<usize> {
    let vocab = tokenizer.get_vocab(true);
    let special_ids: HashSet<u32> = special_token_strings(tokenizer_config)
        .iter()
        .filter_map(|t| vocab.get(t).copied())
        .collect();
    let base = tokenizer.get_vocab_size(false) as u32;
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    for id in 0..base {
        let token = tokenizer
            .id_to_token(id)
            .ok_or_else(|| TokenizerGgufError::TokenizerJson {
                field: "model.vocab".into(),
                problem: format!("has no token with id {id} (ids must run 0..{base})"),
            })?;
        types.push(if is_byte_token(&token) {
            BYTE
        } else if special_ids.contains(&id) {
            CONTROL
        } else {
            NORMAL
        });
        tokens.push(token);
    }
    let mut extra: Vec<(u32, String)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(id, _)| *id >= base)
        .map(|(id, token)| (id, token.content))
        .collect();
    extra.sort();
    for (id, content) in extra {
        types.push(if special_ids.contains(&id) {
            CONTROL
        } else {
            USER_DEFINED
        });
        tokens.push(content);
    }
    let n_vocab = tokens.len();
    kv.set(KEY_MODEL, Value::String("llama".into()));
    kv.set(KEY_PRE, Value::String("default".into()));
    kv.set(KEY_TOKENS, string_array(tokens));
    kv.set(KEY_SCORES, Value::Array(vec![Value::F32(-1000.0); n_vocab]));
    kv.set(
        KEY_TYPES,
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    Ok(n_vocab)
}

/// transformers' `all_special_tokens` as read from tokenizer_config.json.
fn special_token_strings(tokenizer_config: Option<&Json>) -> Vec<String> {
    let Some(tc) = tokenizer_config else {
        return Vec::new();
    };
    let named =
        ["bos", "eos", "unk", "sep", "pad", "cls", "mask"].map(|t| &tc[format!("{t}_token")]);
    let extra = tc["additional_special_tokens"]
        .as_array()
        .into_iter()
        .flatten();
    named
        .into_iter()
        .chain(extra)
        .filter_map(token_content)
        .collect()
}

/// A token named in tokenizer_config.json, either a bare string or an AddedToken dict.
pub(super) fn token_content(entry: &Json) -> Option<String> {
    entry
        .as_str()
        .or_else(|| entry["content"].as_str())
        .map(str::to_owned)
}

/// `re.fullmatch(br"<0x[0-9A-Fa-f]{2}>", token)`.
fn is_byte_token(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// tokenizer.json merges as GGUF strings "a b". The newer pair format may hold spaces inside a
/// part; convert writes those as U+0120 ('Ġ', the byte-level space) so "a b" stays splittable.
pub(super) fn gguf_merges(merges: &Json) -> Result<Vec<String>> {
    let Some(list) = merges.as_array().filter(|l| !l.is_empty()) else {
        return Ok(Vec::new());
    };
    let bad = || TokenizerGgufError::TokenizerJson {
        field: "model.merges".into(),
        problem: "is neither a list of \"a b\" strings nor a list of [a, b] pairs".into(),
    };
    let as_pair = |m: &Json| -> Option<String> {
        let parts: Option<Vec<String>> = m
            .as_array()?
            .iter()
            .map(|p| p.as_str().map(|s| s.replace(' ', "\u{0120}")))
            .collect();
        parts.map(|p| p.join(" "))
    };
    match &list[0] {
        Json::String(_) => list
            .iter()
            .map(|m| m.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Json::Array(p) if p.len() == 2 && p[0].is_string() => {
            list.iter().map(|m| as_pair(m).ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

/// gguf-py's `add_chat_template`: a string, or a list of named templates where "default" is the
/// main one and the others get their own keys (names reduced to ASCII letters, digits and '_').
pub(super) fn write_chat_template(kv: &mut KvList, template: &Json) {
    let Some(choices) = template.as_array() else {
        if let Some(text) = template.as_str() {
            kv.set(KEY_CHAT_TEMPLATE, Value::String(text.into()));
        }
        return;
    };
    let mut default = None;
    let mut names: Vec<String> = Vec::new();
    for choice in choices {
        let name: String = choice["name"]
            .as_str()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let Some(text) = choice["template"].as_str().filter(|_| !name.is_empty()) else {
            continue;
        };
        if name == "default" {
            default = Some(text.to_owned());
        } else {
            kv.set(
                format!("{KEY_CHAT_TEMPLATE}.{name}"),
                Value::String(text.into()),
            );
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if !names.is_empty() {
        kv.set("tokenizer.chat_templates", string_array(names));
    }
    if let Some(text) = default {
        kv.set(KEY_CHAT_TEMPLATE, Value::String(text));
    }
}

/// LlamaModel.set_vocab turns BOS off for 49152-token vocabularies (IBM's small granite models
/// share that size with SmolLM), after the tokenizer files have had their say.
pub(super) fn apply_llama_architecture_rules(kv: &mut KvList, config: &Json) {
    const LLAMA_ARCHITECTURES: [&str; 4] = [
        "LLaMAForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
    ];
    let architectures = config["architectures"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let is_llama = architectures
        .iter()
        .any(|a| a.as_str().is_some_and(|a| LLAMA_ARCHITECTURES.contains(&a)));
    if is_llama && config["vocab_size"].as_u64() == Some(49152) {
        kv.set(KEY_ADD_BOS, Value::Bool(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pair_merges_join_with_a_space_and_escape_inner_spaces() {
        let merges = gguf_merges(&json!([["a", "b c"], ["d", "e"]])).unwrap();
        assert_eq!(merges, ["a b\u{0120}c", "d e"]);
        assert_eq!(gguf_merges(&json!(["x y"])).unwrap(), ["x y"]);
        assert!(gguf_merges(&json!([1])).is_err());
    }
}
