//! GPTQ (Frantar et al. 2022, Algorithm 1) on one weight matrix, given the Hessian H = 2XXᵀ of
//! its calibration inputs: columns are quantized one at a time, and each column's rounding
//! error, scaled by the Cholesky factor of H⁻¹, is spread over the columns not yet quantized;
//! updates to columns beyond the current block of 128 are applied lazily, once per block.
//!
//! Numerics follow the reference implementation (`gptq.py` of IST-DASLab/gptq): dead inputs
//! (zero diagonal) get H_ii = 1 and zero weights; damping adds `damp_percent` × mean(diag H) to
//! the diagonal; U = upper Cholesky factor of (LLᵀ)⁻¹ where H = LLᵀ. Everything on H is f64
//! (the reference uses f32 on the GPU; f64 costs nothing here and fails less often).
//!
//! Departures, on purpose:
//! - Group parameters come from `GroupFormat::params`, so scale and minimum are rounded to f16
//!   before any weight of the group is rounded: the levels chosen are the levels a GGML block
//!   serves (DESIGN §4).
//! - A group's parameters are found on its columns *as updated so far* (the reference reads
//!   the block's columns from `W`, which misses the updates made inside the current block when
//!   a group starts mid-block; with groups of 128 aligned to blocks of 128 both agree).
//! - With `act_order`, groups must be static (parameters from the original weights, groups in
//!   natural column order) so the result packs into contiguous GGML blocks.

use crate::formats::groups::{GroupFormat, GroupParams};
use crate::kernels::dot::dot;

/// Columns per lazy-update block (the paper's B).
pub const BLOCK_SIZE: usize = 128;

/// The sum 2·Σ x xᵀ over calibration rows, and how many rows went in.
#[derive(Debug, Clone)]
pub struct Hessian {
    n: usize,
    sum: Vec<f64>,
    rows: usize,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            sum: vec![0.0; n * n],
            rows: 0,
        }
    }

    pub fn columns(&self) -> usize {
        self.n
    }

    /// Adds `xtx` = XᵀX of a batch of `rows` input rows (e.g. from a gemm).
    pub fn add_gram(&mut self, xtx: &[f32], rows: usize) {
        assert_eq!(xtx.len(), self.n * self.n, "Gram matrix of the wrong size");
        for (s, &v) in self.sum.iter_mut().zip(xtx) {
            *s += 2.0 * v as f64;
        }
        self.rows += rows;
    }

    /// H = 2/N · Σ x xᵀ (the scale does not change GPTQ's result; damping is relative).
    pub fn matrix(&self) -> Vec<f64> {
        let scale = 1.0 / self.rows.max(1) as f64;
        self.sum.iter().map(|v| v * scale).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    pub format: GroupFormat,
    /// Fraction of the mean diagonal added to the diagonal of H.
    pub damp_percent: f64,
    /// Quantize columns in order of decreasing H_ii.
    pub act_order: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum GptqError {
    #[error(
        "the Hessian is not positive definite after damping by {damp_percent}; \
         raise damp_percent or calibrate on more tokens"
    )]
    NotPositiveDefinite { damp_percent: f64 },
    #[error("weights have {cols} columns but the Hessian {n}")]
    Shape { cols: usize, n: usize },
}

/// H prepared once for every matrix that shares its inputs (q/k/v, gate/up).
#[derive(Debug, Clone)]
pub struct Prepared {
    n: usize,
    /// Column order of quantization (identity without act_order).
    perm: Vec<usize>,
    dead: Vec<bool>,
    /// Upper Cholesky factor of H⁻¹ in `perm` order, row-major n×n.
    u: Vec<f64>,
}

/// y += a·x.
fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Lower Cholesky factor of the symmetric positive definite `a` (row-major n×n; only the
/// lower triangle is read). Every inner loop is a dot product of two contiguous rows.
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let s = a[j * n + j] - dot(&l[j * n..j * n + j], &l[j * n..j * n + j]);
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let d = s.sqrt();
        l[j * n + j] = d;
        let (done, rest) = l.split_at_mut((j + 1) * n);
        let row_j = &done[j * n..j * n + j];
        for i in j + 1..n {
            let row_i = &mut rest[(i - j - 1) * n..(i - j) * n];
            row_i[j] = (a[i * n + j] - dot(&row_i[..j], row_j)) / d;
        }
    }
    Some(l)
}

/// Inverse of a lower-triangular matrix (row-major): row i of L⁻¹ is
/// (e_i − Σ_{k<i} l_ik · row k of L⁻¹) / l_ii, a sum of contiguous rows.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        let (done, rest) = inv.split_at_mut(i * n);
        let row = &mut rest[..n];
        for k in 0..i {
            let lik = l[i * n + k];
            if lik != 0.0 {
                axpy(&mut row[..=k], -lik, &done[k * n..k * n + k + 1]);
            }
        }
        row[i] += 1.0;
        let d = 1.0 / l[i * n + i];
        for v in &mut row[..=i] {
            *v *= d;
        }
    }
    inv
}

/// The lower triangle of MᵀM for lower-triangular M (row-major): a rank-one update per row
/// of M, each on contiguous rows.
fn lower_gram(m: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for k in 0..n {
        let row_k = &m[k * n..k * n + k + 1];
        for i in 0..=k {
            axpy(&mut out[i * n..i * n + i + 1], row_k[i], &row_k[..=i]);
        }
    }
    out
}

impl Prepared {
    pub fn new(h: &Hessian, damp_percent: f64, act_order: bool) -> Result<Self, GptqError> {
        let n = h.n;
        let mut a = h.matrix();
        let dead: Vec<bool> = (0..n).map(|i| a[i * n + i] == 0.0).collect();
        for i in (0..n).filter(|&i| dead[i]) {
            a[i * n + i] = 1.0;
        }
        let mut perm: Vec<usize> = (0..n).collect();
        if act_order {
            // Decreasing diagonal; ties keep column order, as torch.argsort's stable sort.
            perm.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]));
        }
        let mut p = vec![0.0; n * n];
        for (i, &pi) in perm.iter().enumerate() {
            for (j, &pj) in perm.iter().enumerate() {
                p[i * n + j] = a[pi * n + pj];
            }
        }
        let mean_diag = (0..n).map(|i| p[i * n + i]).sum::<f64>() / n.max(1) as f64;
        for i in 0..n {
            p[i * n + i] += damp_percent * mean_diag;
        }
        let fail = GptqError::NotPositiveDefinite { damp_percent };
        let l = cholesky(&p, n).ok_or(fail.clone())?;
        // H⁻¹ = L⁻ᵀ L⁻¹ (its lower triangle is all the next factorization reads).
        let hinv = lower_gram(&invert_lower(&l, n), n);
        // U = upper factor of H⁻¹ = (lower factor)ᵀ.
        let lc = cholesky(&hinv, n).ok_or(fail)?;
        let mut u = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = lc[j * n + i];
            }
        }
        Ok(Self { n, perm, dead, u })
    }
}

/// What GPTQ made of one matrix, in natural column order.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Levels, row-major `rows × cols`.
    pub levels: Vec<u32>,
    /// Per row, one entry per group (row-major `rows × groups`).
    pub params: Vec<GroupParams>,
    /// The values the levels stand for, row-major.
    pub weights: Vec<f32>,
}

/// GPTQ of `w` (row-major `rows × cols`) with H prepared for its inputs.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    prepared: &Prepared,
    cfg: &GptqConfig,
) -> Result<Quantized, GptqError> {
    if cols != prepared.n {
        return Err(GptqError::Shape {
            cols,
            n: prepared.n,
        });
    }
    let f = cfg.format;
    let g = f.group_len(cols);
    let groups = cols.div_ceil(g);
    let perm = &prepared.perm;
    let u = &prepared.u;
    // Column-major working copy in quantization order: wt[i] is column perm[i].
    let mut wt: Vec<Vec<f32>> = perm
        .iter()
        .map(|&c| {
            if prepared.dead[c] {
                vec![0.0; rows]
            } else {
                (0..rows).map(|r| w[r * cols + c]).collect()
            }
        })
        .collect();
    let mut params = vec![
        GroupParams {
            d: 0.0,
            m: 0.0,
            z: 0
        };
        rows * groups
    ];
    // Static groups (and per-channel): parameters from the weights before any update.
    let fixed_groups = cfg.act_order || f.group_size.is_none();
    if fixed_groups {
        for r in 0..rows {
            let row: Vec<f32> = (0..cols)
                .map(|c| {
                    if prepared.dead[c] {
                        0.0
                    } else {
                        w[r * cols + c]
                    }
                })
                .collect();
            for (gi, chunk) in row.chunks(g).enumerate() {
                params[r * groups + gi] = f.params(chunk);
            }
        }
    }
    let mut levels_t: Vec<Vec<u32>> = vec![Vec::new(); cols];
    let mut err = vec![vec![0f32; rows]; BLOCK_SIZE];
    for b0 in (0..cols).step_by(BLOCK_SIZE) {
        let b1 = (b0 + BLOCK_SIZE).min(cols);
        for i in b0..b1 {
            if !fixed_groups && i % g == 0 {
                let end = (i + g).min(cols);
                for r in 0..rows {
                    let group: Vec<f32> = (i..end).map(|c| wt[c][r]).collect();
                    params[r * groups + i / g] = f.params(&group);
                }
            }
            let gi = perm[i] / g;
            let d = u[i * cols + i] as f32;
            let mut levels = Vec::with_capacity(rows);
            let e = &mut err[i - b0];
            for r in 0..rows {
                let p = &params[r * groups + gi];
                let q = f.quantize(p, wt[i][r]);
                let v = f.dequantize(p, q);
                e[r] = (wt[i][r] - v) / d;
                wt[i][r] = v;
                levels.push(q);
            }
            levels_t[i] = levels;
            let e = err[i - b0].clone();
            for (j, col) in wt.iter_mut().enumerate().take(b1).skip(i + 1) {
                let h = u[i * cols + j] as f32;
                for (x, &ev) in col.iter_mut().zip(&e) {
                    *x -= ev * h;
                }
            }
        }
        // The lazy update of every column after the block.
        for (j, col) in wt.iter_mut().enumerate().skip(b1) {
            for k in b0..b1 {
                let h = u[k * cols + j] as f32;
                if h != 0.0 {
                    for (x, &ev) in col.iter_mut().zip(&err[k - b0]) {
                        *x -= ev * h;
                    }
                }
            }
        }
    }
    let mut levels = vec![0u32; rows * cols];
    let mut weights = vec![0f32; rows * cols];
    for (i, &c) in perm.iter().enumerate() {
        for r in 0..rows {
            levels[r * cols + c] = levels_t[i][r];
            weights[r * cols + c] = wt[i][r];
        }
    }
    Ok(Quantized {
        levels,
        params,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::random_values as noise;

    /// Inputs with strongly correlated columns: a few shared factors plus a little noise.
    fn correlated_inputs(tokens: usize, cols: usize) -> Vec<f32> {
        let factors = noise(tokens * 4, 7);
        let mix = noise(4 * cols, 11);
        let extra = noise(tokens * cols, 13);
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            for c in 0..cols {
                let shared: f32 = (0..4).map(|k| factors[t * 4 + k] * mix[k * cols + c]).sum();
                x[t * cols + c] = shared + 0.1 * extra[t * cols + c];
            }
        }
        x
    }

    fn hessian_of(x: &[f32], tokens: usize, cols: usize) -> Hessian {
        let mut xtx = vec![0f32; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                for j in 0..cols {
                    xtx[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        let mut h = Hessian::new(cols);
        h.add_gram(&xtx, tokens);
        h
    }

    /// ‖(W − Ŵ) Xᵀ‖², the layer-output error GPTQ minimises.
    fn output_error(w: &[f32], q: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let tokens = x.len() / cols;
        let mut total = 0f64;
        for r in 0..rows {
            for t in 0..tokens {
                let e: f64 = (0..cols)
                    .map(|c| ((w[r * cols + c] - q[r * cols + c]) * x[t * cols + c]) as f64)
                    .sum();
                total += e * e;
            }
        }
        total
    }

    fn rtn(w: &[f32], cols: usize, f: &GroupFormat) -> Vec<f32> {
        w.chunks(cols)
            .flat_map(|row| {
                let (levels, params) = f.round_row(row);
                let g = f.group_len(cols);
                levels
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| f.dequantize(&params[i / g], q))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    const FORMAT: GroupFormat = GroupFormat {
        bits: 4,
        group_size: Some(32),
        sym: false,
    };

    #[test]
    fn the_inverse_factor_satisfies_h_inverse_equals_ut_u() {
        let (tokens, cols) = (300, 48);
        let h = hessian_of(&correlated_inputs(tokens, cols), tokens, cols);
        let p = Prepared::new(&h, 0.01, false).unwrap();
        let mut a = h.matrix();
        let mean = (0..cols).map(|i| a[i * cols + i]).sum::<f64>() / cols as f64;
        for i in 0..cols {
            a[i * cols + i] += 0.01 * mean;
        }
        // (H + λI) · Uᵀ U = I.
        for i in 0..cols {
            for j in 0..cols {
                let mut s = 0.0;
                for k in 0..cols {
                    let hinv_kj: f64 = (0..cols)
                        .map(|m| p.u[m * cols + k] * p.u[m * cols + j])
                        .sum();
                    s += a[i * cols + k] * hinv_kj;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-8, "({i}, {j}): {s}");
            }
        }
    }

    #[test]
    fn with_uncorrelated_inputs_gptq_is_round_to_nearest() {
        // H = I: no error is spread, so every column rounds on its own.
        let (rows, cols) = (8, 64);
        let w: Vec<f32> = noise(rows * cols, 3).iter().map(|v| v * 0.05).collect();
        let mut h = Hessian::new(cols);
        let eye: Vec<f32> = (0..cols * cols)
            .map(|i| if i % (cols + 1) == 0 { 0.5 } else { 0.0 })
            .collect();
        h.add_gram(&eye, 1);
        let p = Prepared::new(&h, 0.0, false).unwrap();
        let cfg = GptqConfig {
            format: FORMAT,
            damp_percent: 0.0,
            act_order: false,
        };
        let q = quantize(&w, rows, cols, &p, &cfg).unwrap();
        assert_eq!(q.weights, rtn(&w, cols, &FORMAT));
    }

    #[test]
    fn on_correlated_inputs_gptq_loses_less_than_round_to_nearest() {
        let (rows, cols, tokens) = (16, 128, 512);
        let w: Vec<f32> = noise(rows * cols, 5).iter().map(|v| v * 0.05).collect();
        let x = correlated_inputs(tokens, cols);
        let h = hessian_of(&x, tokens, cols);
        let base = output_error(&w, &rtn(&w, cols, &FORMAT), &x, rows, cols);
        for act_order in [false, true] {
            let p = Prepared::new(&h, 0.01, act_order).unwrap();
            let cfg = GptqConfig {
                format: FORMAT,
                damp_percent: 0.01,
                act_order,
            };
            let q = quantize(&w, rows, cols, &p, &cfg).unwrap();
            // Every stored value is a level of its (f16) group parameters.
            let g = FORMAT.group_len(cols);
            let groups = cols / g;
            for r in 0..rows {
                for c in 0..cols {
                    let p = &q.params[r * groups + c / g];
                    assert_eq!(
                        q.weights[r * cols + c],
                        FORMAT.dequantize(p, q.levels[r * cols + c])
                    );
                }
            }
            let gptq = output_error(&w, &q.weights, &x, rows, cols);
            eprintln!(
                "act_order {act_order}: GPTQ/RTN output error {:.3}",
                gptq / base
            );
            assert!(
                gptq < 0.7 * base,
                "act_order {act_order}: GPTQ {gptq} vs RTN {base}"
            );
        }
    }

    #[test]
    fn an_indefinite_hessian_is_reported() {
        let mut h = Hessian::new(2);
        h.add_gram(&[1.0, 2.0, 2.0, 1.0], 1);
        assert_eq!(
            Prepared::new(&h, 0.0, false).unwrap_err(),
            GptqError::NotPositiveDefinite { damp_percent: 0.0 }
        );
    }
}
