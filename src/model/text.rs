//! The language model: Qwen2 decoder (Qwen2-VL, Qwen2.5-VL) and Qwen3 decoder (Qwen3-VL: per-head
//! q/k RMSNorm, explicit head_dim, no qkv bias). RMSNorm, GQA, SwiGLU, M-RoPE.

use burn::tensor::{DType, Int, Tensor, TensorData};

use super::layers::{apply_rotary, silu, Linear, Loader, RmsNorm, Weight};
use crate::cache::kv::KvCache;
use crate::config::TextConfig;
use crate::device::Limits;
use crate::kernels;
use crate::weights::WeightsError;

/// A `[vocab, hidden]` table stored as row chunks, each small enough for one storage binding
/// (a 151936 x 1536 f16 table is 445 MiB; lavapipe and browsers bind at most 128 MiB-1 GiB).
/// Chunks are sized for the model's dtype even when quantized, so that the rows of a chunk
/// dequantized for a multi-row projection still fit one binding.
pub struct VocabTable {
    /// `[rows_i, hidden]` each, dense or quantized.
    pub chunks: Vec<Weight>,
    /// Rows per chunk (the last may be shorter).
    pub rows_per_chunk: usize,
    /// Total rows.
    pub vocab: usize,
}

impl VocabTable {
    /// Loads `{prefix}.weight` (`[vocab, hidden]`) in chunks of at most `max_bytes` each.
    pub fn load(
        l: &Loader,
        prefix: &str,
        vocab: usize,
        hidden: usize,
        max_bytes: usize,
    ) -> Result<Self, WeightsError> {
        let elem = if l.dtype == burn::tensor::DType::F16 {
            2
        } else {
            4
        };
        let rows_per_chunk = (max_bytes / (hidden * elem)).clamp(1, vocab);
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < vocab {
            let end = (start + rows_per_chunk).min(vocab);
            chunks.push(l.matrix_rows(prefix, [vocab, hidden], &[vocab, hidden], start, end)?);
            start = end;
        }
        Ok(VocabTable {
            chunks,
            rows_per_chunk,
            vocab,
        })
    }

    /// Embedding rows for `ids` (all `< vocab`, checked by the caller): `[n, hidden]` in `dtype`.
    pub fn lookup(&self, ids: &[u32], dtype: DType, limits: &Limits) -> Tensor<2> {
        // Group ids by chunk; gather each group; restore the original order if several chunks.
        let mut groups: Vec<(usize, Vec<u32>, Vec<usize>)> = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let c = id as usize / self.rows_per_chunk;
            let local = (id as usize - c * self.rows_per_chunk) as u32;
            match groups.iter_mut().find(|g| g.0 == c) {
                Some(g) => {
                    g.1.push(local);
                    g.2.push(pos);
                }
                None => groups.push((c, vec![local], vec![pos])),
            }
        }
        if groups.len() == 1 {
            let (c, local, _) = groups.remove(0);
            return self.chunks[c].rows(&local, dtype, limits);
        }
        let mut order = vec![0i64; ids.len()];
        let mut parts = Vec::new();
        let mut k = 0;
        for (c, local, positions) in groups {
            for p in positions {
                order[p] = k;
                k += 1;
            }
            parts.push(self.chunks[c].rows(&local, dtype, limits));
        }
        let device = parts[0].device();
        let order = Tensor::<1, Int>::from_data(TensorData::new(order, [ids.len()]), &device);
        Tensor::cat(parts, 0).select(0, order)
    }

    /// `x @ table^T`: `[n, hidden] -> [n, vocab]`.
    pub fn project(&self, x: Tensor<2>, limits: &Limits) -> Tensor<2> {
        let parts: Vec<Tensor<2>> = self
            .chunks
            .iter()
            .map(|c| c.matmul_t(x.clone(), limits))
            .collect();
        if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(parts, 1)
        }
    }
}

/// One decoder layer.
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn load(l: &Loader, cfg: &TextConfig, i: usize) -> Result<Self, WeightsError> {
        let p = format!("lm.layers.{i}");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let eps = cfg.rms_norm_eps;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(l, &format!("{p}.input_layernorm"), h, eps)?,
            q_proj: Linear::load(l, &format!("{p}.self_attn.q_proj"), h, q_out, cfg.qkv_bias)?,
            k_proj: Linear::load(l, &format!("{p}.self_attn.k_proj"), h, kv_out, cfg.qkv_bias)?,
            v_proj: Linear::load(l, &format!("{p}.self_attn.v_proj"), h, kv_out, cfg.qkv_bias)?,
            o_proj: Linear::load(l, &format!("{p}.self_attn.o_proj"), q_out, h, false)?,
            q_norm: if cfg.qk_norm {
                Some(RmsNorm::load(l, &format!("{p}.self_attn.q_norm"), hd, eps)?)
            } else {
                None
            },
            k_norm: if cfg.qk_norm {
                Some(RmsNorm::load(l, &format!("{p}.self_attn.k_norm"), hd, eps)?)
            } else {
                None
            },
            post_attention_layernorm: RmsNorm::load(
                l,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
            )?,
            gate_proj: Linear::load(
                l,
                &format!("{p}.mlp.gate_proj"),
                h,
                cfg.intermediate_size,
                false,
            )?,
            up_proj: Linear::load(
                l,
                &format!("{p}.mlp.up_proj"),
                h,
                cfg.intermediate_size,
                false,
            )?,
            down_proj: Linear::load(
                l,
                &format!("{p}.mlp.down_proj"),
                cfg.intermediate_size,
                h,
                false,
            )?,
        })
    }

    /// `x`: `[seq, hidden]` at positions `[cache.len(), cache.len() + seq)`.
    fn forward(
        &self,
        cfg: &TextConfig,
        x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor<2>, crate::Error> {
        let [seq, _] = x.dims();
        let hd = cfg.head_dim;
        let lim = cache.limits().clone();
        let h = self.input_layernorm.forward(x.clone());
        // [seq, heads * hd] -> [heads, seq, hd]
        let heads = |t: Tensor<2>, n: usize| t.reshape([seq, n, hd]).swap_dims(0, 1);
        let mut q = heads(self.q_proj.forward(h.clone(), &lim), cfg.num_heads);
        let mut k = heads(self.k_proj.forward(h.clone(), &lim), cfg.num_kv_heads);
        let v = heads(self.v_proj.forward(h, &lim), cfg.num_kv_heads);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = apply_rotary(q, cos, sin);
        let k = apply_rotary(k, cos, sin);
        let p0 = cache.len();
        let (k_all, v_all) = cache.append(layer, k, v)?; // [kv_heads, capacity, hd]
        let attn = kernels::attention(q, k_all, v_all, p0, cache.limits()); // [heads, seq, hd]
        let attn = attn.swap_dims(0, 1).reshape([seq, cfg.num_heads * hd]);
        let x = x + self.o_proj.forward(attn, &lim);
        let h = self.post_attention_layernorm.forward(x.clone());
        let mlp = self.down_proj.forward(
            silu(self.gate_proj.forward(h.clone(), &lim)) * self.up_proj.forward(h, &lim),
            &lim,
        );
        Ok(x + mlp)
    }
}

/// The decoder stack with its embedding table, final norm and lm_head.
pub struct TextModel {
    /// Configuration.
    pub cfg: TextConfig,
    /// `embed_tokens`.
    pub embed: VocabTable,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when tied to `embed`.
    lm_head: Option<VocabTable>,
}

/// Additions to the hidden state after the first decoder layers (Qwen3-VL deepstack):
/// `adds[i]` (`[seq, hidden]`) is added after layer `i`.
pub type LayerAdds = Vec<Tensor<2>>;

impl TextModel {
    /// Loads the decoder; `max_binding` bounds each chunk of the vocab tables.
    pub fn load(
        l: &Loader,
        cfg: &TextConfig,
        max_binding: usize,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self, WeightsError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = VocabTable::load(l, "lm.embed_tokens", v, h, max_binding)?;
        progress("lm.embed_tokens.weight");
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(DecoderLayer::load(l, cfg, i)?);
            progress(&format!("lm.layers.{i}"));
        }
        let norm = RmsNorm::load(l, "lm.norm", h, cfg.rms_norm_eps)?;
        // A checkpoint may store lm_head even when tied (some exports do): use it if present.
        let lm_head = if (l.ckpt.contains("lm_head.weight") || l.ckpt.is_packed("lm_head"))
            && !cfg.tie_word_embeddings
        {
            Some(VocabTable::load(l, "lm_head", v, h, max_binding)?)
        } else if cfg.tie_word_embeddings {
            None
        } else {
            return Err(WeightsError::Missing {
                name: "lm_head.weight".into(),
                dir: "the checkpoint (tie_word_embeddings is false)".into(),
            });
        };
        progress("lm.norm");
        Ok(TextModel {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Runs the decoder over `x` (`[seq, hidden]`, positions continuing the cache) and returns
    /// the final-norm hidden states `[seq, hidden]`.
    pub fn forward(
        &self,
        mut x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: &mut KvCache,
        adds: &LayerAdds,
    ) -> Result<Tensor<2>, crate::Error> {
        let [seq, _] = x.dims();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&self.cfg, x, cos, sin, cache, i)?;
            if let Some(add) = adds.get(i) {
                x = x + add.clone();
            }
        }
        cache.commit(seq);
        Ok(self.norm.forward(x))
    }

    /// Hidden states entering each layer, for parity tests: `[layers + 1]` of `[seq, hidden]`
    /// (the last is the input of the final norm).
    pub fn layer_inputs(
        &self,
        mut x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: &mut KvCache,
        adds: &LayerAdds,
    ) -> Result<Vec<Tensor<2>>, crate::Error> {
        let [seq, _] = x.dims();
        let mut out = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&self.cfg, x, cos, sin, cache, i)?;
            if let Some(add) = adds.get(i) {
                x = x + add.clone();
            }
            out.push(x.clone());
        }
        cache.commit(seq);
        Ok(out)
    }

    /// Logits `[n, vocab]` of final-norm hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: Tensor<2>, limits: &Limits) -> Tensor<2> {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .project(hidden, limits)
    }
}
