//! Prefill then decode: prompt building, sampling (greedy, or temperature / top-k / top-p with a
//! seed), stop rules and streaming text.

use burn::tensor::{activation, Int, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{ImageInputs, QwenVl};
use crate::tokenizer::{ChatMessage, Content};
use crate::{Error, Runtime};

/// One user turn: optional system prompt, images (shown before the text), and the text.
#[derive(Clone, Default)]
pub struct Request {
    /// System prompt; `None` uses the family's default (if its template has one).
    pub system: Option<String>,
    /// The user's text.
    pub prompt: String,
    /// Images, in order.
    pub images: Vec<::image::RgbImage>,
}

impl Request {
    /// A text-only user turn.
    pub fn user(prompt: impl Into<String>) -> Self {
        Request {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    /// Adds an image.
    pub fn with_image(mut self, image: ::image::RgbImage) -> Self {
        self.images.push(image);
        self
    }

    /// Sets the system prompt.
    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    /// The chat messages of this request (images first, then the text, as the DESIGN contract says).
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        if let Some(s) = &self.system {
            out.push(ChatMessage {
                role: "system".into(),
                content: vec![Content::Text(s.clone())],
            });
        }
        let mut content: Vec<Content> = self.images.iter().map(|_| Content::Image).collect();
        content.push(Content::Text(self.prompt.clone()));
        out.push(ChatMessage {
            role: "user".into(),
            content,
        });
        out
    }
}

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sampling.
    pub sampling: Sampling,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// KV-cache positions (default: the smaller of the model's limit and what fits
    /// `kv_budget_bytes`).
    pub max_context: Option<usize>,
    /// Device memory the KV cache may take when `max_context` is not given.
    pub kv_budget_bytes: usize,
    /// Return the prefill logits (last prompt position).
    pub keep_prefill_logits: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: Sampling::default(),
            ignore_eos: false,
            max_context: None,
            kv_budget_bytes: 1 << 30,
            keep_prefill_logits: false,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Stop,
    /// max_new_tokens (or the context) was reached.
    Length,
}

/// Wall-clock milliseconds of each stage.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Image preprocessing plus the vision tower.
    pub vision: f64,
    /// The prompt forward pass up to the first token.
    pub prefill: f64,
    /// All decode steps.
    pub decode: f64,
}

/// What `generate` returns.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated ids (eos included when it stopped the run).
    pub token_ids: Vec<u32>,
    /// Generated text (special tokens skipped).
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Stage timings.
    pub timings: Timings,
    /// KV cache positions and device bytes.
    pub kv_cache: (usize, usize),
    /// `[vocab]` logits at the last prompt position, if asked for.
    pub prefill_logits: Option<Vec<f32>>,
}

impl GenerateOutput {
    /// The `qwen-vl generate --json` object (also what the web page writes): family, prompt
    /// tokens, generated ids and text, finish reason, stage timings with `load_ms`, the adapter
    /// and the KV cache size.
    pub fn report(&self, rt: &Runtime, load_ms: f64) -> serde_json::Value {
        serde_json::json!({
            "family": rt.family(),
            "prompt_tokens": self.prompt_tokens,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "timings_ms": {
                "load": load_ms,
                "vision": self.timings.vision,
                "prefill": self.timings.prefill,
                "decode": self.timings.decode,
            },
            "adapter": rt.model.device.adapter,
            "kv_cache": {"capacity": self.kv_cache.0, "bytes": self.kv_cache.1},
        })
    }
}

/// Chooses the next token from logits `[1, vocab]` on the device; only the chosen id is read
/// back. The host contributes one uniform draw per step from a seeded ChaCha8 stream.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded from `sampling.seed`.
    pub fn new(sampling: Sampling) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        Sampler { sampling, rng }
    }

    /// Picks a token: argmax when greedy; else temperature, top-k, top-p and a draw, as HF
    /// orders them.
    pub async fn sample(&mut self, logits: Tensor<2>) -> Result<u32, Error> {
        let s = &self.sampling;
        if s.temperature <= 0.0 {
            return first(read_ids(logits.argmax(1)).await?);
        }
        let [_, vocab] = logits.dims();
        let scaled = logits.div_scalar(s.temperature);
        // [1, k] values in descending order and their token ids.
        let (values, ids) = if s.top_k > 0 && s.top_k < vocab {
            scaled.topk_with_indices(s.top_k, 1)
        } else {
            scaled.sort_descending_with_indices(1)
        };
        let mut probs = activation::softmax(values, 1);
        if s.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
            // before it already does (the first token always stays).
            let before = probs.clone().cumsum(1) - probs.clone();
            probs = probs.mask_fill(before.greater_equal_elem(s.top_p), 0.0);
        }
        let u: f64 = self.rng.random();
        let threshold = probs.clone().sum().mul_scalar(u); // [1]
        let cumulative = probs.cumsum(1); // [1, k]
        let k = cumulative.dims()[1];
        // The first index whose cumulative mass exceeds u * total.
        let below = cumulative
            .lower(threshold.unsqueeze::<2>())
            .int()
            .sum_dim(1); // [1, 1]
        let pick = below.clamp_max((k - 1) as i64).reshape([1]);
        first(read_ids(ids.select(1, pick)).await?)
    }
}

fn first(v: Vec<u32>) -> Result<u32, Error> {
    v.first()
        .copied()
        .ok_or(Error::Internal("empty sampling result"))
}

/// Reads an int tensor back (async, so it works in the browser).
pub async fn read_ids<const D: usize>(t: Tensor<D, Int>) -> Result<Vec<u32>, Error> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| Error::Readback(format!("{e:?}")))?;
    let v: Vec<i64> = data
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| Error::Readback(format!("{e:?}")))?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

/// Reads a float tensor back as f32 (async).
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, Error> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| Error::Readback(format!("{e:?}")))?;
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Readback(format!("{e:?}")))
}

/// Waits for queued device work so stage timings are honest (native only; the browser cannot block).
pub fn sync(model: &QwenVl) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = model.device.device.sync();
    }
    #[cfg(target_arch = "wasm32")]
    let _ = model;
}

impl Runtime {
    /// Token ids of a request whose images have the given patch grids.
    pub fn prompt_ids(&self, request: &Request, grids: &[[usize; 3]]) -> Result<Vec<u32>, Error> {
        let unit = self.model.config.vision.spatial_merge_size.pow(2);
        let counts: Vec<usize> = grids.iter().map(|g| g[0] * g[1] * g[2] / unit).collect();
        Ok(self.tokenizer.encode_chat(&request.messages(), &counts)?)
    }

    /// Generates a reply, calling `on_text` with each new piece of text (blocking).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &self,
        request: &Request,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput, Error> {
        pollster::block_on(self.generate_async(request, options, on_text))
    }

    /// Generates a reply (async: the browser build awaits device readbacks). A one-shot
    /// [`Session`](crate::session::Session) without caches does the work.
    pub async fn generate_async(
        &self,
        request: &Request,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput, Error> {
        let mut session = crate::session::Session::new(
            self,
            crate::session::SessionOptions {
                slots: 1,
                max_context: options.max_context,
                kv_budget_bytes: options.kv_budget_bytes,
                prefix_reuse: false,
                vision_cache_bytes: 0,
            },
        )?;
        let (out, _) = session
            .generate_async(
                &request.messages(),
                &request.images,
                &self.preprocess,
                options,
                on_text,
            )
            .await?;
        Ok(out)
    }
}

/// Per-step results of [`Runtime::trace`].
#[derive(Debug, Clone)]
pub struct Trace {
    /// `[vocab]` logits at the last prompt position.
    pub prefill_logits: Vec<f32>,
    /// The argmax after the prompt and after each fed token.
    pub argmax: Vec<u32>,
    /// The tokens fed back (the argmax itself, or the forced sequence).
    pub fed: Vec<u32>,
}

impl Runtime {
    /// Runs a tokenised prompt with preprocessed images for `steps` greedy steps, or feeding
    /// `forced` tokens instead of the argmax (so one early flip cannot hide or fake the rest).
    /// Used by parity tests and the self-test.
    pub async fn trace_async(
        &self,
        ids: &[u32],
        pixels: &[crate::image::PixelValues],
        steps: usize,
        forced: Option<&[u32]>,
    ) -> Result<Trace, Error> {
        let grids: Vec<[usize; 3]> = pixels.iter().map(|p| p.grid_thw).collect();
        self.model.check_prompt(ids, &grids)?;
        let vision = self.encode_pixels(pixels)?;
        let mut cache = self.model.new_cache(ids.len() + steps);
        let positions = self.model.positions(ids, &grids);
        let images = vision.as_ref().map(|v| ImageInputs {
            vision: v,
            grids: &grids,
        });
        let hidden = self
            .model
            .prefill(ids, images.as_ref(), &positions, &mut cache)?;
        let logits = self.model.last_logits(hidden);
        let prefill_logits = read_f32(logits.clone()).await?;
        let mut argmax = vec![read_ids(logits.argmax(1)).await?[0]];
        let mut fed = Vec::new();
        for step in 0..steps.saturating_sub(1) {
            let token = match forced {
                Some(f) => *f
                    .get(step)
                    .ok_or(Error::BadInput("forced sequence shorter than steps".into()))?,
                None => argmax[step],
            };
            fed.push(token);
            let hidden = self
                .model
                .decode_step(token, positions.rope_delta, &mut cache)?;
            argmax
                .push(read_ids(self.model.text.logits(hidden, cache.limits()).argmax(1)).await?[0]);
        }
        Ok(Trace {
            prefill_logits,
            argmax,
            fed,
        })
    }

    /// Blocking [`trace_async`](Self::trace_async).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn trace(
        &self,
        ids: &[u32],
        pixels: &[crate::image::PixelValues],
        steps: usize,
        forced: Option<&[u32]>,
    ) -> Result<Trace, Error> {
        pollster::block_on(self.trace_async(ids, pixels, steps, forced))
    }
}
