//! The model hyper-parameters quantd understands (Llama family: llama, mistral, qwen2), parsed
//! from an HF `config.json` or from GGUF metadata, with every dimension capped so an absurd
//! config is refused before anything is allocated from it.

// The structs live with the decoder that runs them; their parsing lives here.
pub use crate::nn::config::{Architecture, ModelConfig, RopeScaling};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("config.json: unsupported architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("config.json: {field}: {message}")]
    Invalid { field: String, message: String },
}

/// Upper bounds that no real checkpoint reaches; anything above is refused as absurd.
pub const MAX_HIDDEN: usize = 65_536;
pub const MAX_INTERMEDIATE: usize = 262_144;
pub const MAX_LAYERS: usize = 512;
pub const MAX_HEADS: usize = 1_024;
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_CONTEXT: usize = 1 << 24;

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

fn get_usize(j: &serde_json::Value, field: &str, max: usize) -> Result<usize, ConfigError> {
    let v = j
        .get(field)
        .ok_or_else(|| invalid(field, "missing"))?
        .as_u64()
        .ok_or_else(|| invalid(field, "must be a positive integer"))?;
    check_dim(field, v, max)
}

fn check_dim(field: &str, v: u64, max: usize) -> Result<usize, ConfigError> {
    if v == 0 || v > max as u64 {
        return Err(invalid(field, format!("{v} is outside 1..={max}")));
    }
    Ok(v as usize)
}

fn first_token_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        other => other.as_u64().map(|x| x as u32),
    }
}

impl ModelConfig {
    /// Parses an HF config.json (architecture by `model_type`, then `architectures[0]`).
    pub fn from_hf_json(j: &serde_json::Value) -> Result<Self, ConfigError> {
        if !j.is_object() {
            return Err(invalid("config.json", "must be a JSON object"));
        }
        let model_type = j
            .get("model_type")
            .and_then(|v| v.as_str())
            .or_else(|| j.get("architectures")?.get(0)?.as_str())
            .ok_or_else(|| invalid("model_type", "missing"))?;
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture(model_type.chars().take(64).collect())
        })?;
        let hidden_size = get_usize(j, "hidden_size", MAX_HIDDEN)?;
        let num_attention_heads = get_usize(j, "num_attention_heads", MAX_HEADS)?;
        let num_key_value_heads = match j.get("num_key_value_heads") {
            Some(v) if !v.is_null() => get_usize(j, "num_key_value_heads", MAX_HEADS)?,
            _ => num_attention_heads,
        };
        let head_dim = match j.get("head_dim") {
            Some(v) if !v.is_null() => get_usize(j, "head_dim", MAX_HIDDEN)?,
            _ => hidden_size / num_attention_heads,
        };
        let rope_scaling = match j.get("rope_scaling") {
            Some(s) if s.is_object() => Some(RopeScaling {
                kind: s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("linear")
                    .to_string(),
                factor: s.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0),
                original_max_position_embeddings: s
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_u64()),
                low_freq_factor: s.get("low_freq_factor").and_then(|v| v.as_f64()),
                high_freq_factor: s.get("high_freq_factor").and_then(|v| v.as_f64()),
            }),
            _ => None,
        };
        let cfg = Self {
            architecture,
            vocab_size: get_usize(j, "vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: get_usize(j, "intermediate_size", MAX_INTERMEDIATE)?,
            num_hidden_layers: get_usize(j, "num_hidden_layers", MAX_LAYERS)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: match j.get("max_position_embeddings") {
                Some(v) if !v.is_null() => get_usize(j, "max_position_embeddings", MAX_CONTEXT)?,
                _ => 4096,
            },
            rms_norm_eps: j
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            rope_theta: j
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            attention_bias: j.get("attention_bias").and_then(|v| v.as_bool()).unwrap_or(
                // Qwen2 always has q/k/v biases and its configs do not say so.
                architecture == Architecture::Qwen2,
            ),
            bos_token_id: first_token_id(j.get("bos_token_id")),
            eos_token_id: first_token_id(j.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks shared by both sources.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Q rows (heads x head_dim) size real tensors; cap them like any other dimension.
        if self
            .num_attention_heads
            .checked_mul(self.head_dim)
            .is_none_or(|rows| rows > MAX_INTERMEDIATE)
        {
            return Err(invalid(
                "head_dim",
                format!(
                    "{} heads x head_dim {} exceeds {MAX_INTERMEDIATE}",
                    self.num_attention_heads, self.head_dim
                ),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("{} must be even and positive", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("{} is outside (0, 1)", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                format!("{} must be positive", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// Llama 3 RoPE scaling is stored in GGUF as a `rope_freqs.weight` tensor of per-frequency
    /// factors, computed exactly as llama.cpp's `convert_hf_to_gguf.py` does (in f32).
    pub fn llama3_rope_factors(&self) -> Option<Vec<f32>> {
        let r = self.rope_scaling.as_ref().filter(|r| r.kind == "llama3")?;
        let dim = self.head_dim;
        let factor = r.factor as f32;
        let low = r.low_freq_factor.unwrap_or(1.0) as f32;
        let high = r.high_freq_factor.unwrap_or(4.0) as f32;
        let old_ctx = r.original_max_position_embeddings.unwrap_or(8192) as f32;
        let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
        let factors = (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / (self.rope_theta as f32).powf(i as f32 / dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        Some(factors)
    }

    pub fn q_rows(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_rows(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The config.json a HF loader expects for these hyper-parameters.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch_class, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let rope_scaling = self.rope_scaling.as_ref().map(|r| {
            serde_json::json!({"rope_type": r.kind, "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor})
        });
        serde_json::json!({
            "architectures": [arch_class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smol() -> serde_json::Value {
        json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
               "tie_word_embeddings": true, "max_position_embeddings": 8192})
    }

    #[test]
    fn a_llama_config_parses_with_derived_head_dim() {
        let c = ModelConfig::from_hf_json(&smol()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.kv_rows(), 192);
        assert!(c.architecture.permutes_qk());
    }

    #[test]
    fn an_unknown_architecture_is_named_in_the_error() {
        let mut j = smol();
        j["model_type"] = json!("gpt_neox");
        let e = ModelConfig::from_hf_json(&j).unwrap_err();
        assert_eq!(e, ConfigError::UnsupportedArchitecture("gpt_neox".into()));
        assert!(e.to_string().contains("gpt_neox"));
    }

    #[test]
    fn absurd_dimensions_are_refused_with_the_limit() {
        let mut j = smol();
        j["hidden_size"] = json!(10_000_000_000u64);
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("65536"), "{e}");
    }

    #[test]
    fn llama3_rope_factors_follow_the_reference_formula() {
        let mut j = smol();
        j["rope_theta"] = json!(500000.0);
        j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let f = ModelConfig::from_hf_json(&j)
            .unwrap()
            .llama3_rope_factors()
            .unwrap();
        assert_eq!(f.len(), 32);
        // Short wavelengths keep factor 1, long ones get the full factor, between is smooth.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[31], 32.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        assert!(ModelConfig::from_hf_json(&smol())
            .unwrap()
            .llama3_rope_factors()
            .is_none());
    }

    #[test]
    fn heads_must_be_divisible_by_kv_heads() {
        let mut j = smol();
        j["num_key_value_heads"] = json!(4);
        assert!(ModelConfig::from_hf_json(&j).is_err());
    }
}
