//! GGML k-quant block encoders (Q4_K, Q5_K, Q6_K) ported from ggml's reference quantizers
//! (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c), which llama-quantize uses when no
//! importance matrix is given. candle's encoders for these types follow an older ggml
//! (`make_qkx1_quants`, round-half-away rounding) and land 2–5 % higher in weight RMSE; with
//! these, quantd writes the same bytes as llama.cpp (checked against llama-cpp-python 0.3.36 on
//! SmolLM2, see tests/fixture_jobs.rs).
//!
//! Every loop keeps ggml's order of float operations and never fuses multiply-adds, which is
//! what makes the bytes equal.

use half::f16;

pub use crate::formats::ggml_blocks::QK_K;
use crate::formats::ggml_blocks::{pack_q4k_levels, pack_q5k_levels, Q6K_BYTES};

/// ggml's threshold for an all-zero group.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the float mantissa.
pub(super) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Scale and min of one group by weighted least squares over a grid of `nstep + 1` scales
/// (ggml's `make_qkx2_quants`); returns (scale, -min) and fills `l` with levels 0..=nmax.
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric scale of one group, refined over ±0.9 around nmax (ggml's `make_qx_quants` with
/// `rmse_type` 1): the error of each value is weighted by `qw` (an importance matrix) or, without
/// one, by the value's square. Fills `l` with levels offset by nmax.
pub(super) fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = level(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = qw.map_or(v * v, |qw| qw[i]);
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v);
            let w = qw.map_or(v * v, |qw| qw[i]);
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// 6-bit scales and mins of 8 groups packed into 12 bytes, as `get_scale_min_k4` reads them.
pub(super) fn pack_scales_mins(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared part of Q4_K and Q5_K: per-group asymmetric scales quantized to 6 bits against
/// two f16 super-scales; returns (d, dmin, packed scales, levels).
fn quantize_asym_superblock(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let g = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in g {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(g) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(
            nmax,
            g,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_mins(&ls, &lm);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

/// Encodes rows of f32 (length a multiple of 256) as Q4_K blocks.
pub fn quantize_q4k(x: &[f32], out: &mut Vec<u8>) {
    for sb in x.chunks_exact(QK_K) {
        let (d, dmin, scales, l) = quantize_asym_superblock(sb, 15, -1.0, 20);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        pack_q4k_levels(&l, out);
    }
}

/// Encodes rows of f32 as Q5_K blocks.
pub fn quantize_q5k(x: &[f32], out: &mut Vec<u8>) {
    for sb in x.chunks_exact(QK_K) {
        let (d, dmin, scales, l) = quantize_asym_superblock(sb, 31, -0.5, 15);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        pack_q5k_levels(&l, out);
    }
}

/// Encodes rows of f32 as Q6_K blocks.
pub fn quantize_q6k(x: &[f32], out: &mut Vec<u8>) {
    encode_q6k(x, None, out)
}

/// Q6_K with ggml's `quantize_row_q6_K_impl`: `importance` (one value per column of a row of
/// `importance.len()` values) weights each group's scale search; None is the reference encoder.
pub(super) fn encode_q6k(x: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    for (i, sb) in x.chunks_exact(QK_K).enumerate() {
        let qw_of = |ib: usize| {
            importance.map(|w| {
                let at = (i * QK_K) % w.len() + 16 * ib;
                &w[at..at + 16]
            })
        };
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..QK_K / 16 {
            let s = make_qx_quants(
                32,
                &sb[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
                qw_of(ib),
            );
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend(std::iter::repeat_n(0u8, Q6K_BYTES));
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let mut qscales = [0i8; QK_K / 16];
        for ib in 0..QK_K / 16 {
            qscales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            let dj = d.to_f32() * qscales[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(sb[16 * j + ii] / dj).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        for (half_idx, j) in (0..QK_K).step_by(128).enumerate() {
            let (ql, qh) = (&mut ql[half_idx * 64..], &mut qh[half_idx * 32..]);
            for i in 0..32 {
                let lv = |k: usize| l[j + i + k] as u8;
                ql[i] = (lv(0) & 0xF) | ((lv(64) & 0xF) << 4);
                ql[i + 32] = (lv(32) & 0xF) | ((lv(96) & 0xF) << 4);
                qh[i] = (lv(0) >> 4)
                    | ((lv(32) >> 4) << 2)
                    | ((lv(64) >> 4) << 4)
                    | ((lv(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(qscales.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml_blocks::dequantize;
    use candle_core::quantized::GgmlDType;

    type Encoder = fn(&[f32], &mut Vec<u8>);
    const ENCODERS: [(GgmlDType, Encoder); 3] = [
        (GgmlDType::Q4K, quantize_q4k),
        (GgmlDType::Q5K, quantize_q5k),
        (GgmlDType::Q6K, quantize_q6k),
    ];

    fn data(n: usize) -> Vec<f32> {
        let mut s = 12345u64;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even_like_ggml() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4, 2.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, 3]
        );
    }

    /// The blocks decode, through candle's independent dequantizer, close to the input, and at
    /// least as close as candle's older encoders get. (Byte equality with llama.cpp is checked
    /// on the real model in tests/fixture_jobs.rs.)
    #[test]
    fn encodings_decode_close_to_the_input_and_beat_the_older_encoders() {
        let x = data(64 * QK_K);
        for ((dtype, encode), budget) in ENCODERS.into_iter().zip([0.09, 0.045, 0.025]) {
            let mut ours = Vec::new();
            encode(&x, &mut ours);
            assert_eq!(ours.len(), 64 * dtype.type_size());
            let err = |bytes: &[u8]| {
                let back = dequantize(bytes, 64, QK_K, dtype).unwrap();
                let (n, s) = x.iter().zip(&back).fold((0f64, 0f64), |(n, s), (a, b)| {
                    (n + ((a - b) as f64).powi(2), s + (*a as f64).powi(2))
                });
                (n / s).sqrt()
            };
            let tensor =
                candle_core::Tensor::from_slice(&x, (64, QK_K), &candle_core::Device::Cpu).unwrap();
            let candle = candle_core::quantized::QTensor::quantize(&tensor, dtype).unwrap();
            let (e_ours, e_candle) = (err(&ours), err(&candle.data().unwrap()));
            assert!(e_ours < budget, "{dtype:?}: rel RMSE {e_ours}");
            assert!(
                e_ours <= e_candle * 1.001,
                "{dtype:?}: ours {e_ours} vs candle {e_candle}"
            );
        }
    }

    #[test]
    fn all_zero_blocks_decode_to_zero() {
        for (dtype, encode) in ENCODERS {
            let mut out = Vec::new();
            encode(&[0.0; QK_K], &mut out);
            assert_eq!(
                dequantize(&out, 1, QK_K, dtype).unwrap(),
                vec![0.0; QK_K],
                "{dtype:?}"
            );
        }
    }
}
