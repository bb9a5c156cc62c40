//! The KV cache: per layer, K and V preallocated as `[kv_heads, capacity, head_dim]` and written
//! in place at the current length, so decoding allocates nothing per token.

use burn::tensor::{DType, Device, Tensor};

use crate::device::Limits;
use crate::kernels;
use crate::Error;

/// Keys and values of every layer for one sequence.
pub struct KvCache {
    layers: Vec<Option<(Tensor<3>, Tensor<3>)>>,
    capacity: usize,
    len: usize,
    limits: Limits,
}

impl KvCache {
    /// Preallocates `capacity` positions for `layers` layers.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
        limits: Limits,
    ) -> Self {
        let shape = [kv_heads, capacity.max(1), head_dim];
        let layers = (0..layers)
            .map(|_| {
                Some((
                    Tensor::zeros(shape, (device, dtype)),
                    Tensor::zeros(shape, (device, dtype)),
                ))
            })
            .collect();
        KvCache {
            layers,
            capacity,
            len: 0,
            limits,
        }
    }

    /// Bytes held by one layer's K and V buffers, for an f32 cache.
    pub fn bytes_per_layer(
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        elem: usize,
    ) -> usize {
        2 * kv_heads * capacity * head_dim * elem
    }

    /// Committed positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Device limits, for the attention kernels.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at the current length and returns
    /// views of the whole valid range `[kv_heads, len + n, head_dim]`.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> Result<(Tensor<3>, Tensor<3>), Error> {
        let [_, n, _] = k.dims();
        let end = self.len + n;
        if end > self.capacity {
            return Err(Error::ContextFull {
                needed: end,
                capacity: self.capacity,
            });
        }
        let (kc, vc) = self.layers[layer]
            .take()
            .ok_or(Error::Internal("kv cache layer in use"))?;
        let (kc, vc) = kernels::kv_append(kc, vc, k, v, self.len, &self.limits);
        let out = (kc.clone(), vc.clone());
        self.layers[layer] = Some((kc, vc));
        Ok(out)
    }

    /// Advances the length after every layer appended `n` positions.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes of device memory the cache holds.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.shape().num_elements() + v.shape().num_elements()) * k.dtype().size())
            .sum()
    }

    /// Declares the first `len` positions filled with what the buffers hold (zeros after
    /// allocation), so a benchmark can decode at a given context without prefilling it first.
    pub fn fill_zeros(&mut self, len: usize) -> Result<(), Error> {
        if len > self.capacity {
            return Err(Error::ContextFull {
                needed: len,
                capacity: self.capacity,
            });
        }
        self.len = len;
        Ok(())
    }

    /// Forgets everything after `len` (keeps a prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
