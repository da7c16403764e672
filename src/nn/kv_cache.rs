//! One sequence's key/value cache: per layer, `[kv_heads][capacity][head_dim]` f32 buffers that
//! grow by doubling (capped at the model's context), so appending a token copies one row, not
//! the whole history. Plain buffers rather than tensors: single-token decoding reads and writes
//! them directly, without a tensor operation per step.

use candle_core::{Device, Result, Tensor};

/// Capacity is rounded up to this many positions.
const CHUNK: usize = 64;

#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `needed` positions in every layer, never more than `max` positions.
    pub(crate) fn reserve(
        &mut self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        needed: usize,
        max: usize,
    ) -> Result<()> {
        if needed <= self.capacity && self.layers.len() == layers {
            return Ok(());
        }
        let capacity = (needed.max(self.capacity * 2).div_ceil(CHUNK) * CHUNK)
            .min(max)
            .max(needed);
        let mut grown = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut k = vec![0f32; kv_heads * capacity * head_dim];
            let mut v = vec![0f32; kv_heads * capacity * head_dim];
            if let Some((old_k, old_v)) = self.layers.get(i) {
                let used = self.len * head_dim;
                for h in 0..kv_heads {
                    let (src, dst) = (h * self.capacity * head_dim, h * capacity * head_dim);
                    k[dst..dst + used].copy_from_slice(&old_k[src..src + used]);
                    v[dst..dst + used].copy_from_slice(&old_v[src..src + used]);
                }
            }
            grown.push((k, v));
        }
        self.layers = grown;
        self.kv_heads = kv_heads;
        self.head_dim = head_dim;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `t` positions after the committed ones; `k`, `v` are `[kv_heads][t][head_dim]`.
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32], t: usize) {
        let d = self.head_dim;
        let (ck, cv) = &mut self.layers[layer];
        for h in 0..self.kv_heads {
            let dst = (h * self.capacity + self.len) * d;
            let src = h * t * d;
            ck[dst..dst + t * d].copy_from_slice(&k[src..src + t * d]);
            cv[dst..dst + t * d].copy_from_slice(&v[src..src + t * d]);
        }
    }

    /// Keys and values of `layer` for the committed positions (a copy, `[1, kv_heads, len,
    /// head_dim]`), for multi-token attention over earlier chunks.
    pub(crate) fn history(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (d, n) = (self.head_dim, self.len);
        let (ck, cv) = &self.layers[layer];
        let gather = |buf: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(self.kv_heads * n * d);
            for h in 0..self.kv_heads {
                let start = h * self.capacity * d;
                out.extend_from_slice(&buf[start..start + n * d]);
            }
            Tensor::from_vec(out, (1, self.kv_heads, n, d), &Device::Cpu)
        };
        Ok((gather(ck)?, gather(cv)?))
    }

    /// `layer`'s buffers and the stride between heads, in values.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32], usize) {
        let (k, v) = &self.layers[layer];
        (k, v, self.capacity * self.head_dim)
    }

    /// Marks `t` more positions as processed (after every layer wrote them).
    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }
}
