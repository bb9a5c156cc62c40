//! `Session`: a conversation with the model that keeps its KV caches and image embeddings between
//! requests.
//!
//! - Prefix reuse: each request continues from the longest prefix of tokens already in one of
//!   the session's KV slots (truncate there, prefill only the rest), like llama.cpp's prompt
//!   cache. Image tokens are compared by the content hash of their image as well as their id,
//!   so two different images with the same number of pad tokens never match.
//! - Vision cache: image embeddings by content hash, LRU under a byte budget.
//! - Slots: several KV caches, so phases of a pipeline that come back to an earlier prefix find
//!   it intact. A request takes the slot that shares the longest prefix, unless that would throw
//!   away more than half of what the slot holds and another slot is cheaper to give up.

use burn::tensor::Tensor;
use web_time::Instant;

use crate::cache::kv::KvCache;
use crate::cache::vision::{image_key, CachedImage, ImageKey, VisionCache, VisionCacheStats};
use crate::generate::{FinishReason, GenerateOptions, GenerateOutput, Sampler, Timings};
use crate::image::{preprocess, PreprocessConfig};
use crate::model::vision::VisionOutput;
use crate::model::ImageInputs;
use crate::tokenizer::{ChatMessage, TextStream};
use crate::{Error, Runtime};

/// How a session caches.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// KV slots (each preallocated for `max_context` positions).
    pub slots: usize,
    /// Positions per slot (default: the model's limit or what fits `kv_budget_bytes`).
    pub max_context: Option<usize>,
    /// Device bytes for all KV slots together when `max_context` is not given.
    pub kv_budget_bytes: usize,
    /// Reuse cached prefixes (off: every request prefills from scratch).
    pub prefix_reuse: bool,
    /// Bytes for the vision-embedding cache (0: off).
    pub vision_cache_bytes: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            slots: 1,
            max_context: None,
            kv_budget_bytes: 1 << 30,
            prefix_reuse: true,
            vision_cache_bytes: 256 << 20,
        }
    }
}

/// What one request cost.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RequestStats {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the KV cache.
    pub reused_tokens: usize,
    /// Prompt tokens computed.
    pub computed_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Images whose embeddings came from the vision cache.
    pub vision_cache_hits: usize,
    /// Images that went through the vision tower.
    pub vision_cache_misses: usize,
}

/// One KV cache and the tokens in it.
struct Slot {
    cache: KvCache,
    /// Token id and image tag (0 for text) of every cached position.
    tokens: Vec<(u32, u128)>,
    last_used: u64,
}

/// A conversation: KV slots, a vision cache and the runtime they belong to.
pub struct Session<'rt> {
    rt: &'rt Runtime,
    opts: SessionOptions,
    capacity: usize,
    slots: Vec<Slot>,
    vision: VisionCache,
    clock: u64,
    pinned: Option<usize>,
}

/// Encoded images ready for the language model.
pub struct EncodedImages {
    /// All images' outputs concatenated, in order.
    pub output: Option<VisionOutput>,
    /// Patch grids.
    pub grids: Vec<[usize; 3]>,
    /// Content keys.
    pub keys: Vec<ImageKey>,
    /// How many came from the cache.
    pub hits: usize,
}

fn tag(key: &ImageKey) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&key[..16]);
    u128::from_le_bytes(b).max(1)
}

impl<'rt> Session<'rt> {
    /// Allocates the KV slots.
    pub fn new(rt: &'rt Runtime, opts: SessionOptions) -> Result<Self, Error> {
        let slots_n = opts.slots.max(1);
        let capacity = match opts.max_context {
            Some(c) => c,
            None => rt.model.context_limit(opts.kv_budget_bytes / slots_n),
        };
        if capacity == 0 {
            return Err(Error::BadInput(
                "the KV budget is too small for even one position".into(),
            ));
        }
        let slots = (0..slots_n)
            .map(|_| Slot {
                cache: rt.model.new_cache(capacity),
                tokens: Vec::new(),
                last_used: 0,
            })
            .collect();
        Ok(Session {
            rt,
            vision: VisionCache::new(opts.vision_cache_bytes),
            opts,
            capacity,
            slots,
            clock: 0,
            pinned: None,
        })
    }

    /// Positions each slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The runtime.
    pub fn runtime(&self) -> &'rt Runtime {
        self.rt
    }

    /// Vision cache counters.
    pub fn vision_stats(&self) -> VisionCacheStats {
        self.vision.stats()
    }

    /// KV bytes held by all slots.
    pub fn kv_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.cache.bytes()).sum()
    }

    /// Forgets every cached token (the vision cache is kept: it is keyed by content).
    pub fn reset(&mut self) {
        for s in &mut self.slots {
            s.cache.truncate(0);
            s.tokens.clear();
        }
    }

    /// Preprocesses and encodes images, taking cached embeddings where possible; all misses go
    /// through the vision tower in one batched call.
    pub fn encode_images(
        &mut self,
        images: &[::image::RgbImage],
        pre: &PreprocessConfig,
    ) -> Result<EncodedImages, Error> {
        let model_id = &self.rt.model_id;
        let keys: Vec<ImageKey> = images
            .iter()
            .map(|img| image_key(img, pre, model_id))
            .collect();
        let mut cached: Vec<Option<CachedImage>> =
            keys.iter().map(|k| self.vision.get(k)).collect();
        let hits = cached.iter().filter(|c| c.is_some()).count();
        let missing: Vec<usize> = (0..images.len()).filter(|&i| cached[i].is_none()).collect();
        if !missing.is_empty() {
            let pixels = missing
                .iter()
                .map(|&i| preprocess(&images[i], pre))
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .rt
                .encode_pixels(&pixels)?
                .ok_or(Error::Internal("no vision output"))?;
            let unit = self.rt.model.config.vision.spatial_merge_size.pow(2);
            let hidden = self.rt.model.config.text.hidden_size;
            let mut row = 0;
            for (p, &i) in pixels.iter().zip(&missing) {
                let n = p.grid_thw.iter().product::<usize>() / unit;
                let part = |t: &Tensor<2>| t.clone().slice([row..row + n, 0..hidden]);
                let entry = CachedImage {
                    grid: p.grid_thw,
                    embeds: part(&out.embeds),
                    deepstack: out.deepstack.iter().map(part).collect(),
                };
                self.vision.insert(keys[i], entry.clone());
                cached[i] = Some(entry);
                row += n;
            }
        }
        let entries: Vec<CachedImage> = cached.into_iter().flatten().collect();
        let grids = entries.iter().map(|e| e.grid).collect();
        let output = if entries.is_empty() {
            None
        } else {
            let taps = entries[0].deepstack.len();
            Some(VisionOutput {
                embeds: Tensor::cat(entries.iter().map(|e| e.embeds.clone()).collect(), 0),
                deepstack: (0..taps)
                    .map(|k| {
                        Tensor::cat(entries.iter().map(|e| e.deepstack[k].clone()).collect(), 0)
                    })
                    .collect(),
            })
        };
        Ok(EncodedImages {
            output,
            grids,
            keys,
            hits,
        })
    }

    /// Sends the following requests to KV slot `slot` (clamped), or back to automatic choice.
    pub fn pin_slot(&mut self, slot: Option<usize>) {
        self.pinned = slot.map(|s| s.min(self.slots.len() - 1));
    }

    /// Picks the slot for `tokens` and how many of its cached positions to keep.
    fn choose_slot(&self, tokens: &[(u32, u128)]) -> (usize, usize) {
        let common = |s: &Slot| {
            if !self.opts.prefix_reuse {
                return 0;
            }
            // Keep at least one prompt token to compute: its logits start the reply.
            let n = s
                .tokens
                .iter()
                .zip(tokens)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(tokens.len().saturating_sub(1))
        };
        if let Some(p) = self.pinned {
            return (p, common(&self.slots[p]));
        }
        let best = (0..self.slots.len())
            .max_by_key(|&i| (common(&self.slots[i]), self.slots[i].last_used))
            .unwrap_or(0);
        let kept = common(&self.slots[best]);
        if kept * 2 < self.slots[best].tokens.len() {
            // Reusing `best` would throw most of it away: take the least recently used slot.
            let lru = (0..self.slots.len())
                .min_by_key(|&i| self.slots[i].last_used)
                .unwrap_or(best);
            return (lru, common(&self.slots[lru]));
        }
        (best, kept)
    }

    /// Answers a conversation whose last message is the user's, with `images` (in the order
    /// their image items appear) preprocessed by `pre`. Streams text to `on_text`.
    pub async fn generate_async(
        &mut self,
        messages: &[ChatMessage],
        images: &[::image::RgbImage],
        pre: &PreprocessConfig,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(GenerateOutput, RequestStats), Error> {
        let t0 = Instant::now();
        let encoded = self.encode_images(images, pre)?;
        crate::generate::sync(&self.rt.model);
        let vision_ms = t0.elapsed().as_secs_f64() * 1e3;

        let t1 = Instant::now();
        let rt = self.rt;
        let model = &rt.model;
        let unit = model.config.vision.spatial_merge_size.pow(2);
        let counts: Vec<usize> = encoded
            .grids
            .iter()
            .map(|g| g.iter().product::<usize>() / unit)
            .collect();
        let ids = rt.tokenizer.encode_chat(messages, &counts)?;
        model.check_prompt(&ids, &encoded.grids)?;
        if ids.len() >= self.capacity {
            return Err(Error::BadInput(format!(
                "the prompt is {} tokens long but the context holds {}; shorten the prompt, use fewer or smaller images, or raise --max-context",
                ids.len(),
                self.capacity
            )));
        }
        // Tag image positions with their image's content hash.
        let mut tokens: Vec<(u32, u128)> = Vec::with_capacity(ids.len());
        let mut image = 0;
        let mut left = counts.first().copied().unwrap_or(0);
        for &id in &ids {
            if id == model.config.image_token_id && image < counts.len() {
                tokens.push((id, tag(&encoded.keys[image])));
                left -= 1;
                if left == 0 {
                    image += 1;
                    left = counts.get(image).copied().unwrap_or(0);
                }
            } else {
                tokens.push((id, 0));
            }
        }
        let (slot_i, keep) = self.choose_slot(&tokens);
        self.clock += 1;
        let slot = &mut self.slots[slot_i];
        slot.last_used = self.clock;
        slot.cache.truncate(keep);
        slot.tokens.truncate(keep);

        let positions = model.positions(&ids, &encoded.grids);
        let inputs = encoded.output.as_ref().map(|v| ImageInputs {
            vision: v,
            grids: &encoded.grids,
        });
        let hidden = model.prefill(&ids, inputs.as_ref(), &positions, &mut slot.cache)?;
        slot.tokens.extend_from_slice(&tokens[keep..]);
        let logits = model.last_logits(hidden);
        let prefill_logits = if options.keep_prefill_logits {
            Some(crate::generate::read_f32(logits.clone()).await?)
        } else {
            None
        };
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut token = sampler.sample(logits).await?;
        let prefill_ms = t1.elapsed().as_secs_f64() * 1e3;

        let t2 = Instant::now();
        let eos = rt.tokenizer.eos_ids().to_vec();
        let mut stream = TextStream::new(true);
        let mut out = Vec::new();
        let mut finish = FinishReason::Length;
        for step in 0..options.max_new_tokens {
            out.push(token);
            if !options.ignore_eos && eos.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            let piece = stream.push(&rt.tokenizer, token)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            if step + 1 == options.max_new_tokens || slot.cache.len() >= slot.cache.capacity() {
                break;
            }
            let hidden = model.decode_step(token, positions.rope_delta, &mut slot.cache)?;
            slot.tokens.push((token, 0));
            token = sampler
                .sample(model.text.logits(hidden, slot.cache.limits()))
                .await?;
        }
        let rest = stream.finish(&rt.tokenizer)?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        let text = rt.tokenizer.decode(&out, true)?;
        let stats = RequestStats {
            prompt_tokens: ids.len(),
            reused_tokens: keep,
            computed_tokens: ids.len() - keep,
            generated_tokens: out.len(),
            vision_cache_hits: encoded.hits,
            vision_cache_misses: images.len() - encoded.hits,
        };
        let output = GenerateOutput {
            prompt_tokens: ids.len(),
            token_ids: out,
            text,
            finish_reason: finish,
            timings: Timings {
                vision: vision_ms,
                prefill: prefill_ms,
                decode: t2.elapsed().as_secs_f64() * 1e3,
            },
            kv_cache: (self.capacity, self.kv_bytes()),
            prefill_logits,
        };
        Ok((output, stats))
    }

    /// Blocking [`generate_async`](Self::generate_async).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &mut self,
        messages: &[ChatMessage],
        images: &[::image::RgbImage],
        pre: &PreprocessConfig,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(GenerateOutput, RequestStats), Error> {
        pollster::block_on(self.generate_async(messages, images, pre, options, on_text))
    }
}
