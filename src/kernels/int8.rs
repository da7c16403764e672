//! The int8 linear of `int8-dynamic` and `llm-int8` (DESIGN §4): int8 weights with one scale per
//! output row, activations quantized to int8 on every call, an exact int8 × int8 → int32
//! product ([`int8_gemm`]), and the scales applied to the integer sums.
//!
//! How activations are quantized is the difference between the methods:
//! - [`Activations::PerToken`]: one symmetric scale per input row (token), absmax / 127.
//! - [`Activations::Torch`]: PyTorch's fbgemm `quantize_dynamic` recipe: one asymmetric scale
//!   and zero point for the whole call, chosen over [min(x, 0), max(x, 0)] on the 7-bit range
//!   [0, 127] (`reduce_range`), as fbgemm's `ChooseQuantizationParams` does. One outlier
//!   column makes the scale coarse for every token, which is what LLM.int8() set out to fix.
//! - [`Activations::Outliers`]: LLM.int8() as bitsandbytes computes it: columns with any
//!   |x| ≥ threshold are multiplied in float against the dequantized weight columns; the rest
//!   go through int8 with per-token scales (taken with the outlier values zeroed).
//!
//! The op is a candle `CustomOp1`, so it runs inside a candle graph like any other op.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::int8_activations::{
    outlier_columns, per_token, quantize_u7, torch_params, QuantizedRows,
};
use super::int8_gemm::{gemm, padded_len, Isa};
use crate::formats::int8_rows::Int8Rows;
use crate::kernels::LinearKernel;

/// Input rows per thread below which a call is not split (one activation panel of the GEMM).
const PARALLEL_ROWS: usize = 32;

/// Weight rows per thread below which a decode call is not split.
const SPLIT_OUTPUTS: usize = 64;

/// What a call's rows are quantized by, fixed before the rows are split.
struct RowScheme<'a> {
    /// LLM.int8(): the call's outlier columns and the threshold.
    outliers: Option<(&'a [usize], f32)>,
    /// PyTorch's one scale and zero point for the call.
    torch: Option<(f32, i32)>,
}

/// How the kernel quantizes its inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activations {
    PerToken,
    Torch,
    Outliers { threshold: f32 },
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Self::PerToken => "per_token",
            Self::Torch => "torch",
            Self::Outliers { .. } => "llm-int8",
        }
    }
}

/// What LLM.int8() saw: how many input columns took the float path.
#[derive(Debug, Default)]
pub struct OutlierCounts {
    pub calls: AtomicU64,
    /// Σ over calls of the outlier columns in the call.
    pub columns: AtomicU64,
    pub max_columns: AtomicU64,
}

/// [`OutlierCounts`] read at one moment, for reports.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct OutlierSnapshot {
    pub calls: u64,
    pub mean_columns: f64,
    pub max_columns: u64,
}

impl OutlierCounts {
    pub fn snapshot(&self) -> OutlierSnapshot {
        let calls = self.calls.load(Ordering::Relaxed);
        let columns = self.columns.load(Ordering::Relaxed);
        OutlierSnapshot {
            calls,
            mean_columns: if calls == 0 {
                0.0
            } else {
                columns as f64 / calls as f64
            },
            max_columns: self.max_columns.load(Ordering::Relaxed),
        }
    }
}

/// Whether this kernel multiplies `w` exactly with `activations`: the level −128 (PyTorch's
/// per-tensor weights) overflows the AVX2 sign trick against signed activations, so it is
/// refused for all but `torch`'s unsigned ones.
pub fn check_levels(w: &Int8Rows, activations: Activations) -> std::result::Result<(), String> {
    if activations != Activations::Torch && w.levels.contains(&i8::MIN) {
        return Err(format!(
            "int8_weight holds -128, which only activations \"torch\" run exactly (these are {:?})",
            activations.name()
        ));
    }
    Ok(())
}

pub struct Int8Matmul {
    rows: usize,
    cols: usize,
    /// Row length padded for the vector loops.
    kp: usize,
    /// `[rows, kp]`, zero-padded.
    weights: Vec<i8>,
    row_sums: Vec<i32>,
    scales: Vec<f32>,
    activations: Activations,
    isa: Isa,
    pub outliers: OutlierCounts,
}

impl Int8Matmul {
    pub fn new(w: &Int8Rows, activations: Activations) -> Self {
        Self::with_isa(w, activations, Isa::detect())
    }

    pub fn with_isa(w: &Int8Rows, activations: Activations, isa: Isa) -> Self {
        let kp = padded_len(w.cols);
        let mut weights = vec![0i8; w.rows * kp];
        for (dst, src) in weights.chunks_mut(kp).zip(w.levels.chunks(w.cols)) {
            dst[..w.cols].copy_from_slice(src);
        }
        let row_sums = w
            .levels
            .chunks(w.cols)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Self {
            rows: w.rows,
            cols: w.cols,
            kp,
            weights,
            row_sums,
            scales: w.scales.clone(),
            activations,
            isa,
            outliers: OutlierCounts::default(),
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `x`: `[n, cols]` row-major → `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        // What spans every row is settled first (LLM.int8()'s outlier columns, PyTorch's one
        // scale per call); then each part quantizes, multiplies and scales.
        let float_columns = match self.activations {
            Activations::Outliers { threshold } => {
                let cols = outlier_columns(x, self.cols, threshold);
                self.count_outliers(cols.len());
                Some((cols, threshold))
            }
            _ => None,
        };
        let scheme = RowScheme {
            outliers: float_columns.as_ref().map(|(c, t)| (c.as_slice(), *t)),
            torch: (self.activations == Activations::Torch).then(|| torch_params(x)),
        };
        let x = &x[..n * self.cols];
        let mut y = vec![0f32; n * self.rows];
        let threads = rayon::current_num_threads().max(1);
        if threads > 1 && n >= 2 * PARALLEL_ROWS {
            // Prompts split their input rows across the rayon pool (each thread reads every
            // weight, so the split pays off only once a panel is long).
            use rayon::prelude::*;
            let chunk = n.div_ceil(threads).next_multiple_of(PARALLEL_ROWS);
            x.par_chunks(chunk * self.cols)
                .zip(y.par_chunks_mut(chunk * self.rows))
                .for_each(|(xr, yr)| {
                    let m = yr.len() / self.rows;
                    let q = self.quantize(&scheme, xr, m);
                    self.outputs(&q, m, 0..self.rows, yr);
                });
        } else if threads > 1 && self.rows >= threads * SPLIT_OUTPUTS {
            // Decode: a few input rows, so the weight rows are split instead; each part
            // computes its own output columns.
            use rayon::prelude::*;
            let q = self.quantize(&scheme, x, n);
            let part = self.rows.div_ceil(threads).next_multiple_of(4);
            let parts: Vec<(usize, Vec<f32>)> = (0..self.rows)
                .step_by(part)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|j0| {
                    let cols = j0..(j0 + part).min(self.rows);
                    let mut out = vec![0f32; n * cols.len()];
                    self.outputs(&q, n, cols, &mut out);
                    (j0, out)
                })
                .collect();
            for (j0, out) in parts {
                let len = out.len() / n;
                for (yr, o) in y.chunks_mut(self.rows).zip(out.chunks(len)) {
                    yr[j0..j0 + len].copy_from_slice(o);
                }
            }
        } else {
            let q = self.quantize(&scheme, x, n);
            self.outputs(&q, n, 0..self.rows, &mut y);
        }
        if let Some((cols, _)) = float_columns.filter(|(c, _)| !c.is_empty()) {
            self.add_float_columns(x, n, &cols, &mut y);
        }
        y
    }

    /// `m` input rows to int8 by the call's scheme.
    fn quantize(&self, scheme: &RowScheme<'_>, x: &[f32], m: usize) -> QuantizedRows {
        match (scheme.outliers, scheme.torch) {
            (Some(outliers), _) => per_token(x, m, self.cols, self.kp, Some(outliers)),
            (None, Some((scale, zero))) => quantize_u7(x, m, self.cols, self.kp, scale, zero),
            (None, None) => per_token(x, m, self.cols, self.kp, None),
        }
    }

    /// `out` (`[m, outputs.len()]`) = the quantized rows times weight rows `outputs`, scaled:
    /// (Σ − zero·Σw) · s_x · s_w. The zero point is 0 but for PyTorch's scheme, whose path
    /// keeps the sums in i64.
    fn outputs(&self, q: &QuantizedRows, m: usize, outputs: Range<usize>, out: &mut [f32]) {
        let len = outputs.len();
        let mut acc = vec![0i32; m * len];
        gemm(
            self.isa,
            &q.levels,
            m,
            &self.weights[outputs.start * self.kp..],
            &self.row_sums[outputs.clone()],
            len,
            self.kp,
            &mut acc,
        );
        let (scales, sums) = (&self.scales[outputs.clone()], &self.row_sums[outputs]);
        for (i, (yr, ar)) in out.chunks_mut(len).zip(acc.chunks(len)).enumerate() {
            let (sx, zero) = q.row_params(i);
            if zero == 0 {
                for ((y, &a), &sw) in yr.iter_mut().zip(ar).zip(scales) {
                    *y = a as f32 * sx * sw;
                }
            } else {
                for (((y, &a), &sw), &ws) in yr.iter_mut().zip(ar).zip(scales).zip(sums) {
                    let sum = a as i64 - zero as i64 * ws as i64;
                    *y = sum as f32 * sx * sw;
                }
            }
        }
    }

    /// y += x[:, cols] · W[:, cols]ᵀ with the weights dequantized (bitsandbytes' `subB`).
    fn add_float_columns(&self, x: &[f32], n: usize, cols: &[usize], y: &mut [f32]) {
        for j in 0..self.rows {
            let w = &self.weights[j * self.kp..];
            let dequant: Vec<f32> = cols.iter().map(|&c| w[c] as f32 * self.scales[j]).collect();
            for i in 0..n {
                let xr = &x[i * self.cols..];
                let dot: f32 = cols.iter().zip(&dequant).map(|(&c, &d)| xr[c] * d).sum();
                y[i * self.rows + j] += dot;
            }
        }
    }

    fn count_outliers(&self, columns: usize) {
        self.outliers.calls.fetch_add(1, Ordering::Relaxed);
        self.outliers
            .columns
            .fetch_add(columns as u64, Ordering::Relaxed);
        self.outliers
            .max_columns
            .fetch_max(columns as u64, Ordering::Relaxed);
    }
}

impl CustomOp1 for Int8Matmul {
    fn name(&self) -> &'static str {
        "int8-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, cols) = layout.shape().dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "int8 kernel: input has {cols} columns, weight {}",
                self.cols
            );
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("int8 kernel: input must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("int8 kernel: input must be contiguous");
        };
        let y = self.matmul(&data[start..end], n);
        Ok((CpuStorage::F32(y), Shape::from((n, self.rows))))
    }
}

impl LinearKernel for Int8Matmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn storage_bytes(&self) -> usize {
        self.weights.len() + self.scales.len() * 4 + self.row_sums.len() * 4
    }

    fn kind(&self) -> String {
        format!("int8-{}", self.activations.name())
    }

    fn scale_spans_call(&self) -> bool {
        self.activations == Activations::Torch
    }

    fn outliers(&self) -> Option<OutlierSnapshot> {
        matches!(self.activations, Activations::Outliers { .. }).then(|| self.outliers.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::int8_activations::{absmax_below, round_small};
    use crate::kernels::test_support::random_values;

    /// PyTorch's scheme on a whole input at once.
    fn per_tensor_u7(x: &[f32], n: usize, cols: usize, kp: usize) -> QuantizedRows {
        let (scale, zero) = torch_params(&x[..n * cols]);
        quantize_u7(x, n, cols, kp, scale, zero)
    }

    #[test]
    fn fast_rounding_and_absmax_equal_the_plain_definitions() {
        let mut v = random_values(4099, 9);
        v.extend([
            0.5,
            1.5,
            2.5,
            -0.5,
            -2.5,
            126.5,
            -126.5,
            4194303.5,
            f32::NAN,
            1e30,
        ]);
        for &x in &v {
            let x = x.clamp(-4194304.0, 4194304.0);
            if !x.is_nan() {
                assert_eq!(round_small(x), x.round_ties_even() as i32, "{x}");
            }
        }
        for threshold in [0.3, 1.0, f32::INFINITY] {
            for len in [0, 1, 7, 8, 9, 100] {
                let want = v[..len]
                    .iter()
                    .map(|x| x.abs())
                    .filter(|&a| a < threshold)
                    .fold(0f32, f32::max);
                assert_eq!(absmax_below(&v[..len], threshold), want);
            }
        }
    }

    fn weights(rows: usize, cols: usize) -> Int8Rows {
        Int8Rows::quantize(&random_values(rows * cols, 5), rows, cols)
    }

    /// The float computation each scheme stands for: activations quantized and dequantized by
    /// the same rule, times the dequantized weights, in f64.
    fn float_reference(w: &Int8Rows, x: &[f32], n: usize, act: Activations) -> Vec<f32> {
        let kp = padded_len(w.cols);
        let (q, float_cols) = match act {
            Activations::PerToken => (per_token(x, n, w.cols, kp, None), vec![]),
            Activations::Torch => (per_tensor_u7(x, n, w.cols, kp), vec![]),
            Activations::Outliers { threshold } => {
                let cols = outlier_columns(x, w.cols, threshold);
                (per_token(x, n, w.cols, kp, Some((&cols, threshold))), cols)
            }
        };
        let dense = w.dequantize();
        let mut y = vec![0f32; n * w.rows];
        for i in 0..n {
            let (s, z) = q.row_params(i);
            for j in 0..w.rows {
                let mut sum = 0f64;
                for c in 0..w.cols {
                    let xv = if float_cols.contains(&c) {
                        x[i * w.cols + c] as f64
                    } else {
                        (q.levels[i * kp + c] as i32 - z) as f64 * s as f64
                    };
                    sum += xv * dense[j * w.cols + c] as f64;
                }
                y[i * w.rows + j] = sum as f32;
            }
        }
        y
    }

    #[test]
    fn every_scheme_and_isa_matches_its_float_definition() {
        // 37 rows run whole; 301 rows split decode calls over the weight rows (with 2+
        // threads), in parts of a multiple of 4 and a shorter last part.
        for (rows, cols) in [(37, 200), (301, 96)] {
            check_every_scheme_and_isa(rows, cols);
        }
    }

    fn check_every_scheme_and_isa(rows: usize, cols: usize) {
        let w = weights(rows, cols);
        for act in [
            Activations::PerToken,
            Activations::Torch,
            Activations::Outliers { threshold: 0.45 },
        ] {
            for n in [1, 2, 5, 33, 64] {
                let mut x = random_values(n * cols, 70 + n as u64);
                // A large outlier column, as LLM activations have.
                for i in 0..n {
                    x[i * cols + 17] *= 8.0;
                }
                let want = float_reference(&w, &x, n, act);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut per_isa = Vec::new();
                for isa in Isa::available() {
                    let k = Int8Matmul::with_isa(&w, act, isa);
                    let got = k.matmul(&x, n);
                    let diff = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-5 * scale, "{act:?} {} n {n}: {diff}", isa.name());
                    per_isa.push(got);
                }
                // The integer part is exact, so every ISA gives the same floats.
                assert!(per_isa.windows(2).all(|p| p[0] == p[1]), "{act:?} n {n}");
            }
        }
    }

    #[test]
    fn per_tensor_weights_with_level_minus_128_run_exactly_against_torch_activations() {
        // PyTorch's default observer: the most negative weight lands on −128.
        let (rows, cols) = (37, 200);
        let mut v = random_values(rows * cols, 9);
        let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        v[3] = -absmax;
        let w = Int8Rows::quantize_per_tensor(&v, rows, cols);
        assert!(w.levels.contains(&i8::MIN));
        assert!(check_levels(&w, Activations::Torch).is_ok());
        for act in [
            Activations::PerToken,
            Activations::Outliers { threshold: 6.0 },
        ] {
            let e = check_levels(&w, act).unwrap_err();
            assert!(e.contains("-128"), "{e}");
        }
        for n in [1, 5, 64] {
            let x = random_values(n * cols, 40 + n as u64);
            let want = float_reference(&w, &x, n, Activations::Torch);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut per_isa = Vec::new();
            for isa in Isa::available() {
                let got = Int8Matmul::with_isa(&w, Activations::Torch, isa).matmul(&x, n);
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                println!(
                    "per-tensor −128 weights, {} n {n}: max diff {diff}",
                    isa.name()
                );
                assert!(diff <= 1e-5 * scale, "{} n {n}: {diff}", isa.name());
                per_isa.push(got);
            }
            assert!(per_isa.windows(2).all(|p| p[0] == p[1]), "n {n}");
        }
    }

    #[test]
    fn per_token_scales_beat_one_scale_per_call_on_outlier_activations() {
        let (rows, cols, n) = (16, 256, 8);
        let w = weights(rows, cols);
        let mut x = random_values(n * cols, 3);
        x[5] = 40.0; // One huge value in the first token.
        let exact: Vec<f32> = {
            let dense = w.dequantize();
            (0..n * rows)
                .map(|o| {
                    let (i, j) = (o / rows, o % rows);
                    (0..cols)
                        .map(|c| x[i * cols + c] * dense[j * cols + c])
                        .sum()
                })
                .collect()
        };
        let err = |act| {
            let y = Int8Matmul::new(&w, act).matmul(&x, n);
            // Error on the tokens without the outlier.
            (rows..n * rows)
                .map(|o| (y[o] - exact[o]).powi(2))
                .sum::<f32>()
        };
        let (token, tensor) = (err(Activations::PerToken), err(Activations::Torch));
        assert!(
            token * 100.0 < tensor,
            "per-token {token} vs per-tensor {tensor}"
        );
        let outliers = Int8Matmul::new(&w, Activations::Outliers { threshold: 6.0 });
        outliers.matmul(&x, n);
        assert_eq!(outliers.outliers.columns.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn torch_zero_point_follows_fbgemm() {
        // All-positive input: min is clamped to 0, so the zero point is 0 and scale max/127.
        let q = per_tensor_u7(&[0.5, 1.27, 0.0, 0.1], 1, 4, 64);
        assert_eq!(q.zero, 0);
        assert!((q.scales[0] - 0.01).abs() < 1e-7);
        assert_eq!(&q.levels[..4], &[50, 127, 0, 10]);
        // Symmetric range: the zero point sits in the middle of [0, 127].
        let q = per_tensor_u7(&[-1.0, 1.0], 1, 2, 64);
        assert_eq!(q.zero, 64);
        // All zeros: fbgemm's fallback scale 0.1.
        let q = per_tensor_u7(&[0.0; 4], 1, 4, 64);
        assert_eq!((q.scales[0], q.zero), (0.1, 0));
    }
}
