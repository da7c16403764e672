//! Activations quantized the way ggml's `vec_dot` kernels take them: blocks of 32 values, 8-bit
//! levels, one f32 scale a block (ggml keeps it in f16; f32 loses nothing). Kernels whose
//! weights are small integers or table indices multiply these with integer instructions.

pub const QK: usize = 32;

/// One block of 32 activations: `x ≈ d · qs`, `s = d · Σqs` (for blocks' offsets).
#[derive(Clone, Copy)]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Appends the blocks of `x` (a multiple of 32 long), absmax / 127 per block, levels rounded
/// half away from zero as ggml's `quantize_row_q8_0` does.
pub fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(chunk) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        out.push(ActBlock {
            d,
            s: d * sum as f32,
            qs,
        });
    }
}

/// AVX2 building blocks of the kernels that take these blocks.
///
/// # Safety
/// Each function needs a CPU with AVX2; callers are `#[target_feature(enable = "avx2")]`
/// functions reached only after detecting it.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::missing_safety_doc)]
pub mod x86 {
    use std::arch::x86_64::*;

    /// Σ unsigned(ax) · signed(sy) over 32 bytes, as 8 f32 partial sums.
    #[inline(always)]
    pub unsafe fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
    }

    /// Σ signed(x) · signed(y) over 32 bytes, as 8 f32 partial sums (the sign trick: |x| is
    /// unsigned, y takes x's sign; no pair of products exceeds i16 for levels in ±127).
    #[inline(always)]
    pub unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
        mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline(always)]
    pub unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}
