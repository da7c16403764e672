//! The GGUF file types a user can ask for (`Q4_K_M`, `Q8_0`, ...), their `general.file_type`
//! numbers (llama.cpp's `llama_ftype`) and the block type each starts from.

use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};

/// Names follow llama.cpp's spelling (`Q4_K_M`), which is what users type.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q5_0,
    Q5_1,
    Q4_K_M,
    Q4_K_S,
    Q4_0,
    Q4_1,
    Q3_K_L,
    Q3_K_M,
    Q3_K_S,
    Q2_K,
}

impl GgufType {
    pub const ALL: [GgufType; 17] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q6_K,
        Self::Q5_K_M,
        Self::Q5_K_S,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K_M,
        Self::Q4_K_S,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q3_K_L,
        Self::Q3_K_M,
        Self::Q3_K_S,
        Self::Q2_K,
    ];

    /// Case-insensitive, as llama-quantize accepts them.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q6_K => "Q6_K",
            Self::Q5_K_M => "Q5_K_M",
            Self::Q5_K_S => "Q5_K_S",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q4_K_M => "Q4_K_M",
            Self::Q4_K_S => "Q4_K_S",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q3_K_L => "Q3_K_L",
            Self::Q3_K_M => "Q3_K_M",
            Self::Q3_K_S => "Q3_K_S",
            Self::Q2_K => "Q2_K",
        }
    }

    /// `general.file_type` (llama.cpp's `enum llama_ftype`).
    pub fn ftype(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K_S => 11,
            Self::Q3_K_M => 12,
            Self::Q3_K_L => 13,
            Self::Q4_K_S => 14,
            Self::Q4_K_M => 15,
            Self::Q5_K_S => 16,
            Self::Q5_K_M => 17,
            Self::Q6_K => 18,
            Self::BF16 => 32,
        }
    }

    /// The block type most tensors get before the mix rules (llama.cpp's `default_type`).
    pub fn base_dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6_K => GgmlDType::Q6K,
            Self::Q5_K_M | Self::Q5_K_S => GgmlDType::Q5K,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q4_K_M | Self::Q4_K_S => GgmlDType::Q4K,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q3_K_L | Self::Q3_K_M | Self::Q3_K_S => GgmlDType::Q3K,
            Self::Q2_K => GgmlDType::Q2K,
        }
    }

    /// Float types are written as they are, with no mix rules (llama.cpp applies
    /// `llama_tensor_get_type` only to quantized file types).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Whether an importance matrix changes this type's bytes (its main block types have
    /// weighted encoders).
    pub fn reads_importance(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0)
    }

    /// The lower-case variant name used in model ids (`smollm2:q4_k_m`).
    pub fn variant(self) -> String {
        self.name().to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_round_trip() {
        for t in GgufType::ALL {
            assert_eq!(GgufType::parse(t.name()), Some(t));
            assert_eq!(GgufType::parse(&t.variant()), Some(t));
        }
        assert_eq!(GgufType::parse("Q4_K"), None);
    }
}
