//! Tensor naming and layout between Hugging Face checkpoints and GGUF: the name map
//! (`model.layers.3.self_attn.q_proj.weight` ⇄ `blk.3.attn_q.weight`), the Q/K row permutation
//! llama.cpp's interleaved RoPE needs, and the shape every tensor must have for a config.

use super::config::ModelConfig;

/// Per-layer parts: (HF suffix, GGUF part).
const LAYER_PARTS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Maps an HF tensor name to its GGUF name; None for tensors llama.cpp does not use.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, g) = LAYER_PARTS.iter().find(|(h, _)| *h == part)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Maps a GGUF tensor name back to its HF name.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL.iter().find(|(_, g)| *g == name) {
        return Some(h.to_string());
    }
    let parsed = GgufName::parse(name)?;
    let (h, _) = LAYER_PARTS.iter().find(|(_, g)| *g == parsed.part)?;
    Some(format!(
        "model.layers.{}.{h}.{}",
        parsed.layer?, parsed.kind
    ))
}

/// HF names that are known and carry nothing llama.cpp needs (RoPE caches).
pub fn is_ignorable_hf(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// A GGUF tensor name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufName<'a> {
    pub layer: Option<usize>,
    pub part: &'a str,
    pub kind: &'a str,
}

impl<'a> GgufName<'a> {
    pub fn parse(name: &'a str) -> Option<Self> {
        if let Some(rest) = name.strip_prefix("blk.") {
            let (layer, rest) = rest.split_once('.')?;
            let (part, kind) = rest.rsplit_once('.')?;
            return Some(Self {
                layer: Some(layer.parse().ok()?),
                part,
                kind,
            });
        }
        let (part, kind) = name.rsplit_once('.')?;
        Some(Self {
            layer: None,
            part,
            kind,
        })
    }
}

/// The row-major shape `name` (GGUF naming) must have under `cfg`.
pub fn expected_shape(cfg: &ModelConfig, name: &str) -> Option<Vec<usize>> {
    let n = GgufName::parse(name)?;
    let (h, ff, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let shape = match (n.part, n.kind) {
        ("token_embd" | "output", "weight") => vec![v, h],
        ("output_norm" | "attn_norm" | "ffn_norm", "weight") => vec![h],
        ("attn_q", "weight") => vec![cfg.q_rows(), h],
        ("attn_k" | "attn_v", "weight") => vec![cfg.kv_rows(), h],
        ("attn_q", "bias") => vec![cfg.q_rows()],
        ("attn_k" | "attn_v", "bias") => vec![cfg.kv_rows()],
        ("attn_output", "weight") => vec![h, cfg.q_rows()],
        ("ffn_gate" | "ffn_up", "weight") => vec![ff, h],
        ("ffn_down", "weight") => vec![h, ff],
        ("rope_freqs", "weight") => vec![cfg.head_dim / 2],
        _ => return None,
    };
    if n.layer.is_some_and(|l| l >= cfg.num_hidden_layers) {
        return None;
    }
    Some(shape)
}

/// Every tensor a checkpoint for `cfg` must contain, in GGUF naming and llama.cpp's order.
pub fn required_tensors(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string()];
    for l in 0..cfg.num_hidden_layers {
        for (_, part) in LAYER_PARTS {
            names.push(format!("blk.{l}.{part}.weight"));
            if cfg.attention_bias && matches!(*part, "attn_q" | "attn_k" | "attn_v") {
                names.push(format!("blk.{l}.{part}.bias"));
            }
        }
    }
    names.push("output_norm.weight".to_string());
    if !cfg.tie_word_embeddings {
        names.push("output.weight".to_string());
    }
    names
}

/// Tensors a checkpoint may carry beyond [`required_tensors`]: Llama 3 RoPE factors.
pub const OPTIONAL_TENSORS: &[&str] = &["rope_freqs.weight"];

/// Which head count the Q/K permutation of this tensor uses, if it is permuted at all.
pub fn qk_permute_heads(cfg: &ModelConfig, gguf_name: &str) -> Option<usize> {
    if !cfg.architecture.permutes_qk() {
        return None;
    }
    match GgufName::parse(gguf_name)?.part {
        "attn_q" => Some(cfg.num_attention_heads),
        "attn_k" => Some(cfg.num_key_value_heads),
        _ => None,
    }
}

/// HF (rotate-half) → llama.cpp (interleaved) row order, as `convert_hf_to_gguf.py`'s
/// `permute`: rows viewed as (heads, 2, head_dim/2) become (heads, head_dim/2, 2).
/// `row_len` is the number of values per row (1 for a bias).
pub fn permute_qk<T: Copy>(data: &[T], heads: usize, row_len: usize) -> Vec<T> {
    reorder_rows(data, heads, row_len, |h, half, i, j| {
        (h * 2 * half + j * half + i, h * 2 * half + 2 * i + j)
    })
}

/// The inverse of [`permute_qk`].
pub fn unpermute_qk<T: Copy>(data: &[T], heads: usize, row_len: usize) -> Vec<T> {
    reorder_rows(data, heads, row_len, |h, half, i, j| {
        (h * 2 * half + 2 * i + j, h * 2 * half + j * half + i)
    })
}

/// Moves row `src` to row `dst` for every (head, i < half, j < 2) that `map` names.
fn reorder_rows<T: Copy>(
    data: &[T],
    heads: usize,
    row_len: usize,
    map: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Vec<T> {
    let rows = data.len() / row_len;
    let half = rows / heads / 2;
    let mut out = data.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = map(h, half, i, j);
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_between_hf_and_gguf() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.12.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.29.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            let g = hf_to_gguf(hf).unwrap();
            assert_eq!(gguf_to_hf(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(
            hf_to_gguf("model.layers.3.self_attn.o_proj.weight").unwrap(),
            "blk.3.attn_output.weight"
        );
        assert_eq!(hf_to_gguf("model.layers.3.mlp.experts.0.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp_and_inverts() {
        // 1 head, head_dim 4, one value per row: HF rows [r0 r1 | r2 r3] (two halves) become
        // interleaved [r0 r2 r1 r3], as numpy's reshape(1, 2, 2).swapaxes(1, 2) gives.
        let rows = [0, 1, 2, 3];
        assert_eq!(permute_qk(&rows, 1, 1), vec![0, 2, 1, 3]);
        let data: Vec<u32> = (0..2 * 8 * 3).collect();
        let p = permute_qk(&data, 2, 3);
        assert_ne!(p, data);
        assert_eq!(unpermute_qk(&p, 2, 3), data);
    }
}
