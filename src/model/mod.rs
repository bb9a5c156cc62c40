//! `QwenVl`: the vision tower and the language model joined at the `<|image_pad|>` positions.

pub mod layers;
pub mod rope;
pub mod text;
pub mod vision;

use burn::tensor::{DType, Tensor};

use crate::cache::kv::KvCache;
use crate::config::ModelConfig;
use crate::device::DeviceHandle;
use crate::quant::Scheme;
use crate::weights::{Checkpoint, WeightsError};
use crate::Error;
use layers::Loader;
use rope::{mrope_positions, text_rope, MropePositions};
use text::TextModel;
use vision::{VisionOutput, VisionTower};

/// A loaded Qwen-VL model on one device.
pub struct QwenVl {
    /// Parsed config.json.
    pub config: ModelConfig,
    /// Device the weights live on.
    pub device: DeviceHandle,
    /// Activation dtype (and weight dtype of dense weights).
    pub dtype: DType,
    /// Quantization scheme of the matrices, `None` when dense.
    pub quant: Option<Scheme>,
    /// Device bytes of all weights.
    pub weight_bytes: usize,
    /// Vision tower.
    pub vision: VisionTower,
    /// Language model.
    pub text: TextModel,
}

/// Images as the language model sees them: their embeddings and patch grids.
pub struct ImageInputs<'a> {
    /// Output of the vision tower for all images of the prompt, in order.
    pub vision: &'a VisionOutput,
    /// `[t, h, w]` in patches, one per image.
    pub grids: &'a [[usize; 3]],
}

impl QwenVl {
    /// Loads every tensor of `config` from `ckpt` onto `device`, quantizing full-precision
    /// matrices with `quant` (matrices the checkpoint stores packed load as they are).
    /// `progress` receives the name of each finished part.
    pub fn load(
        ckpt: &Checkpoint,
        config: ModelConfig,
        device: DeviceHandle,
        dtype: DType,
        quant: Option<Scheme>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self, WeightsError> {
        let packed = config.quant.map(|q| q.scheme);
        let l = Loader {
            quant,
            packed,
            // unpack2x16float needs no shader-f16, but the f32 layout is what an adapter
            // without f16 support is promised.
            scale_dtype: if device.backend == crate::device::Backend::Wgpu
                && !device.adapter.shader_f16
            {
                DType::F32
            } else {
                DType::F16
            },
            ..Loader::dense(ckpt, &device.device, dtype)
        };
        let vision = VisionTower::load(
            &l,
            config.family,
            &config.vision,
            device.limits.clone(),
            progress,
        )?;
        let text = TextModel::load(&l, &config.text, device.limits.max_binding, progress)?;
        let weight_bytes = l.bytes.get();
        Ok(QwenVl {
            config,
            device,
            dtype,
            quant: quant.or(packed),
            weight_bytes,
            vision,
            text,
        })
    }

    /// A fresh KV cache for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        self.new_cache_with(capacity, self.device.limits.clone())
    }

    /// A fresh KV cache whose attention runs under `limits` (benchmarks switch the WGSL
    /// kernels off this way).
    pub fn new_cache_with(&self, capacity: usize, limits: crate::device::Limits) -> KvCache {
        let t = &self.config.text;
        KvCache::new(
            t.num_layers,
            t.num_kv_heads,
            t.head_dim,
            capacity,
            self.dtype,
            &self.device.device,
            limits,
        )
    }

    /// The most positions a KV cache may hold: the model's limit, what fits `budget_bytes`, and
    /// what one layer's K (or V) buffer may take under the device's binding limit.
    pub fn context_limit(&self, budget_bytes: usize) -> usize {
        let t = &self.config.text;
        let row = t.num_kv_heads * t.head_dim * self.dtype.size();
        let per_token = 2 * t.num_layers * row;
        t.max_position_embeddings
            .min(budget_bytes / per_token.max(1))
            .min(self.device.limits.max_binding / row.max(1))
    }

    /// Checks ids against the vocabulary and the image pads against the images.
    pub fn check_prompt(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(), Error> {
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.config.text.vocab_size)
        {
            return Err(Error::BadInput(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.config.text.vocab_size
            )));
        }
        let unit = self.config.vision.spatial_merge_size.pow(2);
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2] / unit).sum();
        let pads = ids
            .iter()
            .filter(|&&id| id == self.config.image_token_id)
            .count();
        if pads != expected {
            return Err(Error::BadInput(format!(
                "the prompt has {pads} <|image_pad|> tokens but its {} image(s) need {expected}",
                grids.len()
            )));
        }
        Ok(())
    }

    /// M-RoPE positions of a prompt.
    pub fn positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> MropePositions {
        mrope_positions(
            ids,
            self.config.image_token_id,
            grids,
            self.config.vision.spatial_merge_size,
        )
    }

    /// Input embeddings `[seq, hidden]` with image embeddings written over the image pads, and
    /// the per-layer deepstack additions (Qwen3-VL).
    pub fn embed(&self, ids: &[u32], images: Option<&ImageInputs>) -> (Tensor<2>, text::LayerAdds) {
        let device = &self.device.device;
        let text = self.text.embed.lookup(ids, self.dtype, &self.device.limits);
        let Some(images) = images else {
            return (text, Vec::new());
        };
        let hidden = self.config.text.hidden_size;
        // Runs of consecutive text / image rows.
        let mut runs: Vec<(bool, usize, usize)> = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let is_img = id == self.config.image_token_id;
            match runs.last_mut() {
                Some(r) if r.0 == is_img => r.2 = i + 1,
                _ => runs.push((is_img, i, i + 1)),
            }
        }
        let assemble = |image_rows: &Tensor<2>, text_rows: Option<&Tensor<2>>| {
            let mut parts = Vec::new();
            let mut img = 0;
            for &(is_img, a, b) in &runs {
                if is_img {
                    parts.push(image_rows.clone().slice([img..img + (b - a), 0..hidden]));
                    img += b - a;
                } else {
                    parts.push(match text_rows {
                        Some(t) => t.clone().slice([a..b, 0..hidden]),
                        None => Tensor::zeros([b - a, hidden], (device, self.dtype)),
                    });
                }
            }
            Tensor::cat(parts, 0)
        };
        let x = assemble(&images.vision.embeds, Some(&text));
        let adds = images
            .vision
            .deepstack
            .iter()
            .map(|f| assemble(f, None))
            .collect();
        (x, adds)
    }

    /// Runs prompt rows `[cache.len(), ids.len())` through the decoder and returns the final
    /// hidden states of those rows `[n, hidden]`.
    pub fn prefill(
        &self,
        ids: &[u32],
        images: Option<&ImageInputs>,
        positions: &MropePositions,
        cache: &mut KvCache,
    ) -> Result<Tensor<2>, Error> {
        let start = cache.len();
        if start >= ids.len() {
            return Err(Error::Internal("prefill with nothing new to compute"));
        }
        let (x, adds) = self.embed(ids, images);
        let hidden = self.config.text.hidden_size;
        let rows = start..ids.len();
        let x = x.slice([rows.clone(), 0..hidden]);
        let adds = adds
            .into_iter()
            .map(|a| a.slice([rows.clone(), 0..hidden]))
            .collect();
        let pos: [Vec<i64>; 3] = std::array::from_fn(|c| positions.ids[c][rows.clone()].to_vec());
        let (cos, sin) = text_rope(&self.config.text, &pos).upload(&self.device.device);
        self.text.forward(x, &cos, &sin, cache, &adds)
    }

    /// One decode step: feeds `token` at sequence index `cache.len()` (position
    /// `cache.len() + rope_delta` in all three components); returns its final hidden state `[1, hidden]`.
    pub fn decode_step(
        &self,
        token: u32,
        rope_delta: i64,
        cache: &mut KvCache,
    ) -> Result<Tensor<2>, Error> {
        let p = cache.len() as i64 + rope_delta;
        let pos = [vec![p], vec![p], vec![p]];
        let (cos, sin) = text_rope(&self.config.text, &pos).upload(&self.device.device);
        let x = self
            .text
            .embed
            .lookup(&[token], self.dtype, &self.device.limits);
        self.text.forward(x, &cos, &sin, cache, &Vec::new())
    }

    /// Logits of the last row of `hidden` (`[n, hidden]`) as `[1, vocab]`.
    pub fn last_logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let [n, h] = hidden.dims();
        self.text
            .logits(hidden.slice([n - 1..n, 0..h]), &self.device.limits)
    }
}
