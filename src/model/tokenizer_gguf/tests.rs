//! Tests through the two public functions: the SmolLM2 fixture converted both ways and compared
//! with the GGUF llama.cpp's convert wrote, and small hand-built vocabularies for the branches
//! the fixture does not reach.

use std::path::PathBuf;

use super::pre_hash::{pre_tokenizer_hash, CHKTXT};
use super::to_hf::value_int;
use super::*;

/// The SmolLM2-135M fixture laid out by scripts/fixtures/fetch-smollm2.sh.
fn fixture_dir() -> PathBuf {
    let root = std::env::var_os("QUANTD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
                .join(".cache/quantd-fixtures")
        });
    let dir = root.join("smollm2-135m");
    assert!(
        dir.join("hf-f16/tokenizer.json").is_file(),
        "SmolLM2 fixture missing at {}: run `bash scripts/test.sh` (it fetches it) or scripts/fixtures/fetch-smollm2.sh",
        dir.display()
    );
    dir
}

fn read_json(path: PathBuf) -> Json {
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn original_gguf_metadata() -> HashMap<String, Value> {
    let path = fixture_dir().join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    candle_core::quantized::gguf_file::Content::read(&mut file)
        .unwrap()
        .metadata
}

fn fixture_kv() -> HashMap<String, Value> {
    let hf = fixture_dir().join("hf-f16");
    let tokenizer_config = read_json(hf.join("tokenizer_config.json"));
    let generation_config = read_json(hf.join("generation_config.json"));
    let tokenizer_json = std::fs::read(hf.join("tokenizer.json")).unwrap();
    let kv = hf_to_gguf_kv(
        &tokenizer_json,
        Some(&tokenizer_config),
        &read_json(hf.join("config.json")),
        Some(&generation_config),
    );
    kv.unwrap().into_iter().collect()
}

/// Structural equality; GGUF values have no PartialEq and ids must keep their width.
/// `tokenizer.ggml.token_type` as plain integers.
fn token_types(kv: &HashMap<String, Value>) -> Vec<i32> {
    kv[KEY_TYPES]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect()
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::F32(x), Value::F32(y)) => x == y,
        _ => {
            a.value_type() == b.value_type()
                && value_int(a).is_some()
                && value_int(a) == value_int(b)
        }
    }
}

fn tokenizer_json_for(vocab: Json, merges: Json, added: Json, extra: Json) -> Vec<u8> {
    let mut json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": merges},
    });
    for (key, value) in extra.as_object().unwrap() {
        json[key] = value.clone();
    }
    serde_json::to_vec(&json).unwrap()
}

#[test]
fn smollm2_hf_files_give_smollm_pre_and_its_vocabulary() {
    let hf = fixture_dir().join("hf-f16");
    let tokenizer = Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let hash = pre_tokenizer_hash(&tokenizer).unwrap();
    println!("SmolLM2 pre-tokenizer hash: {hash}");
    let kv = fixture_kv();
    let text = |k: &str| kv[k].to_string().unwrap().clone();
    assert_eq!(text(KEY_PRE), "smollm", "hash {hash}");
    assert_eq!(text(KEY_MODEL), "gpt2");
    assert_eq!(kv[KEY_TOKENS].to_vec().unwrap().len(), 49152);
    assert_eq!(kv[KEY_MERGES].to_vec().unwrap().len(), 48900);
    assert_eq!(kv["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 1);
    assert_eq!(kv["tokenizer.ggml.eos_token_id"].to_u32().unwrap(), 2);
    assert!(
        !kv[KEY_ADD_BOS].to_bool().unwrap(),
        "convert turns BOS off for 49152-token llamas"
    );
}

#[test]
fn smollm2_hf_files_reproduce_every_tokenizer_key_of_the_original_gguf() {
    let original = original_gguf_metadata();
    let ours = fixture_kv();
    // add_space_prefix came from an older convert that copied tokenizer_config's add_prefix_space.
    let expected: Vec<&String> = original
        .keys()
        .filter(|k| k.starts_with("tokenizer.") && *k != "tokenizer.ggml.add_space_prefix")
        .collect();
    for key in &expected {
        let ours = ours
            .get(*key)
            .unwrap_or_else(|| panic!("{key} not produced"));
        assert!(
            same_value(ours, &original[*key]),
            "{key} differs from the original GGUF"
        );
    }
    assert_eq!(
        ours.len(),
        expected.len(),
        "extra keys: {:?}",
        ours.keys()
            .filter(|k| !original.contains_key(*k))
            .collect::<Vec<_>>()
    );
}

#[test]
fn gguf_metadata_rebuilds_a_tokenizer_that_encodes_like_the_original() {
    let files = gguf_to_hf(&original_gguf_metadata()).unwrap();
    let ours = Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
    let original = Tokenizer::from_file(fixture_dir().join("hf-f16/tokenizer.json")).unwrap();
    let samples = [
        "Hello world",
        "The capital of France is",
        "12345 numbers, ümlaut  spaces\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>",
        CHKTXT,
    ];
    for text in samples {
        for add_special in [false, true] {
            let want = original.encode(text, add_special).unwrap();
            let got = ours.encode(text, add_special).unwrap();
            assert_eq!(got.get_ids(), want.get_ids(), "ids for {text:?}");
        }
    }
    let config: Json = serde_json::from_slice(&files.tokenizer_config_json).unwrap();
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["model_max_length"], 8192);
    assert_eq!(config["add_bos_token"], false);
    assert!(config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let map: Json = serde_json::from_slice(&files.special_tokens_map_json).unwrap();
    assert_eq!(map["unk_token"], "<|endoftext|>");
    assert_eq!(map["pad_token"], "<|im_end|>");
}

#[test]
fn gpt2_vocab_pads_to_config_size_and_types_added_tokens() {
    let vocab = json!({"a": 0, "b": 1, "ab": 2});
    let added = json!([
        {"id": 3, "content": "<|sp|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 4, "content": "hi\u{2581}there", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false},
    ]);
    let tokenizer_json = tokenizer_json_for(vocab, json!([["a", "b"]]), added, json!({}));
    let tokenizer_config =
        json!({"eos_token": "<|sp|>", "add_eos_token": true, "chat_template": "{{ x }}"});
    let config = json!({"vocab_size": 6, "bos_token_id": 0, "eos_token_id": 1});
    let kv: HashMap<String, Value> =
        hf_to_gguf_kv(&tokenizer_json, Some(&tokenizer_config), &config, None)
            .unwrap()
            .into_iter()
            .collect();
    let tokens: Vec<&str> = kv[KEY_TOKENS]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().as_str())
        .collect();
    assert_eq!(tokens, ["a", "b", "ab", "<|sp|>", "hi there", "[PAD5]"]);
    let types = token_types(&kv);
    assert_eq!(
        types,
        [NORMAL, NORMAL, NORMAL, CONTROL, USER_DEFINED, UNUSED]
    );
    assert_eq!(
        kv[KEY_PRE].to_string().unwrap(),
        "default",
        "an unknown hash falls back to default"
    );
    assert_eq!(
        kv[KEY_MERGES].to_vec().unwrap()[0].to_string().unwrap(),
        "a b"
    );
    assert_eq!(
        kv["tokenizer.ggml.eos_token_id"].to_u32().unwrap(),
        3,
        "tokenizer_config wins over config.json"
    );
    assert_eq!(kv["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 0);
    assert!(kv[KEY_ADD_EOS].to_bool().unwrap());
    assert_eq!(kv[KEY_CHAT_TEMPLATE].to_string().unwrap(), "{{ x }}");
}

#[test]
fn byte_fallback_vocab_converts_as_llama_with_byte_tokens_and_a_bos_template() {
    let vocab = json!({"<unk>": 0, "<s>": 1, "</s>": 2, "<0x00>": 3, "<0x0A>": 4, "\u{2581}": 5, "a": 6, "\u{2581}a": 7});
    let special = |id: u32, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let added = json!([
        special(0, "<unk>"),
        special(1, "<s>"),
        special(2, "</s>"),
        special(8, "<extra>")
    ]);
    let extra = json!({
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    });
    let mut tokenizer_json: Json = serde_json::from_slice(&tokenizer_json_for(
        vocab,
        json!(["\u{2581} a"]),
        added,
        extra,
    ))
    .unwrap();
    tokenizer_json["model"]["byte_fallback"] = json!(true);
    tokenizer_json["model"]["unk_token"] = json!("<unk>");
    let tokenizer_config = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
    let bytes = serde_json::to_vec(&tokenizer_json).unwrap();
    let kv: HashMap<String, Value> =
        hf_to_gguf_kv(&bytes, Some(&tokenizer_config), &json!({}), None)
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(kv[KEY_MODEL].to_string().unwrap(), "llama");
    assert_eq!(kv[KEY_PRE].to_string().unwrap(), "default");
    let types = token_types(&kv);
    assert_eq!(
        types,
        [
            CONTROL,
            CONTROL,
            CONTROL,
            BYTE,
            BYTE,
            NORMAL,
            NORMAL,
            NORMAL,
            USER_DEFINED
        ]
    );
    assert!(kv[KEY_SCORES]
        .to_vec()
        .unwrap()
        .iter()
        .all(|s| s.to_f32().unwrap() == -1000.0));
    assert!(
        !kv.contains_key(KEY_MERGES),
        "convert loads no merges for sentencepiece-style vocabularies"
    );
    assert_eq!(kv["tokenizer.ggml.unknown_token_id"].to_u32().unwrap(), 0);
    assert!(kv[KEY_ADD_BOS].to_bool().unwrap());
    assert!(!kv.contains_key(KEY_ADD_EOS));
}

/// A one-letter byte-level vocabulary with <s>, </s> and <e2> added, run through convert.
fn convert_with_post_processor(
    post_processor: Json,
    tokenizer_config: Json,
) -> HashMap<String, Value> {
    let token = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let added = json!([token(1, "<s>"), token(2, "</s>"), token(3, "<e2>")]);
    let extra = json!({ "post_processor": post_processor });
    let bytes = tokenizer_json_for(json!({"a": 0}), json!([]), added, extra);
    let kv = hf_to_gguf_kv(&bytes, Some(&tokenizer_config), &json!({}), None).unwrap();
    kv.into_iter().collect()
}

#[test]
fn a_template_ending_in_another_token_makes_it_eos_and_keeps_the_old_one_as_eot() {
    let piece = |id: &str| json!({"SpecialToken": {"id": id, "type_id": 0}});
    let single = json!([piece("<s>"), {"Sequence": {"id": "A", "type_id": 0}}, piece("<e2>")]);
    let post_processor = json!({"type": "TemplateProcessing", "single": single, "pair": [],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "<e2>": {"id": "<e2>", "ids": [3], "tokens": ["<e2>"]}}});
    let kv = convert_with_post_processor(
        post_processor,
        json!({"bos_token": "<s>", "eos_token": "</s>"}),
    );
    assert_eq!(kv["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 1);
    assert_eq!(kv["tokenizer.ggml.eos_token_id"].to_u32().unwrap(), 3);
    assert_eq!(kv["tokenizer.ggml.eot_token_id"].to_u32().unwrap(), 2);
    assert!(kv[KEY_ADD_BOS].to_bool().unwrap() && kv[KEY_ADD_EOS].to_bool().unwrap());
}

#[test]
fn roberta_processing_adds_bos_eos_and_sep_and_names_its_separator() {
    let post_processor = json!({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1],
        "trim_offsets": true, "add_prefix_space": false});
    let kv = convert_with_post_processor(post_processor, json!({"eos_token": "</s>"}));
    assert_eq!(kv["tokenizer.ggml.seperator_token_id"].to_u32().unwrap(), 2);
    for key in [KEY_ADD_BOS, KEY_ADD_EOS, "tokenizer.ggml.add_sep_token"] {
        assert!(kv[key].to_bool().unwrap(), "{key}");
    }
}

#[test]
fn gguf_with_a_sentencepiece_vocabulary_is_refused_naming_the_model() {
    let metadata = HashMap::from([(KEY_MODEL.to_string(), Value::String("llama".into()))]);
    let err = gguf_to_hf(&metadata).unwrap_err();
    assert!(
        matches!(err, TokenizerGgufError::UnsupportedModel(ref m) if m == "llama"),
        "{err}"
    );
}

#[test]
fn llama_bpe_gguf_rebuilds_a_split_tokenizer_that_adds_bos_by_default() {
    let strings =
        |items: &[&str]| Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect());
    let metadata = HashMap::from([
        (KEY_MODEL.to_string(), Value::String("gpt2".into())),
        (KEY_PRE.to_string(), Value::String("llama-bpe".into())),
        (
            KEY_TOKENS.to_string(),
            strings(&["a", "b", "ab", "<|begin|>"]),
        ),
        (
            KEY_TYPES.to_string(),
            Value::Array([1, 1, 1, 3].map(Value::I32).to_vec()),
        ),
        (KEY_MERGES.to_string(), strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(3)),
    ]);
    let files = gguf_to_hf(&metadata).unwrap();
    let tokenizer = Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
    assert_eq!(tokenizer.encode("ab", true).unwrap().get_ids(), [3, 2]);
    assert_eq!(tokenizer.encode("ab", false).unwrap().get_ids(), [2]);
}
