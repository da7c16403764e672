//! Attention of a chunk of new positions over a sequence's cached keys and values: two candle
//! matmuls around a causal softmax of our own. The softmax applies the causal mask by row
//! length instead of adding a −∞ mask tensor, and uses the vectorized [`exp_f32`]: in a
//! 512-token prompt the mask, its addition and libm's `expf` took a fifth of the time.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::exp_f32;

/// Query positions per block: a block's scores stop at its last position's key, so the
/// triangle above the diagonal is mostly never computed.
const QUERY_BLOCK: usize = 64;

/// Causal attention of `q` (`[1, heads, t, d]`, positions `start..start+t`) over the
/// cached keys/values (`[1, kv_heads, start+t, d]`), returning `[t, heads·d]`. The query heads
/// sharing a KV head are stacked as rows of one matmul (position-major, so a block of
/// positions is a block of rows), and K and V are never copied per head.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
    let (_, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    // [1, kv_heads, group, t, d] → [1, kv_heads, t·group, d]: row i·group + g is head g of
    // the group at position i.
    let q = (q.reshape((1, kv_heads, group, t, d))?.transpose(2, 3)? * scale)?.reshape((
        1,
        kv_heads,
        t * group,
        d,
    ))?;
    let mut blocks = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    for first in (0..t).step_by(QUERY_BLOCK) {
        let len = QUERY_BLOCK.min(t - first);
        let keys = start + first + len;
        let qb = q.narrow(2, first * group, len * group)?;
        let kb = k.narrow(2, 0, keys)?;
        let vb = v.narrow(2, 0, keys)?.contiguous()?;
        let scores = qb.matmul(&kb.t()?)?.contiguous()?;
        let p = scores.apply_op1_no_bwd(&CausalSoftmax {
            group,
            start: start + first,
        })?;
        blocks.push(p.matmul(&vb)?);
    }
    let o = Tensor::cat(&blocks, 2)?; // [1, kv_heads, t·group, d]
    o.reshape((kv_heads, t, group, d))?
        .transpose(0, 1)?
        .reshape((t, heads * d))
}

/// Softmax over the last dimension of `[.., rows, keys]` scores, rows stacked as `group`
/// heads per position: row r (counted within its KV head) is a query at absolute position
/// `start + r / group`, sees keys `0..=start + r / group`, and gives the rest probability 0.
struct CausalSoftmax {
    group: usize,
    start: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("causal softmax: scores must be f32");
        };
        let Some((from, to)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal softmax: scores must be contiguous");
        };
        let dims = layout.dims();
        let (rows, total) = match dims {
            [.., r, k] => (*r, *k),
            _ => candle_core::bail!("causal softmax: scores must have rows and keys"),
        };
        let positions = rows / self.group.max(1);
        if total == 0 || rows % self.group.max(1) != 0 || self.start + positions > total {
            candle_core::bail!(
                "causal softmax: {positions} new positions after {} do not fit {total} keys",
                self.start
            );
        }
        let mut out = data[from..to].to_vec();
        // Rows are independent; each is a few kilobytes, so a handful per task.
        const ROWS_PER_TASK: usize = 16;
        out.par_chunks_mut(total * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, block)| {
                for (i, row) in block.chunks_mut(total).enumerate() {
                    let r = (chunk * ROWS_PER_TASK + i) % rows;
                    softmax_prefix(row, self.start + r / self.group + 1);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax of `row[..visible]` in place; the rest of the row becomes 0.
fn softmax_prefix(row: &mut [f32], visible: usize) {
    let (seen, hidden) = row.split_at_mut(visible);
    let max = lane_max(seen);
    let mut lanes = [0f32; 8];
    let mut chunks = seen.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, s) in lanes.iter_mut().zip(c.iter_mut()) {
            *s = exp_f32(*s - max);
            *l += *s;
        }
    }
    for s in chunks.into_remainder() {
        *s = exp_f32(*s - max);
        lanes[0] += *s;
    }
    let inv = 1.0 / lanes.iter().sum::<f32>();
    for s in seen.iter_mut() {
        *s *= inv;
    }
    hidden.fill(0.0);
}

/// The largest value, in eight lanes so it compiles to vector max instructions.
fn lane_max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    tail.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff, random};
    use candle_core::Device;

    /// The textbook form: a −∞ mask added to the scores, then candle's softmax.
    fn masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Tensor {
        let (_, heads, t, d) = q.dims4().unwrap();
        let (kv_heads, total) = (k.dim(1).unwrap(), k.dim(2).unwrap());
        let group = heads / kv_heads;
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            for m in &mut mask[i * total + start + i + 1..(i + 1) * total] {
                *m = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (t, total), &Device::Cpu).unwrap();
        let mut outs = Vec::new();
        // Head `h` of `[1, heads, t, d]` as `[t, d]`.
        let head = |x: &Tensor, h: usize| {
            x.narrow(1, h, 1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        for h in 0..heads {
            let (qh, kh, vh) = (head(q, h), head(k, h / group), head(v, h / group));
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(&mask).unwrap()).unwrap();
            outs.push(p.matmul(&vh).unwrap());
        }
        // [heads, t, d] → [t, heads·d]
        Tensor::stack(&outs, 0)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((t, heads * d))
            .unwrap()
    }

    #[test]
    fn equals_masked_softmax_attention_for_prompts_and_continuations() {
        let (heads, kv_heads, d) = (6, 2, 16);
        for (start, t) in [(0, 1), (0, 7), (0, 37), (5, 1), (9, 20), (0, 150), (70, 65)] {
            let total = start + t;
            let q = random(heads * t, d, 1 + t as u64)
                .reshape((1, heads, t, d))
                .unwrap();
            let k = (random(kv_heads * total, d, 2)
                .reshape((1, kv_heads, total, d))
                .unwrap()
                * 4.0)
                .unwrap();
            let v = random(kv_heads * total, d, 3)
                .reshape((1, kv_heads, total, d))
                .unwrap();
            let got = causal_attention(&q, &k, &v, start).unwrap();
            let want = masked_attention(&q, &k, &v, start);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-6, "start {start}, t {t}: {diff}");
        }
    }

    #[test]
    fn refuses_more_positions_than_keys() {
        let scores = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = scores
            .apply_op1_no_bwd(&CausalSoftmax { group: 1, start: 0 })
            .unwrap_err();
        assert!(err.to_string().contains("do not fit 3 keys"), "{err}");
    }
}
