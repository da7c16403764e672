//! The hyper-parameters the decoder runs with (Llama family: llama, mistral, qwen2). Parsing
//! them from an HF `config.json` or GGUF metadata, with every dimension capped, is
//! `model::config`'s job; the decoder only reads them.

use serde::{Deserialize, Serialize};

/// Architectures quantd can quantize and serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The `general.architecture` llama.cpp uses (its converter writes mistral as llama).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Self::Llama | Self::Mistral => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// llama.cpp's llama graph uses interleaved RoPE, so HF's rotate-half Q/K rows are permuted
    /// on the way in; qwen2 runs NEOX-style RoPE and keeps HF's order.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub kind: String,
    pub factor: f64,
    pub original_max_position_embeddings: Option<u64>,
    /// Llama 3 scaling only.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}
