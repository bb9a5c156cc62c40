//! qwen-vl-webgpu: Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) inference on Burn + wgpu, natively
//! (Vulkan / Metal / DX12, or the CPU) and in the browser on WebGPU.
//!
//! ```no_run
//! use qwen_vl::{generate::{GenerateOptions, Request}, LoadOptions, Runtime};
//! let rt = Runtime::load(std::path::Path::new("Qwen2-VL-2B-Instruct"), &LoadOptions::default(), &mut |_| {})?;
//! let image = qwen_vl::image::load_image(std::path::Path::new("photo.jpg"))?;
//! let request = Request::user("What is in this picture?").with_image(image);
//! let out = rt.generate(&request, &GenerateOptions::default(), &mut |piece| print!("{piece}"))?;
//! println!("\n{:?}", out.finish_reason);
//! # Ok::<(), qwen_vl::Error>(())
//! ```

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod cache;
pub mod config;
pub mod device;
#[cfg(not(target_arch = "wasm32"))]
pub mod eval;
pub mod generate;
pub mod image;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod quant;
#[cfg(not(target_arch = "wasm32"))]
pub mod quantize;
#[cfg(not(target_arch = "wasm32"))]
pub mod selftest;
pub mod session;
pub mod synth;
pub mod tokenizer;
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod web;
pub mod weights;

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};

pub use config::{Family, ModelConfig};
pub use device::{AdapterInfo, Backend, DeviceHandle};
use image::{PixelValues, PreprocessConfig};
use model::{vision::VisionOutput, QwenVl};
use tokenizer::QwenTokenizer;
use weights::Checkpoint;

/// Every failure of the library, each with a message that names the file/field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// config.json problems.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Weight files problems.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// Tokenizer / chat template problems.
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// Image decoding / preprocessing problems.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// No usable device.
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    /// The sequence would not fit the KV cache.
    #[error("the context needs {needed} positions but the KV cache holds {capacity}; shorten the prompt, lower --max-new-tokens or raise --max-context")]
    ContextFull {
        /// Positions needed.
        needed: usize,
        /// Positions available.
        capacity: usize,
    },
    /// A request that cannot be served as given.
    #[error("{0}")]
    BadInput(String),
    /// Reading a tensor back from the device failed.
    #[error("reading a result back from the device failed: {0}")]
    Readback(String),
    /// A bug: an invariant of this crate was violated.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Which backend runs the model.
    pub backend: Backend,
    /// Weight / activation dtype (f32 or f16).
    pub dtype: DType,
    /// Quantize the matrices while loading (`--quant q8|q4`); a quantized checkpoint loads as
    /// it is stored either way.
    pub quant: Option<quant::Scheme>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: Backend::Wgpu,
            dtype: DType::F32,
            quant: None,
        }
    }
}

/// Progress of a long operation, for progress bars.
#[derive(Debug, Clone)]
pub struct Progress {
    /// What is being done.
    pub stage: &'static str,
    /// Units done.
    pub done: usize,
    /// Units in total.
    pub total: usize,
    /// The item just finished.
    pub item: String,
}

/// A loaded model with its tokenizer and image preprocessor: everything needed to answer.
pub struct Runtime {
    /// The model on its device.
    pub model: QwenVl,
    /// Tokenizer and chat template.
    pub tokenizer: QwenTokenizer,
    /// Image preprocessing parameters.
    pub preprocess: PreprocessConfig,
    /// Where the checkpoint came from.
    pub source: PathBuf,
    /// Identity of the loaded model (hash of its config, weights source and dtype), part of
    /// every vision-cache key.
    pub model_id: [u8; 32],
}

/// The identity of a model as caches see it.
pub fn model_identity(
    config_text: &str,
    source: &str,
    dtype: DType,
    quant: Option<quant::Scheme>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(config_text.as_bytes());
    h.update(source.as_bytes());
    h.update(format!("{dtype:?}").as_bytes());
    if let Some(q) = quant {
        h.update(q.name().as_bytes());
    }
    *h.finalize().as_bytes()
}

/// An image after preprocessing and the vision tower.
pub struct EncodedImage {
    /// Patch grid `[t, h, w]`.
    pub grid: [usize; 3],
    /// Tokens it occupies in the prompt.
    pub tokens: usize,
}

impl Runtime {
    /// Loads a checkpoint folder (config.json, *.safetensors, tokenizer.json,
    /// preprocessor_config.json) onto the chosen backend.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(
        dir: &std::path::Path,
        options: &LoadOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self, Error> {
        let config = ModelConfig::from_dir(dir)?;
        let tokenizer = QwenTokenizer::from_dir(dir)?;
        let preprocess = PreprocessConfig::from_file(&dir.join("preprocessor_config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let device = match options.backend {
            Backend::Wgpu => DeviceHandle::wgpu()?,
            Backend::Cpu => DeviceHandle::cpu(),
        };
        let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        let model = load_model(
            &ckpt,
            config,
            device,
            options.dtype,
            options.quant,
            progress,
        )?;
        let model_id = model_identity(
            &config_text,
            &dir.display().to_string(),
            options.dtype,
            model.quant,
        );
        Ok(Runtime {
            model,
            tokenizer,
            preprocess,
            source: dir.to_path_buf(),
            model_id,
        })
    }

    /// Assembles a runtime from parts loaded elsewhere (the web build).
    pub fn from_parts(
        model: QwenVl,
        tokenizer: QwenTokenizer,
        preprocess: PreprocessConfig,
        source: PathBuf,
        model_id: [u8; 32],
    ) -> Self {
        Runtime {
            model,
            tokenizer,
            preprocess,
            source,
            model_id,
        }
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.model.config.family
    }

    /// Preprocesses images (HF-identical pixel values) with this model's preprocessor settings.
    pub fn preprocess_images(
        &self,
        images: &[::image::RgbImage],
    ) -> Result<Vec<PixelValues>, Error> {
        images
            .iter()
            .map(|img| image::preprocess(img, &self.preprocess).map_err(Error::from))
            .collect()
    }

    /// Runs the vision tower over preprocessed images (all in one call).
    pub fn encode_pixels(&self, pixels: &[PixelValues]) -> Result<Option<VisionOutput>, Error> {
        if pixels.is_empty() {
            return Ok(None);
        }
        let cols = pixels[0].cols;
        let rows: usize = pixels.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for p in pixels {
            if p.cols != cols {
                return Err(Error::Internal(
                    "images preprocessed with different patch sizes",
                ));
            }
            data.extend_from_slice(&p.data);
        }
        let expected = self.model.config.vision.in_channels
            * self.model.config.vision.temporal_patch_size
            * self.model.config.vision.patch_size.pow(2);
        if cols != expected {
            return Err(Error::BadInput(format!(
                "preprocessor_config.json gives patches of {cols} values but config.json's vision tower expects {expected}; the two files disagree on patch_size or temporal_patch_size"
            )));
        }
        let grids: Vec<[usize; 3]> = pixels.iter().map(|p| p.grid_thw).collect();
        let pv = Tensor::<2>::from_data(
            TensorData::new(data, [rows, cols]),
            (&self.model.device.device, self.model.dtype),
        );
        Ok(Some(self.model.vision.forward(pv, &grids)))
    }
}

/// Loads the model weights, quantizing matrices with `quant` if given, reporting progress per
/// part.
pub fn load_model(
    ckpt: &Checkpoint,
    config: ModelConfig,
    device: DeviceHandle,
    dtype: DType,
    quant: Option<quant::Scheme>,
    progress: &mut dyn FnMut(Progress),
) -> Result<QwenVl, Error> {
    if let (Some(stored), Some(asked)) = (config.quant, quant) {
        if stored.scheme != asked {
            return Err(Error::BadInput(format!(
                "the checkpoint is already quantized as {} (config.json quantization_config.scheme); drop --quant or pass --quant {}",
                stored.scheme, stored.scheme
            )));
        }
    }
    if !matches!(dtype, DType::F32 | DType::F16) {
        return Err(Error::BadInput(
            "only f32 and f16 are supported as --dtype".into(),
        ));
    }
    if dtype == DType::F16 && device.backend == Backend::Wgpu && !device.adapter.shader_f16 {
        return Err(Error::BadInput(format!(
            "the adapter `{}` has no shader-f16 support; use --dtype f32",
            device.adapter.name
        )));
    }
    let total = config.vision.depth + config.text.num_layers + 2;
    let mut done = 0;
    let mut report = |item: &str| {
        done += 1;
        progress(Progress {
            stage: "load",
            done: done.min(total),
            total,
            item: item.to_string(),
        });
    };
    Ok(QwenVl::load(
        ckpt,
        config,
        device,
        dtype,
        quant,
        &mut report,
    )?)
}
