//! Tokenizer metadata between Hugging Face files and GGUF key/values.
//!
//! This module owns the translation that llama.cpp's `convert_hf_to_gguf.py` performs for
//! BPE vocabularies (`get_vocab_base` / `_set_vocab_gpt2`, `_set_vocab_llama_hf` and gguf-py's
//! `SpecialVocab`), reproduced step by step so that a GGUF written by quantd tokenizes in
//! llama.cpp exactly like one written by convert. It also owns the way back for `gpt2`
//! vocabularies, so that a model that only exists as a GGUF can be served through the
//! `tokenizers` crate. The pre-tokenizer name is found the way convert finds it: the ids of a
//! fixed probe text are hashed and looked up in a table copied from convert_hf_to_gguf.py.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

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

/// convert's `chktxt`, character for character. Non-ASCII is escaped so that the invisible
/// code points (ZWJ U+200D, variation selector U+FE0F) can be reviewed; the text reads
/// "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 … កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ … нещо на Български …".
const CHKTXT: &str = concat!(
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "\u{1F680} (normal) \u{1F636}\u{200D}\u{1F32B}\u{FE0F} (multiple emojis concatenated) ",
    "\u{2705} \u{1F999}\u{1F999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 ",
    "\u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}",
    "\u{1F601} ?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= ",
    "\u{043D}\u{0435}\u{0449}\u{043E} \u{043D}\u{0430} ",
    "\u{0411}\u{044A}\u{043B}\u{0433}\u{0430}\u{0440}\u{0441}\u{043A}\u{0438} ",
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? ",
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
);

/// convert's `get_vocab_base_pre` table, in its order. convert tests every entry with a plain
/// `if` (no `elif`), so when a hash repeats the later entry wins (olmo over mpt, jina-v2-en
/// over bert-bge); `pre_name_for_hash` searches from the end for that reason.
#[rustfmt::skip]
const PRE_HASHES: &[(&str, &str)] = &[
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe"),
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe"),
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4"),
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4"),
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4"),
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"),
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan"),
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense"),
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2"),
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"),
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "bert-bge"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "mpt"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en"),
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es"),
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de"),
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"),
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code"),
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"),
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"),
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2"),
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"),
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon"),
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe"),
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"),
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"),
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"),
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert"),
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe"),
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2"),
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling"),
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"),
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"),
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu"),
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open"),
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm"),
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"),
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"),
];

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

/// GGUF key/values in insertion order. Setting a key again overwrites it in place, as gguf-py's
/// GGUFWriter does when convert writes a key twice (add_bos_token for 49152-token llamas).
#[derive(Default)]
struct KvList(Vec<(String, Value)>);

impl KvList {
    fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

fn string_array(items: impl IntoIterator<Item = String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

/// Mirrors LlamaModel.set_vocab's fall-through: `LlamaHfVocab` accepts a BPE model with
/// byte_fallback and a Sequence decoder, except Llama 3 style (ignore_merges, no byte_fallback).
fn is_sentencepiece_style(json: &Json) -> Result<bool> {
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
fn write_gpt2_vocab(kv: &mut KvList, tokenizer: &Tokenizer, config: &Json) -> Result<()> {
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
fn write_llama_hf_vocab(
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
fn token_content(entry: &Json) -> Option<String> {
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

fn detect_pre(tokenizer: &Tokenizer) -> Result<&'static str> {
    Ok(pre_name_for_hash(&pre_tokenizer_hash(tokenizer)?).unwrap_or("default"))
}

/// convert's `chkhsh`: sha256 of Python's `str(list_of_ids)` for the probe text, encoded with
/// special tokens added, as transformers' `encode` does by default.
fn pre_tokenizer_hash(tokenizer: &Tokenizer) -> Result<String> {
    let encoding = tokenizer.encode(CHKTXT, true).map_err(|e| {
        TokenizerGgufError::TokenizerLoad(format!(
            "encoding the pre-tokenizer probe text failed: {e}"
        ))
    })?;
    Ok(hex::encode(Sha256::digest(
        python_list(encoding.get_ids()).as_bytes(),
    )))
}

/// Python's `str(list)` for integers: "[1, 2, 3]".
fn python_list(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn pre_name_for_hash(hash: &str) -> Option<&'static str> {
    PRE_HASHES
        .iter()
        .rev()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| *name)
}

/// The tokenizer_config.json names convert compares post-processor tokens against.
struct SpecialNames {
    bos: Option<Json>,
    cls: Option<Json>,
    eos: Option<Json>,
    sep: Option<Json>,
}

impl SpecialNames {
    fn is(entry: &Option<Json>, id: &str) -> bool {
        entry.as_ref().and_then(Json::as_str) == Some(id)
    }
}

/// Python truthiness of a JSON value: null, false, 0, "", [] and {} are false.
fn truthy(value: Option<&Json>) -> bool {
    match value {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

/// gguf-py's `SpecialVocab`: merges, special token ids, add_*_token flags and chat template.
struct SpecialVocab {
    types: Vec<&'static str>,
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
    merges: Vec<String>,
    chat_template: Option<Json>,
    n_vocab: Option<usize>,
}

impl SpecialVocab {
    /// `_try_load_from_tokenizer_json`, with tokenizer_config.json already parsed.
    fn from_tokenizer_files(
        json: &Json,
        tokenizer_config: Option<&Json>,
        n_vocab: Option<usize>,
        load_merges: bool,
    ) -> Result<Self> {
        let mut sv = SpecialVocab {
            types: vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"],
            ids: Vec::new(),
            add: Vec::new(),
            merges: if load_merges {
                gguf_merges(&json["model"]["merges"])?
            } else {
                Vec::new()
            },
            chat_template: None,
            n_vocab,
        };
        let mut tc: Map<String, Json> = tokenizer_config
            .and_then(Json::as_object)
            .cloned()
            .unwrap_or_default();
        let mut names = SpecialNames {
            bos: tc.get("bos_token").cloned(),
            cls: tc.get("cls_token").cloned(),
            eos: tc.get("eos_token").cloned(),
            sep: tc.get("sep_token").cloned(),
        };
        if !truthy(names.bos.as_ref()) && truthy(names.cls.as_ref()) && !tc.is_empty() {
            names.bos = names.cls.clone();
            tc.insert("bos_token".into(), names.bos.clone().unwrap_or_default());
        }
        if !truthy(names.eos.as_ref()) && truthy(names.sep.as_ref()) && !tc.is_empty() {
            names.eos = names.sep.clone();
            tc.insert("eos_token".into(), names.eos.clone().unwrap_or_default());
        }
        sv.read_post_processor(&json["post_processor"], &mut names, &mut tc);
        if tc.is_empty() {
            return Ok(sv);
        }
        sv.chat_template = tc
            .get("chat_template")
            .filter(|t| t.is_string() || t.is_array())
            .cloned();
        let added = json["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for typ in sv.types.clone() {
            if let Some(add) = tc.get(&format!("add_{typ}_token")).and_then(Json::as_bool) {
                sv.set_add(typ, add);
            }
            let Some(content) = tc.get(&format!("{typ}_token")).and_then(token_content) else {
                continue;
            };
            let id = added
                .iter()
                .find(|a| a["content"] == content.as_str())
                .and_then(|a| a["id"].as_i64());
            if let Some(id) = id {
                sv.set_id(typ, id, "tokenizer.json")?;
            }
        }
        Ok(sv)
    }

    fn set_add(&mut self, typ: &'static str, add: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(slot) => slot.1 = add,
            None => self.add.push((typ, add)),
        }
    }

    /// `_set_special_token`: the first source to name a type wins; out-of-range ids are skipped.
    fn set_id(&mut self, typ: &'static str, id: i64, file: &'static str) -> Result<()> {
        if id < 0 {
            let problem = format!("is {id}; token ids cannot be negative");
            return Err(TokenizerGgufError::Config {
                file,
                field: format!("{typ}_token_id"),
                problem,
            });
        }
        let in_range = self.n_vocab.is_none_or(|n| (id as u64) < n as u64);
        if in_range && !self.ids.iter().any(|(t, _)| *t == typ) {
            self.ids.push((typ, id as u32));
        }
        Ok(())
    }

    /// `_try_load_from_config_json`: `{typ}_token_id`, or the same inside text_config.
    fn read_ids(&mut self, config: &Json, file: &'static str) -> Result<()> {
        for typ in self.types.clone() {
            let key = format!("{typ}_token_id");
            let value = config
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| config["text_config"].get(&key));
            if let Some(id) = value.and_then(Json::as_i64) {
                self.set_id(typ, id, file)?;
            }
        }
        Ok(())
    }

    /// The post-processor walk: RobertaProcessing adds bos/eos/sep; TemplateProcessing is read
    /// crudely, exactly as convert does, for a leading bos, trailing eos and a pair separator.
    fn read_post_processor(
        &mut self,
        pp: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        if !truthy(Some(pp)) {
            return;
        }
        let processors = pp
            .get("processors")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_else(|| vec![pp.clone()]);
        for processor in &processors {
            match processor["type"].as_str() {
                Some("RobertaProcessing") => self.read_roberta(processor, names, tc),
                Some("TemplateProcessing") => self.read_template(processor, names, tc),
                _ => {}
            }
        }
    }

    fn read_roberta(
        &mut self,
        processor: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        for typ in ["bos", "eos", "sep"] {
            self.set_add(typ, true);
        }
        adopt_roberta_token(processor, "cls", &names.bos, &mut names.cls, tc);
        adopt_roberta_token(processor, "sep", &names.eos, &mut names.sep, tc);
    }

    fn read_template(
        &mut self,
        processor: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        let single = processor["single"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (mut first, mut last) = (None, None);
        if single.len() > 1 {
            first = template_special(&single[0]);
            if let Some(first) = &first {
                if tc.is_empty() {
                    names.bos = Some(Json::String(first.clone()));
                }
                self.set_add(
                    "bos",
                    SpecialNames::is(&names.bos, first) || SpecialNames::is(&names.cls, first),
                );
            }
            last = template_special(&single[single.len() - 1]);
            if let Some(last) = &last {
                if tc.is_empty() {
                    names.eos = Some(Json::String(last.clone()));
                } else if !SpecialNames::is(&names.eos, last) {
                    self.keep_replaced_eos(names.eos.clone().unwrap_or_default(), tc);
                    tc.insert("eos_token".into(), Json::String(last.clone()));
                    names.eos = Some(Json::String(last.clone()));
                }
                // The trailing token has just become the eos token either way.
                self.set_add("eos", true);
            }
        }
        let pair = processor["pair"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.read_pair_template(pair, first.as_deref(), last.as_deref(), names, tc);
    }

    /// When the template's trailing token overrides eos, the old eos lives on as eot (or eom).
    fn keep_replaced_eos(&mut self, old_eos: Json, tc: &mut Map<String, Json>) {
        for typ in ["eot", "eom"] {
            if !self.types.contains(&typ) {
                self.types.push(typ);
                tc.insert(format!("{typ}_token"), old_eos);
                return;
            }
        }
    }

    fn read_pair_template(
        &mut self,
        pair: &[Json],
        first: Option<&str>,
        last: Option<&str>,
        names: &SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        let Some(final_piece) = pair.last() else {
            return;
        };
        let start = usize::from(first.is_some() && template_special(&pair[0]).as_deref() == first);
        let stop = pair.len()
            - usize::from(last.is_some() && template_special(final_piece).as_deref() == last);
        if start + 3 > stop {
            return; // nothing between "$A" and "$B" once the outer specials are dropped
        }
        let inner = &pair[start..stop];
        let sequence = |piece: &Json| piece["Sequence"]["id"].as_str().map(str::to_owned);
        if sequence(&inner[0]).as_deref() != Some("A")
            || sequence(&inner[inner.len() - 1]).as_deref() != Some("B")
        {
            return;
        }
        let middle = &inner[1..inner.len() - 1];
        let separates = |piece: &Json| {
            template_special(piece).is_some_and(|id| {
                SpecialNames::is(&names.sep, &id) || SpecialNames::is(&names.eos, &id)
            })
        };
        let add_sep = (separates(&middle[0]) && last.is_none())
            || (middle.len() == 2 && separates(&middle[1]));
        self.set_add("sep", add_sep);
        if add_sep && !truthy(names.sep.as_ref()) && !tc.is_empty() {
            tc.insert("sep_token".into(), names.eos.clone().unwrap_or_default());
        }
    }

    fn write(self, kv: &mut KvList) {
        if !self.merges.is_empty() {
            kv.set(KEY_MERGES, string_array(self.merges));
        }
        for (typ, id) in self.ids {
            // gguf-py has no writer for cls, so convert skips it with a warning.
            if let Some(key) = id_key(typ) {
                kv.set(key, Value::U32(id));
            }
        }
        for (typ, add) in self.add {
            kv.set(format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(add));
        }
        if let Some(template) = &self.chat_template {
            write_chat_template(kv, template);
        }
    }
}

/// A tokenizer_config without a cls (or sep) token adopts RobertaProcessing's own, falling
/// back to bos (or eos), as convert does.
fn adopt_roberta_token(
    processor: &Json,
    field: &str,
    fallback: &Option<Json>,
    name: &mut Option<Json>,
    tc: &mut Map<String, Json>,
) {
    if truthy(name.as_ref()) || tc.is_empty() {
        return;
    }
    let token = processor[field]
        .get(0)
        .cloned()
        .or_else(|| fallback.clone())
        .unwrap_or_default();
    tc.insert(format!("{field}_token"), token.clone());
    *name = Some(token);
}

fn template_special(piece: &Json) -> Option<String> {
    piece["SpecialToken"]["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id", // sic: llama.cpp's spelling
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

/// tokenizer.json merges as GGUF strings "a b". The newer pair format may hold spaces inside a
/// part; convert writes those as U+0120 ('Ġ', the byte-level space) so "a b" stays splittable.
fn gguf_merges(merges: &Json) -> Result<Vec<String>> {
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
fn write_chat_template(kv: &mut KvList, template: &Json) {
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
fn apply_llama_architecture_rules(kv: &mut KvList, config: &Json) {
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

/// The `tokenizer.*` keys of a gpt2-vocabulary GGUF, checked for shape.
struct GgufVocab<'a> {
    metadata: &'a HashMap<String, Value>,
    tokens: Vec<&'a str>,
    types: Vec<i64>,
    merges: Vec<&'a str>,
    pre: &'a str,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<&'a str>,
    context_length: Option<i64>,
}

impl<'a> GgufVocab<'a> {
    fn read(metadata: &'a HashMap<String, Value>) -> Result<Self> {
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
            merges: meta_strings(metadata, KEY_MERGES)?,
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
    fn added_ids(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tokens.len()).filter(|&i| {
            self.types[i] == i64::from(CONTROL) || self.types[i] == i64::from(USER_DEFINED)
        })
    }

    /// bos/eos/unk/pad as (name, (text, id)), in that order, for those the GGUF names.
    fn special_tokens(&self) -> Result<Vec<(&'static str, (&'a str, u32))>> {
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

    fn tokenizer_json(&self, specials: &[(&str, (&str, u32))]) -> Result<Json> {
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
fn value_int(value: &Value) -> Option<i64> {
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
    use std::path::PathBuf;

    /// The SmolLM2-135M fixture laid out by shared/fixtures/fetch-smollm2.sh.
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
            "SmolLM2 fixture missing at {}: run `bash scripts/test.sh` (it fetches it) or ../shared/fixtures/fetch-smollm2.sh",
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
        let types: Vec<i32> = kv[KEY_TYPES]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_i32().unwrap())
            .collect();
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
        let tokenizer_config =
            json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
        let bytes = serde_json::to_vec(&tokenizer_json).unwrap();
        let kv: HashMap<String, Value> =
            hf_to_gguf_kv(&bytes, Some(&tokenizer_config), &json!({}), None)
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(kv[KEY_MODEL].to_string().unwrap(), "llama");
        assert_eq!(kv[KEY_PRE].to_string().unwrap(), "default");
        let types: Vec<i32> = kv[KEY_TYPES]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_i32().unwrap())
            .collect();
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
    fn pair_merges_join_with_a_space_and_escape_inner_spaces() {
        let merges = gguf_merges(&json!([["a", "b c"], ["d", "e"]])).unwrap();
        assert_eq!(merges, ["a b\u{0120}c", "d e"]);
        assert_eq!(gguf_merges(&json!(["x y"])).unwrap(), ["x y"]);
        assert!(gguf_merges(&json!([1])).is_err());
    }

    #[test]
    fn python_list_formatting_matches_str_of_a_list() {
        assert_eq!(python_list(&[1, 22, 333]), "[1, 22, 333]");
        assert_eq!(python_list(&[]), "[]");
    }

    #[test]
    fn repeated_hashes_resolve_to_the_later_entry_like_converts_if_chain() {
        assert_eq!(
            pre_name_for_hash("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166"),
            Some("olmo")
        );
        assert_eq!(
            pre_name_for_hash("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f"),
            Some("jina-v2-en")
        );
        assert!(PRE_HASHES
            .iter()
            .all(|(h, _)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())));
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
        let strings = |items: &[&str]| {
            Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
        };
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
