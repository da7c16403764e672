//! Which block type each tensor gets: a port of llama.cpp's `llama_tensor_get_type`
//! (src/llama-quant.cpp) for the file types candle can make, its fallbacks when a row length is
//! not a multiple of the block size, and user overrides by regex.
//!
//! Q2_K/Q3_K tensors whose rows do not fit fall back to Q4_0, which is what llama.cpp as
//! shipped in llama-cpp-python 0.3.36 writes for SmolLM2 (checked: identical per-tensor types
//! for Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 and Q2_K; newer llama.cpp may pick IQ4_NL, which candle
//! cannot produce). Every fallback is recorded in the plan.

use candle_core::quantized::GgmlDType;
use regex::Regex;

use super::gguf_types::GgufType;
use crate::model::config::ModelConfig;
use crate::model::names::GgufName;

/// The facts about the model that the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct MixContext {
    pub n_layers: usize,
    /// Attention heads per KV head (llama.cpp's `n_gqa()`).
    pub n_gqa: usize,
    /// Whether the model has a separate `output.weight` (untied LM head).
    pub has_output: bool,
    /// Whether an importance matrix weights the encoders (llama.cpp's `qs.has_imatrix`).
    pub has_imatrix: bool,
}

impl MixContext {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            n_layers: cfg.num_hidden_layers,
            n_gqa: cfg.num_attention_heads / cfg.num_key_value_heads,
            has_output: !cfg.tie_word_embeddings,
            has_imatrix: false,
        }
    }
}

/// A user's per-tensor override: tensors whose name matches `pattern` get `dtype`.
#[derive(Debug, Clone)]
pub struct Override {
    pub pattern: Regex,
    pub dtype: GgmlDType,
}

/// The outcome for one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub dtype: GgmlDType,
    /// The type the rules wanted when the row length forced a fallback.
    pub fallback_from: Option<GgmlDType>,
    /// False for tensors kept in float (norms, biases, 1-D tensors).
    pub quantized: bool,
}

/// Parses a block type name as llama.cpp spells it (`Q4_K`, `q8_0`, `F16`).
pub fn parse_ggml_type(s: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
    ]
    .into_iter()
    .find(|t| crate::formats::gguf::ggml_type_name(*t).eq_ignore_ascii_case(s))
}

/// llama.cpp quantizes 2-D weights other than norms; everything else stays F32.
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && shape.len() >= 2 && !name.contains("_norm.weight")
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type llama.cpp's rules give `name` under file type `ftype`, before the row-length check.
fn rule_type(ctx: &MixContext, ftype: GgufType, name: &str, row_len: usize) -> GgmlDType {
    use GgmlDType::*;
    use GgufType as F;
    let base = ftype.base_dtype();
    let is_output = name == "output.weight" || (!ctx.has_output && name == "token_embd.weight");
    if is_output {
        // Output (or tied embeddings): Q6_K unless the type is Q8_0 already; Q8_0 when rows
        // do not fit the base type's block.
        return if !row_len.is_multiple_of(base.block_size()) {
            Q8_0
        } else if base != Q8_0 {
            Q6K
        } else {
            base
        };
    }
    let Some(parsed) = GgufName::parse(name) else {
        return base;
    };
    let layer = parsed.layer.unwrap_or(0);
    let n = ctx.n_layers;
    match parsed.part {
        "attn_v" => match ftype {
            F::Q2_K => {
                if ctx.n_gqa >= 4 {
                    Q4K
                } else {
                    Q3K
                }
            }
            F::Q3_K_M => {
                if layer < 2 {
                    Q5K
                } else {
                    Q4K
                }
            }
            F::Q3_K_L => Q5K,
            F::Q4_K_M | F::Q5_K_M if use_more_bits(layer, n) => Q6K,
            F::Q4_K_S if layer < 4 => Q5K,
            _ => base,
        },
        "ffn_down" => match ftype {
            F::Q2_K => Q3K,
            F::Q3_K_M => {
                if layer < n / 16 {
                    Q5K
                } else {
                    Q4K
                }
            }
            F::Q3_K_L => Q5K,
            F::Q4_K_M if use_more_bits(layer, n) => Q6K,
            F::Q5_K_M if use_more_bits(layer, n) => Q6K,
            F::Q4_K_S if layer < n / 8 => Q5K,
            // With an importance matrix llama.cpp guards the first ffn_down layers of Q4_0/Q5_0
            // with the asymmetric type (without one it keeps the old output unchanged).
            F::Q4_0 if ctx.has_imatrix && layer < n / 8 => Q4_1,
            F::Q5_0 if ctx.has_imatrix && layer < n / 8 => Q5_1,
            _ => base,
        },
        "attn_output" => match ftype {
            F::Q2_K => Q3K,
            F::Q3_K_M => Q4K,
            F::Q3_K_L => Q5K,
            _ => base,
        },
        _ => base,
    }
}

/// The fallback chain llama.cpp uses when rows do not fit a k-quant block.
fn fallback(dtype: GgmlDType, row_len: usize) -> GgmlDType {
    use GgmlDType::*;
    let next = match dtype {
        Q2K | Q3K => Q4_0,
        Q4K => Q5_0,
        Q5K => Q5_1,
        Q6K => Q8_0,
        _ => F16,
    };
    if !row_len.is_multiple_of(next.block_size()) {
        F16
    } else {
        next
    }
}

/// Chooses the stored type of one tensor.
pub fn choose(
    ctx: &MixContext,
    ftype: GgufType,
    name: &str,
    shape: &[usize],
    overrides: &[Override],
) -> Choice {
    if !is_quantizable(name, shape) {
        return Choice {
            dtype: GgmlDType::F32,
            fallback_from: None,
            quantized: false,
        };
    }
    let row_len = *shape.last().expect("quantizable tensors are 2-D");
    let mut dtype = if ftype.is_float() {
        ftype.base_dtype()
    } else {
        rule_type(ctx, ftype, name, row_len)
    };
    if let Some(o) = overrides.iter().rev().find(|o| o.pattern.is_match(name)) {
        dtype = o.dtype;
    }
    if row_len.is_multiple_of(dtype.block_size()) {
        return Choice {
            dtype,
            fallback_from: None,
            quantized: true,
        };
    }
    Choice {
        dtype: fallback(dtype, row_len),
        fallback_from: Some(dtype),
        quantized: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::names::{expected_shape, required_tensors};
    use std::collections::BTreeMap;

    fn smollm2() -> ModelConfig {
        ModelConfig::from_hf_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "tie_word_embeddings": true}))
        .unwrap()
    }

    fn histogram(ftype: GgufType) -> BTreeMap<&'static str, usize> {
        histogram_with(ftype, false)
    }

    fn histogram_with(ftype: GgufType, has_imatrix: bool) -> BTreeMap<&'static str, usize> {
        let cfg = smollm2();
        let ctx = MixContext {
            has_imatrix,
            ..MixContext::new(&cfg)
        };
        let mut h = BTreeMap::new();
        for name in required_tensors(&cfg) {
            let shape = expected_shape(&cfg, &name).unwrap();
            let c = choose(&ctx, ftype, &name, &shape, &[]);
            if c.quantized {
                *h.entry(crate::formats::gguf::ggml_type_name(c.dtype))
                    .or_default() += 1;
            }
        }
        h
    }

    /// llama.cpp's own Q4_K_M file of SmolLM2-135M holds 166 Q5_0, 16 Q4_K, 14 Q6_K and 15
    /// Q8_0 tensors (scripts/peers/README.md); the port must choose exactly the same.
    #[test]
    fn q4_k_m_on_smollm2_matches_llama_cpp_tensor_counts() {
        let h = histogram(GgufType::Q4_K_M);
        assert_eq!(
            h,
            BTreeMap::from([("Q5_0", 166), ("Q4_K", 16), ("Q6_K", 14), ("Q8_0", 15)])
        );
    }

    /// With an importance matrix llama.cpp moves ffn_down of the first n_layer/8 layers (3 of
    /// SmolLM2's 30) from Q4_0/Q5_0 to Q4_1/Q5_1; the k-quant mixes do not change.
    #[test]
    fn an_importance_matrix_guards_the_first_ffn_down_layers_of_q4_0_and_q5_0() {
        assert_eq!(
            histogram_with(GgufType::Q4_0, true),
            BTreeMap::from([("Q4_0", 207), ("Q4_1", 3), ("Q8_0", 1)])
        );
        assert_eq!(histogram_with(GgufType::Q5_0, true)["Q5_1"], 3);
        assert_eq!(
            histogram_with(GgufType::Q4_K_M, true),
            histogram(GgufType::Q4_K_M)
        );
    }

    #[test]
    fn q4_0_keeps_tied_embeddings_at_q8_0_like_llama_cpp() {
        let h = histogram(GgufType::Q4_0);
        assert_eq!(h, BTreeMap::from([("Q4_0", 210), ("Q8_0", 1)]));
    }

    /// Histograms of llama.cpp's own Q6_K and Q2_K files of SmolLM2 (llama-cpp-python 0.3.36,
    /// `llama_model_quantize` from an F16 GGUF, read with gguf-py).
    #[test]
    fn q6_k_and_q2_k_on_smollm2_match_llama_cpp_tensor_counts() {
        assert_eq!(
            histogram(GgufType::Q6_K),
            BTreeMap::from([("Q8_0", 181), ("Q6_K", 30)])
        );
        assert_eq!(
            histogram(GgufType::Q2_K),
            BTreeMap::from([("Q4_0", 180), ("Q3_K", 30), ("Q8_0", 1)])
        );
    }

    #[test]
    fn float_types_apply_no_mix_rules() {
        let h = histogram(GgufType::F16);
        assert_eq!(h, BTreeMap::from([("F16", 211)]));
    }

    #[test]
    fn overrides_win_and_still_fall_back_when_rows_do_not_fit() {
        let cfg = smollm2();
        let ctx = MixContext::new(&cfg);
        let o = [Override {
            pattern: Regex::new("ffn_down").unwrap(),
            dtype: GgmlDType::Q8_0,
        }];
        let c = choose(
            &ctx,
            GgufType::Q4_0,
            "blk.3.ffn_down.weight",
            &[576, 1536],
            &o,
        );
        assert_eq!(c.dtype, GgmlDType::Q8_0);
        let o = [Override {
            pattern: Regex::new("attn_q").unwrap(),
            dtype: GgmlDType::Q6K,
        }];
        let c = choose(&ctx, GgufType::Q4_0, "blk.3.attn_q.weight", &[576, 576], &o);
        assert_eq!(
            (c.dtype, c.fallback_from),
            (GgmlDType::Q8_0, Some(GgmlDType::Q6K))
        );
    }

    #[test]
    fn norms_stay_f32() {
        let ctx = MixContext::new(&smollm2());
        let c = choose(
            &ctx,
            GgufType::Q4_K_M,
            "blk.0.attn_norm.weight",
            &[576],
            &[],
        );
        assert_eq!(
            c,
            Choice {
                dtype: GgmlDType::F32,
                fallback_from: None,
                quantized: false
            }
        );
    }
}
