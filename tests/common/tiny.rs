//! Tiny random-weight Llama checkpoints, generated per test: a byte-level BPE tokenizer with
//! no merges (valid for the `tokenizers` crate and for GGUF export), a config, and F32 weights.

use std::path::Path;

use serde_json::json;

pub const HIDDEN: usize = 64;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const FFN: usize = 128;
pub const VOCAB: usize = 257;

pub fn config() -> serde_json::Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
           "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 256,
           "bos_token_id": 256, "eos_token_id": 256})
}

/// GPT-2's byte → printable-char table.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

pub fn tokenizer() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let mut vocab = vocab;
    vocab.insert("<|endoftext|>".into(), json!(256));
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Deterministic pseudo-random floats in [-0.1, 0.1).
fn values(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// (HF name, shape) of every tensor of the tiny model.
pub fn tensor_shapes() -> Vec<(String, Vec<usize>)> {
    let hd = HIDDEN / HEADS;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * hd, HIDDEN],
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV_HEADS * hd, HIDDEN],
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV_HEADS * hd, HIDDEN],
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * hd],
        ));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    }
    t.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    t
}

/// Writes a complete tiny HF folder into `dir`.
pub fn write_model(dir: &Path) {
    write_model_seeded(dir, 0);
}

/// `write_model` with other weights for another `seed` (same shapes and tokenizer).
pub fn write_model_seeded(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer().to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}).to_string(),
    )
    .unwrap();
    let shapes = tensor_shapes();
    let tensors: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            (
                name.as_str(),
                "F32",
                shape.clone(),
                values(shape.iter().product(), i as u64 + seed * 1000),
            )
        })
        .collect();
    super::write_safetensors(&dir.join("model.safetensors"), &tensors);
}

/// Writes a tiny model and uploads it to `app` as `name`.
pub async fn upload(app: &super::TestApp, name: &str) -> String {
    upload_seeded(app, name, 0).await
}

/// `upload` of the weights `write_model_seeded` makes for `seed`.
pub async fn upload_seeded(app: &super::TestApp, name: &str, seed: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_model_seeded(dir.path(), seed);
    let files: Vec<_> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    .iter()
    .map(|f| dir.path().join(f))
    .collect();
    let (status, body) = app.upload(&files, Some(name)).await;
    assert_eq!(status, 201, "{body}");
    name.to_string()
}
