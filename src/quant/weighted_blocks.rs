//! GGML block encoders weighted by an importance matrix: ports of ggml's
//! `quantize_row_{q4_0,q4_1,q5_0,q5_1,q2_K,q3_K,q4_K,q5_K}_impl` (ggml-quants.c), which
//! llama-quantize runs when it is given `--imatrix`. Each value's error counts in proportion to
//! the mean square activation its column sees (the imatrix entry) times a magnitude term, so
//! the scale search spends its precision where the inputs are large. Q6_K's weighted path lives
//! with its reference encoder in `kquants`; Q8_0 and the float types ignore importance, as in
//! ggml.
//!
//! As in `kquants`, every loop keeps ggml's order of float operations and never fuses
//! multiply-adds, so the bytes equal llama.cpp's for the same weights and importance (checked
//! against llama-cpp-python 0.3.36 in tests/imatrix_fixture.rs).

use candle_core::quantized::GgmlDType;
use half::f16;

use crate::formats::ggml_blocks::{pack_q4k_levels, pack_q5k_levels};

// ggml's `make_qkx3_quants` with weights and squared error (how every `_impl` calls it) is
// the same computation as its `make_qkx2_quants`, which `kquants` already ports.
use super::kquants::{
    self, make_qkx2_quants, make_qx_quants, nearest_int, pack_scales_mins, scale_min_k4,
    GROUP_MAX_EPS, QK_K,
};

/// Whether `dtype`'s encoder reads an importance matrix.
pub fn uses_importance(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// Encodes whole rows of `row_len` values as `dtype` blocks, weighting the error of column `c`
/// by `importance[c]`; None when `dtype` ignores importance (see `uses_importance`).
pub fn quantize_rows(
    dtype: GgmlDType,
    x: &[f32],
    row_len: usize,
    importance: &[f32],
) -> Option<Vec<u8>> {
    use GgmlDType::*;
    assert_eq!(importance.len(), row_len, "one importance value per column");
    let mut out = Vec::with_capacity(x.len() / dtype.block_size() * dtype.type_size());
    if dtype == Q6K {
        kquants::encode_q6k(x, Some(importance), &mut out);
        return Some(out);
    }
    let encode: fn(&[f32], &[f32], &mut Vec<u8>) = match dtype {
        Q4_0 => q4_0_row,
        Q4_1 => q4_1_row,
        Q5_0 => q5_0_row,
        Q5_1 => q5_1_row,
        Q2K => q2k_row,
        Q3K => q3k_row,
        Q4K => |x, w, out| asym_k_row(x, w, 15, out),
        Q5K => |x, w, out| asym_k_row(x, w, 31, out),
        _ => return None,
    };
    for row in x.chunks_exact(row_len) {
        encode(row, importance, &mut out);
    }
    Some(out)
}

/// Mean square of a whole row: the legacy types' σ².
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// ggml's per-value weight: importance × √(σ² + x²); returns their sum (summed in order, as
/// the k-quant `_impl`s sum them for the super-scale search).
fn weights_of(x: &[f32], qw: &[f32], sigma2: f32, out: &mut [f32]) -> f32 {
    let mut sum = 0f32;
    for ((w, &v), &q) in out.iter_mut().zip(x).zip(qw) {
        *w = q * (sigma2 + v * v).sqrt();
        sum += *w;
    }
    sum
}

/// Quantizes non-negative group scales (or mins) to levels 0..=nmax against one super-scale,
/// weighted by the groups' summed weights, then refines level by level (ggml's
/// `make_qp_quants`). `l` is ggml's `uint8_t` array, so a negative level wraps as it does there.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    for &v in x {
        max = max.max(v);
    }
    if max < GROUP_MAX_EPS {
        l[..n].iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += quant_weights[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += quant_weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        let w = quant_weights[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..n {
            let w = quant_weights[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The 4-bit nibble layout of Q4_0/Q4_1: value j and j + 16 share a byte.
fn pack_nibbles(l: &[u8; 32], out: &mut Vec<u8>) {
    for j in 0..16 {
        out.push((l[j] & 0xF) | ((l[j + 16] & 0xF) << 4));
    }
}

/// The fifth bits of Q5_0/Q5_1, bit j for value j.
fn fifth_bits(l: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= (((l[j] & 0x10) >> 4) as u32) << j;
        qh |= (((l[j + 16] & 0x10) >> 4) as u32) << (j + 16);
    }
    qh.to_le_bytes()
}

/// Symmetric 32-blocks (Q4_0: nmax 8, Q5_0: nmax 16): levels and the f16 scale per block.
fn sym_blocks(x: &[f32], qw: &[f32], nmax: i32, mut emit: impl FnMut(f16, &[u8; 32])) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0f32; 32];
    for (xb, qb) in x.chunks_exact(32).zip(qw.chunks_exact(32)) {
        weights_of(xb, qb, sigma2, &mut weight);
        let mut l = [0i8; 32];
        let d = make_qx_quants(nmax, xb, &mut l, Some(&weight));
        emit(f16::from_f32(d), &l.map(|v| v as u8));
    }
}

/// Asymmetric 32-blocks (Q4_1: nmax 15, Q5_1: nmax 31): levels, f16 scale and f16 min.
fn asym_blocks(x: &[f32], qw: &[f32], nmax: i32, mut emit: impl FnMut(f16, f16, &[u8; 32])) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0f32; 32];
    for (xb, qb) in x.chunks_exact(32).zip(qw.chunks_exact(32)) {
        weights_of(xb, qb, sigma2, &mut weight);
        let mut l = [0u8; 32];
        let (d, min) = make_qkx2_quants(nmax, xb, &weight, &mut l, -0.9, 0.05, 36);
        emit(f16::from_f32(d), f16::from_f32(-min), &l);
    }
}

fn q4_0_row(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    sym_blocks(x, qw, 8, |d, l| {
        out.extend_from_slice(&d.to_le_bytes());
        pack_nibbles(l, out);
    });
}

fn q5_0_row(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    sym_blocks(x, qw, 16, |d, l| {
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&fifth_bits(l));
        pack_nibbles(l, out);
    });
}

fn q4_1_row(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    asym_blocks(x, qw, 15, |d, m, l| {
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        pack_nibbles(l, out);
    });
}

fn q5_1_row(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    asym_blocks(x, qw, 31, |d, m, l| {
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        out.extend_from_slice(&fifth_bits(l));
        pack_nibbles(l, out);
    });
}

/// σ² of a k-quant super-block: `scale`·Σx²/256 (Q2_K uses 1, Q3_K/Q4_K/Q5_K use 2).
fn superblock_sigma2(x: &[f32], scale: f32) -> f32 {
    let mut sum_x2 = 0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    scale * sum_x2 / QK_K as f32
}

/// Q4_K (nmax 15) and Q5_K (nmax 31): eight 32-groups with 6-bit scales and mins.
fn asym_k_row(x: &[f32], qw_row: &[f32], nmax: i32, out: &mut Vec<u8>) {
    for (sb, qw) in x.chunks_exact(QK_K).zip(qw_row.chunks_exact(QK_K)) {
        let sigma2 = superblock_sigma2(sb, 2.0);
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins, mut sw) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let mut weights = [0f32; 32];
        for j in 0..8 {
            let g = 32 * j..32 * j + 32;
            sw[j] = weights_of(&sb[g.clone()], &qw[g.clone()], sigma2, &mut weights);
            (scales[j], mins[j]) =
                make_qkx2_quants(nmax, &sb[g.clone()], &weights, &mut l[g], -0.9, 0.05, 36);
        }
        let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
        let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
        let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
        if nmax == 31 {
            // Q5_K clamps the levels; Q4_K does not (ggml's two functions differ here).
            ls = ls.map(|v| v.min(63));
            lm = lm.map(|v| v.min(63));
        }
        let packed = pack_scales_mins(&ls, &lm);
        let (d, dmin) = (f16::from_f32(d_block), f16::from_f32(m_block));
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &packed);
            let dj = d.to_f32() * sc as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((sb[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&packed);
        if nmax == 15 {
            pack_q4k_levels(&l, out);
        } else {
            pack_q5k_levels(&l, out);
        }
    }
}

/// 2-bit levels of 128 values packed four to a byte, as Q2_K and Q3_K store their low bits.
fn pack_crumbs(l: &[u8; QK_K], out: &mut Vec<u8>) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            out.push(l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6));
        }
    }
}

/// Q2_K: sixteen 16-groups with 4-bit scales and mins against f16 super-scales.
fn q2k_row(x: &[f32], qw_row: &[f32], out: &mut Vec<u8>) {
    for (sb, qw) in x.chunks_exact(QK_K).zip(qw_row.chunks_exact(QK_K)) {
        let sigma2 = superblock_sigma2(sb, 1.0);
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins, mut sw) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        let mut weight = [0f32; 16];
        for j in 0..16 {
            let g = 16 * j..16 * j + 16;
            sw[j] = weights_of(&sb[g.clone()], &qw[g.clone()], sigma2, &mut weight);
            (scales[j], mins[j]) =
                make_qkx2_quants(3, &sb[g.clone()], &weight, &mut l[g], -0.9, 0.05, 36);
        }
        let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
        let d = f16::from_f32(make_qp_quants(15, &scales, &mut ls, &sw));
        let dmin = f16::from_f32(make_qp_quants(15, &mins, &mut lm, &sw));
        let packed: [u8; 16] = std::array::from_fn(|j| ls[j] | (lm[j] << 4));
        let (dm, mm) = (d.to_f32(), dmin.to_f32());
        for j in 0..16 {
            let dj = dm * (packed[j] & 0xF) as f32;
            if dj == 0.0 {
                continue;
            }
            let m = mm * (packed[j] >> 4) as f32;
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((sb[16 * j + ii] + m) / dj).clamp(0, 3) as u8;
            }
        }
        out.extend_from_slice(&packed);
        pack_crumbs(&l, out);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
    }
}

/// Q3_K: sixteen symmetric 16-groups with 6-bit signed scales, high bits in a mask.
fn q3k_row(x: &[f32], qw_row: &[f32], out: &mut Vec<u8>) {
    for (sb, qw) in x.chunks_exact(QK_K).zip(qw_row.chunks_exact(QK_K)) {
        let sigma2 = superblock_sigma2(sb, 2.0);
        let mut l = [0i8; QK_K];
        let (mut scales, mut sw) = ([0f32; 16], [0f32; 16]);
        let mut weight = [0f32; 16];
        for j in 0..16 {
            let g = 16 * j..16 * j + 16;
            sw[j] = weights_of(&sb[g.clone()], &qw[g.clone()], sigma2, &mut weight);
            scales[j] = make_qx_quants(4, &sb[g.clone()], &mut l[g], Some(&weight));
        }
        let mut ls = [0i8; 16];
        let d_block = make_qx_quants(32, &scales, &mut ls, Some(&sw));
        let mut packed = [0u8; 12];
        for (j, &level) in ls.iter().enumerate() {
            let level = level as u8;
            if j < 8 {
                packed[j] = level & 0xF;
            } else {
                packed[j - 8] |= (level & 0xF) << 4;
            }
            packed[j % 4 + 8] |= (level >> 4) << (2 * (j / 4));
        }
        let d = f16::from_f32(d_block);
        for j in 0..16 {
            let low = if j < 8 {
                packed[j] & 0xF
            } else {
                packed[j - 8] >> 4
            };
            let sc = (low | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
            let dj = d.to_f32() * sc as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(sb[16 * j + ii] / dj).clamp(-4, 3) + 4) as i8;
            }
        }
        let mut levels = l.map(|v| v as u8);
        let mut hmask = [0u8; QK_K / 8];
        for (j, v) in levels.iter_mut().enumerate() {
            if *v > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                *v -= 4;
            }
        }
        out.extend_from_slice(&hmask);
        pack_crumbs(&levels, out);
        out.extend_from_slice(&packed);
        out.extend_from_slice(&d.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml_blocks::dequantize;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::kernels::test_support::random_values(n, seed)
    }

    /// Importance that grows along the row, so some columns matter far more than others.
    fn skewed_importance(cols: usize) -> Vec<f32> {
        (0..cols)
            .map(|c| 0.01 + (c as f32 / cols as f32).powi(4) * 100.0)
            .collect()
    }

    fn weighted_error(x: &[f32], back: &[f32], importance: &[f32]) -> f64 {
        let cols = importance.len();
        x.iter()
            .zip(back)
            .enumerate()
            .map(|(i, (a, b))| importance[i % cols] as f64 * ((a - b) as f64).powi(2))
            .sum()
    }

    const TYPES: [GgmlDType; 9] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// The blocks decode through candle's own dequantizer, and the error weighted by the
    /// importance is lower than the unweighted encoder's: what the importance matrix is for.
    #[test]
    fn weighted_blocks_decode_and_lose_less_where_importance_is_high() {
        let (rows, cols) = (16, 2 * QK_K);
        let x = data(rows * cols, 7);
        let importance = skewed_importance(cols);
        let tensor =
            candle_core::Tensor::from_slice(&x, (rows, cols), &candle_core::Device::Cpu).unwrap();
        for dtype in TYPES {
            let ours = quantize_rows(dtype, &x, cols, &importance).unwrap();
            assert_eq!(
                ours.len(),
                rows * cols / dtype.block_size() * dtype.type_size()
            );
            let back = dequantize(&ours, rows, cols, dtype).unwrap();
            let plain = candle_core::quantized::QTensor::quantize(&tensor, dtype).unwrap();
            let plain_back = dequantize(&plain.data().unwrap(), rows, cols, dtype).unwrap();
            let (w, p) = (
                weighted_error(&x, &back, &importance),
                weighted_error(&x, &plain_back, &importance),
            );
            assert!(w < p, "{dtype:?}: weighted {w} vs unweighted {p}");
        }
    }

    #[test]
    fn types_without_an_importance_path_are_refused() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::F32] {
            assert!(!uses_importance(dtype));
            assert!(quantize_rows(dtype, &[0.0; 32], 32, &[1.0; 32]).is_none());
        }
        assert!(TYPES.iter().all(|&t| uses_importance(t)));
    }

    #[test]
    fn all_zero_rows_decode_to_zero() {
        for dtype in TYPES {
            let out = quantize_rows(dtype, &[0.0; QK_K], QK_K, &[1.0; QK_K]).unwrap();
            assert_eq!(
                dequantize(&out, 1, QK_K, dtype).unwrap(),
                vec![0.0; QK_K],
                "{dtype:?}"
            );
        }
    }
}
