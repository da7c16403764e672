//! GGML block geometry and the bit packing of the k-quant super-blocks that more than one
//! encoder writes (`quant::kquants` without an importance matrix, `quant::weighted_blocks` with
//! one): the byte order is ggml's (`block_q4_K`, `block_q5_K` in ggml-common.h).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

/// Values per block of the legacy types (Q4_0, Q4_1, Q5_0, Q8_0, ...).
pub const QK: usize = 32;
/// Values per k-quant super-block.
pub const QK_K: usize = 256;

pub const Q4K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
pub const Q5K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
pub const Q6K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// Dequantizes `rows` rows of GGML blocks.
pub fn dequantize(
    bytes: &[u8],
    rows: usize,
    row_len: usize,
    dtype: GgmlDType,
) -> candle_core::Result<Vec<f32>> {
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, row_len))?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Q4_K's 4-bit levels: in each 64-value chunk, value `i` in the low nibble and `i + 32` in the
/// high nibble of byte `i`.
pub fn pack_q4k_levels(l: &[u8; QK_K], out: &mut Vec<u8>) {
    for j in (0..QK_K).step_by(64) {
        for i in 0..32 {
            out.push(l[j + i] | (l[j + i + 32] << 4));
        }
    }
}

/// Q5_K's 5-bit levels: the fifth bits in `qh` (two bit planes per 64-value chunk), the low
/// four bits packed as Q4_K packs them.
pub fn pack_q5k_levels(l: &[u8; QK_K], out: &mut Vec<u8>) {
    let mut qh = [0u8; QK_K / 8];
    let mut ql = [0u8; QK_K / 2];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[chunk * 32 + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&ql);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_candle() {
        assert_eq!(Q4K_BYTES, GgmlDType::Q4K.type_size());
        assert_eq!(Q5K_BYTES, GgmlDType::Q5K.type_size());
        assert_eq!(Q6K_BYTES, GgmlDType::Q6K.type_size());
        assert_eq!(QK, GgmlDType::Q4_0.block_size());
        assert_eq!(QK_K, GgmlDType::Q4K.block_size());
    }
}
