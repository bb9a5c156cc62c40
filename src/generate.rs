//! Prefill then decode: prompt building, sampling (greedy, or temperature / top-k / top-p with a
//! seed), stop rules and streaming text.

use burn::tensor::{Int, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use web_time::Instant;

use crate::model::{ImageInputs, QwenVl};
use crate::tokenizer::{ChatMessage, Content, TextStream};
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
    /// KV-cache positions at most (default: the model's max_position_embeddings).
    pub max_context: Option<usize>,
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
    /// `[vocab]` logits at the last prompt position, if asked for.
    pub prefill_logits: Option<Vec<f32>>,
}

/// Chooses the next token from logits `[1, vocab]`, reading back only what it needs.
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

    /// Picks a token. Greedy decoding reads back one id; sampling reads the logits.
    pub async fn sample(&mut self, logits: Tensor<2>) -> Result<u32, Error> {
        if self.sampling.temperature <= 0.0 {
            let id: Tensor<2, Int> = logits.argmax(1);
            return read_ids(id)
                .await?
                .first()
                .copied()
                .ok_or(Error::Internal("empty argmax"));
        }
        let values = read_f32(logits).await?;
        Ok(sample_host(&values, &self.sampling, &mut self.rng))
    }
}

/// HF-style sampling on host logits: temperature, then top-k, then top-p, then a draw.
pub fn sample_host(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let t = s.temperature.max(1e-6);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k.max(1));
    }
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] / t - max) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let r: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
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

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
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

    /// Generates a reply (async: the browser build awaits device readbacks).
    pub async fn generate_async(
        &self,
        request: &Request,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput, Error> {
        let t0 = Instant::now();
        let pixels = self.preprocess_images(&request.images)?;
        let grids: Vec<[usize; 3]> = pixels.iter().map(|p| p.grid_thw).collect();
        let ids = self.prompt_ids(request, &grids)?;
        self.model.check_prompt(&ids, &grids)?;
        let max_context = options
            .max_context
            .unwrap_or(self.model.config.text.max_position_embeddings);
        if ids.len() >= max_context {
            return Err(Error::BadInput(format!(
                "the prompt is {} tokens long but the context holds {max_context}; shorten the prompt, use fewer or smaller images, or raise --max-context",
                ids.len()
            )));
        }
        let vision = self.encode_pixels(&pixels)?;
        sync(&self.model);
        let vision_ms = ms_since(t0);

        let t1 = Instant::now();
        let capacity = (ids.len() + options.max_new_tokens).min(max_context);
        let mut cache = self.model.new_cache(capacity);
        let positions = self.model.positions(&ids, &grids);
        let images = vision.as_ref().map(|v| ImageInputs {
            vision: v,
            grids: &grids,
        });
        let hidden = self
            .model
            .prefill(&ids, images.as_ref(), &positions, &mut cache)?;
        let logits = self.model.last_logits(hidden);
        let prefill_logits = if options.keep_prefill_logits {
            Some(read_f32(logits.clone()).await?)
        } else {
            None
        };
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut token = sampler.sample(logits).await?;
        let prefill_ms = ms_since(t1);

        let t2 = Instant::now();
        let eos = self.tokenizer.eos_ids().to_vec();
        let mut stream = TextStream::new(true);
        let mut out = Vec::new();
        let mut finish = FinishReason::Length;
        for step in 0..options.max_new_tokens {
            out.push(token);
            if !options.ignore_eos && eos.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            let piece = stream.push(&self.tokenizer, token)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            if step + 1 == options.max_new_tokens || cache.len() >= cache.capacity() {
                break;
            }
            let hidden = self
                .model
                .decode_step(token, positions.rope_delta, &mut cache)?;
            token = sampler.sample(self.model.text.logits(hidden)).await?;
        }
        let rest = stream.finish(&self.tokenizer)?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        let text = self.tokenizer.decode(&out, true)?;
        Ok(GenerateOutput {
            prompt_tokens: ids.len(),
            token_ids: out,
            text,
            finish_reason: finish,
            timings: Timings {
                vision: vision_ms,
                prefill: prefill_ms,
                decode: ms_since(t2),
            },
            prefill_logits,
        })
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
            argmax.push(read_ids(self.model.text.logits(hidden).argmax(1)).await?[0]);
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
