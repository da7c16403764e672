//! GGML type ids as GGUF stores them, and byte sizes of tensors of each type.

use candle_core::quantized::GgmlDType;

pub fn ggml_type_from_u32(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

pub fn ggml_type_to_u32(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// llama.cpp's name for a type (what `gguf` and llama-quantize print).
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Bytes of a tensor with `elems` values, or None when `elems` is not a whole number of blocks
/// or the size overflows.
pub fn tensor_bytes(t: GgmlDType, elems: u64) -> Option<u64> {
    let bs = t.block_size() as u64;
    if !elems.is_multiple_of(bs) {
        return None;
    }
    (elems / bs).checked_mul(t.type_size() as u64)
}

/// A GGUF tensor's element type: a GGML type candle knows, or GGML's plain int8/int32 (types
/// 24/26), which quantd uses for int8 rows and the GPTQ layout's packed words and indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    Ggml(GgmlDType),
    /// GGML's plain int8 (type 24): the levels of quantd's int8 rows.
    I8,
    I32,
}

const GGML_TYPE_I8: u32 = 24;
const GGML_TYPE_I32: u32 = 26;

impl From<GgmlDType> for TensorType {
    fn from(t: GgmlDType) -> Self {
        Self::Ggml(t)
    }
}

impl TensorType {
    pub fn from_u32(id: u32) -> Option<Self> {
        match id {
            GGML_TYPE_I8 => return Some(Self::I8),
            GGML_TYPE_I32 => return Some(Self::I32),
            _ => {}
        }
        ggml_type_from_u32(id).map(Self::Ggml)
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::Ggml(t) => ggml_type_to_u32(t),
            Self::I8 => GGML_TYPE_I8,
            Self::I32 => GGML_TYPE_I32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ggml(t) => ggml_type_name(t),
            Self::I8 => "I8",
            Self::I32 => "I32",
        }
    }

    pub fn block_size(self) -> usize {
        match self {
            Self::Ggml(t) => t.block_size(),
            Self::I8 | Self::I32 => 1,
        }
    }

    /// Bytes of `elems` values (see [`tensor_bytes`]).
    pub fn bytes(self, elems: u64) -> Option<u64> {
        match self {
            Self::Ggml(t) => tensor_bytes(t, elems),
            Self::I8 => Some(elems),
            Self::I32 => elems.checked_mul(4),
        }
    }

    /// The GGML type candle can run, if this is one.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Ggml(t) => Some(t),
            Self::I8 | Self::I32 => None,
        }
    }
}
