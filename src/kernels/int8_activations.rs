//! How the int8 kernel quantizes its input rows on every call (see `int8` for which method
//! uses which): symmetric per-token scales (with LLM.int8()'s outlier columns left out of the
//! absmax), or PyTorch's one asymmetric 7-bit scale and zero point for the whole call.

/// Quantized activations and what undoes them.
pub(super) struct QuantizedRows {
    /// `[n, kp]` in [−127, 127].
    pub levels: Vec<i8>,
    /// One scale per row, or one for all.
    pub scales: Vec<f32>,
    pub zero: i32,
}

impl QuantizedRows {
    pub(super) fn row_params(&self, i: usize) -> (f32, i32) {
        let s = if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[i]
        };
        (s, self.zero)
    }
}

/// Symmetric per-row quantization, absmax / 127. With `outliers`, values with |x| ≥ threshold
/// are left out of each row's absmax and the outlier columns are zeroed (bitsandbytes'
/// `int8_vectorwise_quant`).
pub(super) fn per_token(
    x: &[f32],
    n: usize,
    cols: usize,
    kp: usize,
    outliers: Option<(&[usize], f32)>,
) -> QuantizedRows {
    let mut levels = vec![0i8; n * kp];
    let mut scales = Vec::with_capacity(n);
    let threshold = outliers.map_or(f32::INFINITY, |(_, t)| t);
    for (row, dst) in x.chunks(cols).take(n).zip(levels.chunks_mut(kp)) {
        let absmax = absmax_below(row, threshold);
        let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = round_small((v / scale).clamp(-127.0, 127.0)) as i8;
        }
        if let Some((cols, _)) = outliers {
            for &c in cols {
                dst[c] = 0;
            }
        }
        scales.push(scale);
    }
    QuantizedRows {
        levels,
        scales,
        zero: 0,
    }
}

/// fbgemm's dynamic activation quantization with `reduce_range`: the one scale and zero point
/// for a whole call's input, over [min(x, 0), max(x, 0)] on [0, 127]
/// (`fbgemm::ChooseQuantizationParams`, the zero point taken from whichever end loses less).
pub(super) fn torch_params(x: &[f32]) -> (f32, i32) {
    let (qmin, qmax) = (0f64, 127f64);
    let lo = x.iter().copied().fold(0f32, f32::min) as f64;
    let hi = x.iter().copied().fold(0f32, f32::max) as f64;
    let mut scale = (hi - lo) / (qmax - qmin);
    if scale as f32 == 0.0 || (1.0 / scale as f32).is_infinite() {
        scale = 0.1;
    }
    let scale = scale as f32 as f64;
    let from_min = qmin - lo / scale;
    let from_max = qmax - hi / scale;
    let err_min = qmin.abs() - (lo / scale).abs();
    let err_max = qmax.abs() - (hi / scale).abs();
    let initial = if err_min < err_max {
        from_min
    } else {
        from_max
    };
    let zero = initial.clamp(qmin, qmax).round_ties_even() as i32;
    (scale as f32, zero)
}

/// `n` rows of `x` on [0, 127] with the given scale and zero point.
pub(super) fn quantize_u7(
    x: &[f32],
    n: usize,
    cols: usize,
    kp: usize,
    scale: f32,
    zero: i32,
) -> QuantizedRows {
    let inv = 1.0 / scale;
    let mut levels = vec![0i8; n * kp];
    for (row, dst) in x.chunks(cols).take(n).zip(levels.chunks_mut(kp)) {
        for (d, &v) in dst.iter_mut().zip(row) {
            // Anything beyond ±256 clamps to 0 or 127 below whatever the zero point.
            let q = round_small((v * inv).clamp(-256.0, 256.0)) + zero;
            *d = q.clamp(0, 127) as i8;
        }
    }
    QuantizedRows {
        levels,
        scales: vec![scale],
        zero,
    }
}

/// The largest |v| below `threshold` (0 when none), in eight lanes so it compiles to vector
/// max instructions; a NaN is skipped, as `f32::max` skips it.
pub(super) fn absmax_below(row: &[f32], threshold: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            let a = if a < threshold { a } else { 0.0 };
            *l = if a > *l { a } else { *l };
        }
    }
    for &v in tail {
        let a = v.abs();
        if a < threshold && a > lanes[0] {
            lanes[0] = a;
        }
    }
    lanes.iter().copied().fold(0f32, f32::max)
}

/// `v` rounded half to even, for |v| ≤ 2²²: adding 1.5·2²³ leaves the integer in the low
/// mantissa bits under the default rounding mode. Equal to `v.round_ties_even() as i32` there,
/// but plain float adds and integer ops, which vectorize (the saturating cast does not).
pub(super) fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// Columns in which some row has |x| ≥ threshold, ascending.
pub(super) fn outlier_columns(x: &[f32], cols: usize, threshold: f32) -> Vec<usize> {
    let mut hit = vec![false; cols];
    for row in x.chunks(cols) {
        for (h, v) in hit.iter_mut().zip(row) {
            *h |= v.abs() >= threshold;
        }
    }
    (0..cols).filter(|&c| hit[c]).collect()
}
