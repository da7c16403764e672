//! One sequence's key/value cache: per layer, a `[1, kv_heads, capacity, head_dim]` buffer that
//! grows by doubling, so appending a token copies one row, not the whole history.

use candle_core::{DType, Device, Result, Tensor};

/// Capacity is rounded up to this many positions.
const CHUNK: usize = 64;

#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
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

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
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
            let k = Tensor::zeros((1, kv_heads, capacity, head_dim), DType::F32, &Device::Cpu)?;
            let v = k.zeros_like()?;
            if let Some((old_k, old_v)) = self.layers.get(i) {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            grown.push((k, v));
        }
        self.layers = grown;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[1, kv_heads, t, head_dim]`) after the committed positions of `layer`
    /// and returns views of everything so far (committed + these `t`).
    pub(crate) fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = &self.layers[layer];
        let t = k.dim(2)?;
        ck.slice_set(k, 2, self.len)?;
        cv.slice_set(v, 2, self.len)?;
        Ok((
            ck.narrow(2, 0, self.len + t)?,
            cv.narrow(2, 0, self.len + t)?,
        ))
    }

    /// Marks `t` more positions as processed (after every layer appended them).
    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets everything after `len` positions (to re-score a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
