//! Image preprocessing, bit-exact with Hugging Face transformers' `Qwen2VLImageProcessor`
//! (transformers 5.23, default torchvision backend), which Qwen2-VL, Qwen2.5-VL and Qwen3-VL share.
//!
//! The pipeline, top to bottom:
//! 1. [`decode_image`]: bytes -> upright RGB8 (EXIF orientation applied, transparency composited
//!    onto white exactly as PIL's `alpha_composite` does in transformers' `convert_to_rgb`).
//! 2. [`smart_resize`]: pick the target size, multiples of `patch * merge`, pixel count clamped
//!    to `[min_pixels, max_pixels]`.
//! 3. [`resize_bicubic_u8`]: torchvision `resize(BICUBIC, antialias=True)` on a uint8 tensor, i.e.
//!    PyTorch's integer path (Pillow-SIMD style int16 weights), reproduced bit for bit.
//! 4. [`preprocess`]: `(x - 255*mean) / (255*std)` in f32, then patchify into rows of
//!    `C x T x P x P` in 2x2-merge-block order.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde_json::{Map, Value};

/// transformers' `OPENAI_CLIP_MEAN`: the default `image_mean` of `Qwen2VLImageProcessor`. Kept
/// in f64 and rounded to f32 at use, as `torch.tensor([...])` rounds the Python floats.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`: the default `image_std`.
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}` (pixel counts).
const DEFAULT_MIN_PIXELS: usize = 56 * 56;
const DEFAULT_MAX_PIXELS: usize = 28 * 28 * 1280;
/// PIL's `Image.BICUBIC`; the only `resample` this module implements.
const PIL_BICUBIC: u64 = 3;
/// Pillow refuses to open images above `2 * Image.MAX_IMAGE_PIXELS` (decompression bomb guard).
const MAX_DECODE_PIXELS: u64 = 2 * 89_478_485;
/// smart_resize rejects images whose long side exceeds 200x the short side.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// Everything that can go wrong while reading a preprocessor config or an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {err}; check that the file exists and is readable")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{origin}: not valid JSON ({detail}); re-download preprocessor_config.json from the model repository")]
    ConfigJson { origin: String, detail: String },

    #[error("{origin}: field `{field}` {problem}")]
    ConfigField {
        origin: String,
        field: String,
        problem: String,
    },

    #[error(
        "{origin}: not a recognised image (expected PNG, JPEG, WebP or GIF data); \
         convert the file to one of those formats"
    )]
    UnknownFormat { origin: String },

    #[error(
        "{origin}: looks like a video; video input is not supported, pass a still image \
         (e.g. one frame exported as PNG)"
    )]
    Video { origin: String },

    #[error(
        "{origin}: cannot decode the {format} image: {detail}; the file may be truncated or \
         corrupt, re-export or re-download it"
    )]
    Decode {
        origin: String,
        format: String,
        detail: String,
    },

    #[error("{origin}: the image is too large to decode ({detail}); downscale it first")]
    TooLarge { origin: String, detail: String },

    #[error("{origin}: the image is {width}x{height} pixels; an image needs at least one pixel")]
    EmptyImage {
        origin: String,
        width: u32,
        height: u32,
    },

    #[error(
        "image of {width}x{height} (width x height) has aspect ratio {ratio:.1}, above the 200 that \
         Qwen-VL's smart_resize accepts; crop or pad the image to a less extreme shape"
    )]
    AspectRatio {
        height: usize,
        width: usize,
        ratio: f64,
    },

    #[error("cannot resize {width}x{height} (width x height): {problem}")]
    InvalidSize {
        height: usize,
        width: usize,
        problem: String,
    },
}

/// Parsed `preprocessor_config.json` (the fields `Qwen2VLImageProcessor` reads).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side of a square vision patch in pixels (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
    pub patch_size: usize,
    /// Frames per temporal patch; a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LM token (2).
    pub merge_size: usize,
    /// Lower bound on the resized pixel count (`min_pixels` or `size.shortest_edge`).
    pub min_pixels: usize,
    /// Upper bound on the resized pixel count (`max_pixels` or `size.longest_edge`).
    pub max_pixels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Kept in f64 as Python holds it; `1 / rescale_factor` is formed in f64 before the cast.
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl Default for PreprocessConfig {
    /// transformers' class defaults (Qwen2-VL values).
    fn default() -> Self {
        Self {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: DEFAULT_MIN_PIXELS,
            max_pixels: DEFAULT_MAX_PIXELS,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

impl PreprocessConfig {
    /// Parses the text of a `preprocessor_config.json`; `origin` names the file in errors.
    ///
    /// Pixel bounds follow transformers 5.23: start from `size` (`shortest_edge` /
    /// `longest_edge`, both pixel COUNTS) or the class default, then a non-null top-level
    /// `min_pixels` / `max_pixels` overrides the matching entry. Missing fields take the class
    /// defaults.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ImageError> {
        let root: Value = serde_json::from_str(text).map_err(|e| ImageError::ConfigJson {
            origin: origin.to_string(),
            detail: e.to_string(),
        })?;
        let Some(obj) = root.as_object() else {
            return Err(ImageError::ConfigJson {
                origin: origin.to_string(),
                detail: "the top level is not an object".to_string(),
            });
        };
        let fields = Fields { obj, origin };
        let defaults = Self::default();

        let patch_size = fields
            .positive("patch_size")?
            .unwrap_or(defaults.patch_size);
        let temporal_patch_size = fields
            .positive("temporal_patch_size")?
            .unwrap_or(defaults.temporal_patch_size);
        let merge_size = fields
            .positive("merge_size")?
            .unwrap_or(defaults.merge_size);
        let do_resize = fields.boolean("do_resize")?.unwrap_or(true);
        let do_rescale = fields.boolean("do_rescale")?.unwrap_or(true);
        let do_normalize = fields.boolean("do_normalize")?.unwrap_or(true);

        let (mut shortest, mut longest) = match obj.get("size") {
            None | Some(Value::Null) => (Some(DEFAULT_MIN_PIXELS), Some(DEFAULT_MAX_PIXELS)),
            Some(Value::Object(size)) => {
                let sub = Fields { obj: size, origin };
                (
                    sub.count("shortest_edge", "size.")?,
                    sub.count("longest_edge", "size.")?,
                )
            }
            Some(_) => return Err(fields.bad(
                "size",
                "must be an object {\"shortest_edge\": MIN_PIXELS, \"longest_edge\": MAX_PIXELS}",
            )),
        };
        if let Some(v) = fields.count("min_pixels", "")? {
            shortest = Some(v);
        }
        if let Some(v) = fields.count("max_pixels", "")? {
            longest = Some(v);
        }
        // transformers raises at resize time when either bound is missing or 0.
        let (min_pixels, max_pixels) = match (shortest, longest) {
            (Some(lo), Some(hi)) if lo > 0 && hi > 0 => (lo, hi),
            _ if !do_resize => (shortest.unwrap_or(0), longest.unwrap_or(0)),
            _ => {
                return Err(fields.bad(
                    "size",
                    "needs positive pixel bounds: set \"min_pixels\" and \"max_pixels\" \
                     (or \"size\": {\"shortest_edge\": N, \"longest_edge\": M}), e.g. 3136 and 1003520",
                ))
            }
        };

        let image_mean = fields.triple("image_mean")?.unwrap_or(defaults.image_mean);
        let image_std = fields.triple("image_std")?.unwrap_or(defaults.image_std);
        let rescale_factor = fields.number("rescale_factor")?.unwrap_or(1.0 / 255.0);
        if !(rescale_factor.is_finite() && rescale_factor > 0.0) && do_rescale {
            return Err(fields.bad(
                "rescale_factor",
                "must be a positive number such as 0.00392156862745098 (1/255)",
            ));
        }
        if let Some(resample) = fields.number("resample")? {
            if resample != PIL_BICUBIC as f64 {
                return Err(fields.bad(
                    "resample",
                    "is not 3 (bicubic), the only filter this runtime implements; set \"resample\": 3",
                ));
            }
        }

        let cfg = Self {
            patch_size,
            temporal_patch_size,
            merge_size,
            min_pixels,
            max_pixels,
            image_mean,
            image_std,
            rescale_factor,
            do_resize,
            do_rescale,
            do_normalize,
        };
        if do_normalize && cfg.normalize_terms().1.contains(&0.0) {
            return Err(fields.bad(
                "image_std",
                "contains 0, which would divide by zero; use the model's values",
            ));
        }
        Ok(cfg)
    }

    /// Reads and parses a `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|err| ImageError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Side of one merged block in pixels: sizes are rounded to multiples of this.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Per-channel `(subtrahend, divisor)` exactly as transformers forms them in f32: with rescale
    /// and normalize both on, `tensor(mean) * (1.0 / rescale_factor)` (f32 times the f64 scalar
    /// cast to f32), else the plain f32 mean/std.
    fn normalize_terms(&self) -> ([f32; 3], [f32; 3]) {
        if self.do_rescale {
            let inv = (1.0 / self.rescale_factor) as f32;
            (
                self.image_mean.map(|m| m * inv),
                self.image_std.map(|s| s * inv),
            )
        } else {
            (self.image_mean, self.image_std)
        }
    }

    /// `lut[c][v]`: the f32 value a u8 `v` in channel `c` becomes, identical to transformers'
    /// `rescale_and_normalize` (each value depends only on channel and level).
    fn value_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        let (sub, div) = self.normalize_terms();
        let scale = self.rescale_factor as f32;
        for (c, row) in lut.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                let x = v as f32;
                *out = if self.do_normalize {
                    (x - sub[c]) / div[c]
                } else if self.do_rescale {
                    x * scale
                } else {
                    x
                };
            }
        }
        lut
    }
}

/// Typed access to one JSON object's fields, with errors naming the file and field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Fields<'_> {
    fn bad(&self, field: &str, problem: &str) -> ImageError {
        ImageError::ConfigField {
            origin: self.origin.to_string(),
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    /// `null` counts as absent, as `kwargs.pop(name, None)` sees it.
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn number(&self, field: &str) -> Result<Option<f64>, ImageError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "must be a number")),
        }
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>, ImageError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, "must be true or false")),
        }
    }

    /// A non-negative integer (an integral float such as `3136.0` is accepted too).
    fn count(&self, field: &str, prefix: &str) -> Result<Option<usize>, ImageError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let as_int = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 2f64.powi(53))
                .map(|f| f as u64)
        });
        match as_int.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(self.bad(
                &format!("{prefix}{field}"),
                "must be a non-negative integer",
            )),
        }
    }

    fn positive(&self, field: &str) -> Result<Option<usize>, ImageError> {
        match self.count(field, "")? {
            Some(0) => Err(self.bad(field, "must be at least 1")),
            other => Ok(other),
        }
    }

    /// A 3-element list of numbers, or one number used for all channels (both are accepted by
    /// transformers). Values are rounded to f32 as `torch.tensor(list)` does.
    fn triple(&self, field: &str) -> Result<Option<[f32; 3]>, ImageError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        if let Some(x) = v.as_f64() {
            return Ok(Some([x as f32; 3]));
        }
        let problem = "must be a list of 3 numbers (R, G, B)";
        let list = v.as_array().ok_or_else(|| self.bad(field, problem))?;
        if list.len() != 3 {
            return Err(self.bad(field, problem));
        }
        let mut out = [0f32; 3];
        for (o, x) in out.iter_mut().zip(list) {
            *o = x.as_f64().ok_or_else(|| self.bad(field, problem))? as f32;
        }
        Ok(Some(out))
    }
}

/// transformers' `smart_resize`: the (height, width) an image is resized to.
///
/// `h' = round(h/f)*f` (Python round, half to even), same for `w`; if `h'w' > max_pixels`,
/// `beta = sqrt(hw/max)` and `h' = max(f, floor(h/beta/f)*f)`; else if `h'w' < min_pixels`,
/// `beta = sqrt(min/(hw))` and `h' = ceil(h*beta/f)*f`. Errors where transformers raises (aspect
/// ratio above 200, zero side) and where its result would be an empty image.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    let invalid = |problem: &str| ImageError::InvalidSize {
        height,
        width,
        problem: problem.to_string(),
    };
    if height == 0 || width == 0 {
        return Err(invalid("the image has no pixels"));
    }
    if factor == 0 {
        return Err(invalid(
            "factor (patch_size * merge_size) is 0; check preprocessor_config.json",
        ));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageError::AspectRatio {
            height,
            width,
            ratio,
        });
    }
    // All float steps mirror the Python expression order so results agree to the bit.
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let to_size = |x: f64| x as usize * factor;
    let mut h_bar = to_size((h / f).round_ties_even());
    let mut w_bar = to_size((w / f).round_ties_even());
    let area = |a: usize, b: usize| a as u128 * b as u128;
    if area(h_bar, w_bar) > max_pixels as u128 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max(to_size((h / beta / f).floor()));
        w_bar = factor.max(to_size((w / beta / f).floor()));
    } else if area(h_bar, w_bar) < min_pixels as u128 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = to_size((h * beta / f).ceil());
        w_bar = to_size((w * beta / f).ceil());
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(invalid(&format!(
            "the resized size would be {w_bar}x{h_bar}; set min_pixels to at least {}",
            factor * factor
        )));
    }
    Ok((h_bar, w_bar))
}

/// Whether `bytes` start like a common video container (MP4/MOV, WebM/MKV, AVI).
fn looks_like_video(bytes: &[u8]) -> bool {
    let mp4 = bytes.len() >= 12 && &bytes[4..8] == b"ftyp";
    let ebml = bytes.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]);
    let avi = bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"AVI ";
    mp4 || ebml || avi
}

/// Decodes PNG / JPEG / WebP / GIF (first frame) bytes to upright RGB8, as transformers sees a
/// PIL image: EXIF orientation applied (`ImageOps.exif_transpose`), grey replicated to RGB,
/// 16-bit samples cut to their high byte (Pillow's 16-bit PNG unpacking), and any transparency
/// composited onto opaque white with PIL's integer `alpha_composite`, which is what
/// transformers 5.23's `convert_to_rgb` does to a PIL image before the torchvision backend sees
/// it (transformers' own path/URL loaders drop alpha instead; Qwen's `qwen_vl_utils` composites
/// onto white too). Pixels match Pillow exactly for every format; JPEG goes through
/// `libjpeg-turbo-rs`, a pure-Rust port of the libjpeg-turbo that Pillow links, run with
/// Pillow's settings. `origin` names the data in errors (a path, "upload #2", ...).
pub fn decode_image(bytes: &[u8], origin: &str) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            origin: origin.to_string(),
            format: "unknown".to_string(),
            detail: e.to_string(),
        })?;
    let Some(format) = reader.format() else {
        if looks_like_video(bytes) {
            return Err(ImageError::Video {
                origin: origin.to_string(),
            });
        }
        return Err(ImageError::UnknownFormat {
            origin: origin.to_string(),
        });
    };
    if format == image::ImageFormat::Jpeg {
        return decode_jpeg(bytes, origin);
    }
    let decode_err = |e: image::ImageError| match e {
        image::ImageError::Unsupported(_)
            if !matches!(
                format,
                image::ImageFormat::Png
                    | image::ImageFormat::Jpeg
                    | image::ImageFormat::WebP
                    | image::ImageFormat::Gif
            ) =>
        {
            ImageError::UnknownFormat {
                origin: origin.to_string(),
            }
        }
        image::ImageError::Limits(e) => ImageError::TooLarge {
            origin: origin.to_string(),
            detail: e.to_string(),
        },
        e => ImageError::Decode {
            origin: origin.to_string(),
            format: format!("{format:?}").to_uppercase(),
            detail: e.to_string(),
        },
    };
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    check_decode_size(width, height, origin)?;
    // A broken EXIF block is ignored, as PIL's exif_transpose does.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::EmptyImage {
            origin: origin.to_string(),
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(to_rgb_like_pil(img))
}

/// Refuses what Pillow refuses to open: an image without pixels, or one above its
/// decompression-bomb limit.
fn check_decode_size(width: u32, height: u32, origin: &str) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > MAX_DECODE_PIXELS {
        return Err(ImageError::TooLarge {
            origin: origin.to_string(),
            detail: format!(
                "{width}x{height} pixels, above the {MAX_DECODE_PIXELS} at which Pillow raises \
                 DecompressionBombError"
            ),
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::EmptyImage {
            origin: origin.to_string(),
            width,
            height,
        });
    }
    Ok(())
}

/// JPEG bytes -> upright RGB8, bit-exact with Pillow's `Image.open(f).convert("RGB")` (then
/// `exif_transpose`, as for the other formats).
///
/// Pillow decodes with libjpeg-turbo at its defaults: the integer "islow" IDCT, fancy
/// (triangle-filter) chroma upsampling, libjpeg's fixed-point YCbCr->RGB tables, and block
/// smoothing of progressive images whose scans leave low-frequency coefficients unrefined.
/// `libjpeg-turbo-rs`, a pure-Rust port of that library (so it builds for wasm32), runs the same
/// steps with the same settings; grey comes out replicated to RGB, and Adobe CMYK / YCCK as
/// Pillow's CMYK->RGB conversion gives it. As with Pillow, data that ends before the end-of-image
/// marker and sample precisions other than 8 bits are errors.
fn decode_jpeg(bytes: &[u8], origin: &str) -> Result<RgbImage, ImageError> {
    use libjpeg_turbo_rs::{Decoder, JpegError, PixelFormat};

    let decode_err = |detail: String| ImageError::Decode {
        origin: origin.to_string(),
        format: "JPEG".to_string(),
        detail,
    };
    let jpeg_err = |e: JpegError| match e {
        JpegError::LimitExceeded { .. } | JpegError::AllocationFailed { .. } => {
            ImageError::TooLarge {
                origin: origin.to_string(),
                detail: e.to_string(),
            }
        }
        e => decode_err(e.to_string()),
    };
    // Parses the headers up to the first scan; no pixels yet.
    let mut decoder = Decoder::new(bytes).map_err(jpeg_err)?;
    let frame = decoder.header();
    check_decode_size(u32::from(frame.width), u32::from(frame.height), origin)?;
    if frame.precision != 8 {
        return Err(decode_err(format!(
            "{}-bit samples; Pillow opens only 8-bit JPEG, so re-save the image with 8-bit samples",
            frame.precision
        )));
    }
    if !has_eoi_after_first_scan(bytes) {
        return Err(decode_err(
            "the data ends without an end-of-image marker (Pillow reports such a file as truncated)"
                .to_string(),
        ));
    }
    // A broken EXIF block is ignored, as PIL's exif_transpose does.
    let orientation = decoder
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    decoder.set_output_format(PixelFormat::Rgb);
    // libjpeg's default (`do_block_smoothing = TRUE`); it changes pixels only for progressive
    // files whose scans leave some of the first AC coefficients incomplete.
    decoder.set_block_smoothing(true);
    let out = decoder.decode_image().map_err(jpeg_err)?;
    let (width, height) = (out.width as u32, out.height as u32);
    let Some(rgb) = RgbImage::from_raw(width, height, out.data) else {
        return Err(decode_err(format!(
            "the decoder returned a pixel buffer that does not hold {width}x{height} RGB pixels"
        )));
    };
    let mut img = DynamicImage::ImageRgb8(rgb);
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Whether an end-of-image marker (FF D9) follows the first scan header. libjpeg, and so
/// Pillow, calls a stream that runs out before EOI truncated even when every scan is complete.
/// The header segments are walked by their lengths so that an EOI inside them (the end of an
/// EXIF thumbnail) does not count; entropy-coded data cannot hold FF D9.
fn has_eoi_after_first_scan(bytes: &[u8]) -> bool {
    let mut pos = 2; // past SOI
    loop {
        // Like libjpeg, skip stray bytes and 0xFF fill before a marker code.
        while bytes.get(pos).is_some_and(|&b| b != 0xFF) {
            pos += 1;
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return false;
        };
        pos += 1;
        match marker {
            0xDA => break,
            // Not a marker (stuffed zero), or one without a length field (TEM, RSTn, EOI).
            0x00 | 0x01 | 0xD0..=0xD9 => {}
            _ => {
                let Some(len) = bytes.get(pos..pos + 2) else {
                    return false;
                };
                pos += usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
        }
    }
    bytes
        .get(pos..)
        .is_some_and(|rest| rest.windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// Reads and decodes an image file (see [`decode_image`]).
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|err| ImageError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    decode_image(&bytes, &path.display().to_string())
}

/// DynamicImage -> RGB8 with PIL's conversions (see [`decode_image`]).
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let pixels: Vec<u8> = match img {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageLuma8(g) => g.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageRgba8(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| over_white(p[0], p[1], p[2], p[3]))
            .collect(),
        DynamicImage::ImageLumaA8(la) => la
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| over_white(p[0], p[0], p[0], p[1]))
            .collect(),
        DynamicImage::ImageRgb16(rgb) => rgb.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| {
                over_white(
                    (p[0] >> 8) as u8,
                    (p[1] >> 8) as u8,
                    (p[2] >> 8) as u8,
                    (p[3] >> 8) as u8,
                )
            })
            .collect(),
        DynamicImage::ImageLumaA16(la) => la
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let g = (p[0] >> 8) as u8;
                over_white(g, g, g, (p[1] >> 8) as u8)
            })
            .collect(),
        // Pillow opens 16-bit grey as mode "I;16" and its RGB conversion clips at 255.
        DynamicImage::ImageLuma16(g) => g
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let c = v.min(255) as u8;
                [c, c, c]
            })
            .collect(),
        other if other.color().has_alpha() => other
            .to_rgba8()
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| over_white(p[0], p[1], p[2], p[3]))
            .collect(),
        other => return other.to_rgb8(),
    };
    // [h, w, 3]: lengths match by construction.
    RgbImage::from_raw(w, h, pixels).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Pillow's `alpha_composite(white, rgba)` for one pixel (integer arithmetic, 7 extra bits).
fn over_white(r: u8, g: u8, b: u8, a: u8) -> [u8; 3] {
    if a == 0 {
        return [255; 3];
    }
    const PREC: u32 = 7;
    let (a, dst, dst_a) = (a as u32, 255u32, 255u32);
    let blend = dst_a * (255 - a);
    let out_a255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PREC) / out_a255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let div255 = |t: u32| ((t >> 8) + t) >> 8;
    let mix = |c: u8| (div255(c as u32 * coef1 + dst * coef2 + (0x80 << PREC)) >> PREC) as u8;
    [mix(r), mix(g), mix(b)]
}

/// Fixed-point filter taps for one axis: output `i` reads inputs `start[i] .. start[i] + len[i]`
/// with weights `weights[i * taps ..][.. len[i]]`, each scaled by `2^precision`.
struct AxisTaps {
    start: Vec<usize>,
    len: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
    precision: u32,
}

/// Keys cubic kernel with a = -0.5 (PyTorch's antialiased bicubic, Pillow's BICUBIC).
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// PyTorch's `_compute_index_ranges_int16_weights` for the antialiased cubic filter: f64 weights
/// over a support widened by the downscale factor, normalised per output, then rounded to int16
/// at the largest precision that keeps the biggest weight below 2^15.
fn axis_taps(in_size: usize, out_size: usize) -> AxisTaps {
    let scale = in_size as f64 / out_size as f64;
    // interp_size 4 -> support 2, widened by the scale when shrinking.
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let taps = support.ceil() as usize * 2 + 1;

    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut wf = vec![0f64; out_size * taps];
    let mut wt_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero like the C++ static_cast.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).clamp(0, taps as i64) as usize;
        let w = &mut wf[i * taps..(i + 1) * taps];
        let mut total = 0f64;
        for (j, wj) in w.iter_mut().enumerate().take(xsize) {
            *wj = keys_cubic(((j as i64 + xmin) as f64 - center + 0.5) * invscale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut().take(xsize) {
                *wj /= total;
                wt_max = wt_max.max(*wj);
            }
        }
        start.push(xmin as usize);
        len.push(xsize);
    }

    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wt_max * (1u64 << (precision + 1)) as f64) as i32;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let weights = wf
        .iter()
        .map(|&w| {
            let v = w * unit;
            // Round half away from zero, then store as int16 like the C++ code.
            (if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }) as i16 as i32
        })
        .collect();
    AxisTaps {
        start,
        len,
        taps,
        weights,
        precision,
    }
}

/// One fixed-point dot product, rounded and clamped to u8 as the SIMD kernel does
/// (`(acc + 2^(p-1)) >> p`, arithmetic shift, then saturate).
#[inline]
fn fixed_to_u8(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// torchvision `resize(img, [out_h, out_w], BICUBIC, antialias=True)` on a uint8 image, bit-exact
/// with PyTorch's CPU uint8 kernel: a horizontal pass into a u8 buffer, then a vertical pass, each
/// with int16 fixed-point weights. A side that keeps its size is not filtered at all.
/// `out_h` / `out_w` of 0 give an empty image.
pub fn resize_bicubic_u8(img: &RgbImage, out_h: usize, out_w: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if out_h == 0 || out_w == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    // [in_h, in_w, 3] -> [in_h, out_w, 3]
    let horizontal = if out_w == in_w {
        img.as_raw().clone()
    } else {
        let t = axis_taps(in_w, out_w);
        let half = 1i32 << t.precision >> 1;
        let src = img.as_raw();
        let mut dst = vec![0u8; in_h * out_w * 3];
        for (src_row, dst_row) in src
            .chunks_exact(in_w * 3)
            .zip(dst.chunks_exact_mut(out_w * 3))
        {
            for (x, out) in dst_row.chunks_exact_mut(3).enumerate() {
                let w = &t.weights[x * t.taps..x * t.taps + t.len[x]];
                let px = &src_row[t.start[x] * 3..(t.start[x] + t.len[x]) * 3];
                let mut acc = [half; 3];
                for (wj, p) in w.iter().zip(px.chunks_exact(3)) {
                    acc[0] += wj * p[0] as i32;
                    acc[1] += wj * p[1] as i32;
                    acc[2] += wj * p[2] as i32;
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = fixed_to_u8(a, t.precision);
                }
            }
        }
        dst
    };
    // [in_h, out_w, 3] -> [out_h, out_w, 3]
    let data = if out_h == in_h {
        horizontal
    } else {
        let t = axis_taps(in_h, out_h);
        let half = 1i32 << t.precision >> 1;
        let stride = out_w * 3;
        let mut dst = vec![0u8; out_h * stride];
        let mut acc = vec![0i32; stride];
        for (y, dst_row) in dst.chunks_exact_mut(stride).enumerate() {
            acc.fill(half);
            let w = &t.weights[y * t.taps..y * t.taps + t.len[y]];
            for (j, &wj) in w.iter().enumerate() {
                let row = &horizontal[(t.start[y] + j) * stride..][..stride];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += wj * p as i32;
                }
            }
            for (o, &a) in dst_row.iter_mut().zip(&acc) {
                *o = fixed_to_u8(a, t.precision);
            }
        }
        dst
    };
    // The buffer holds exactly out_h * out_w * 3 bytes by construction.
    RgbImage::from_raw(out_w as u32, out_h as u32, data)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// The vision tower's input for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// `[rows, cols]` row-major f32.
    pub data: Vec<f32>,
    /// Patches, ordered by merge block: (block row, block col, row in block, col in block).
    pub rows: usize,
    /// `C * T * P * P` (channel, temporal copy, patch row, patch col).
    pub cols: usize,
    /// `[t, h, w]` in patches (t = 1 for an image).
    pub grid_thw: [usize; 3],
    /// Size after smart_resize, in pixels (height, width).
    pub resized_hw: (usize, usize),
}

/// Resizes, normalises and patchifies one image exactly like `Qwen2VLImageProcessor`.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<PixelValues, ImageError> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    if !cfg.do_resize {
        return normalize_and_patchify(img, cfg);
    }
    let (rh, rw) = smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    if (rh, rw) == (h, w) {
        // torchvision returns the input untouched when the size does not change.
        normalize_and_patchify(img, cfg)
    } else {
        normalize_and_patchify(&resize_bicubic_u8(img, rh, rw), cfg)
    }
}

/// The second half of [`preprocess`] for an image already at its final size (both sides
/// multiples of `patch_size * merge_size`): per-channel normalisation in f32, then patch rows.
pub fn normalize_and_patchify(
    img: &RgbImage,
    cfg: &PreprocessConfig,
) -> Result<PixelValues, ImageError> {
    let (rh, rw) = (img.height() as usize, img.width() as usize);
    let factor = cfg.factor();
    if factor == 0 || rh == 0 || rw == 0 || rh % factor != 0 || rw % factor != 0 {
        return Err(ImageError::InvalidSize {
            height: rh,
            width: rw,
            problem: format!(
                "patchify needs both sides to be positive multiples of patch_size * merge_size = {factor}; \
                 enable do_resize in preprocessor_config.json or crop the image"
            ),
        });
    }
    let lut = cfg.value_table();
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    let rows = gh * gw;
    let cols = 3 * t * p * p;
    let pixels = img.as_raw(); // [rh, rw, 3]
    let mut data = vec![0f32; rows * cols]; // [rows, cols]

    // Row order (block row, block col, row in block, col in block) = the processor's permute.
    let blocks = (0..gh / m).flat_map(|by| (0..gw / m).map(move |bx| (by, bx)));
    let patches =
        blocks.flat_map(|(by, bx)| (0..m * m).map(move |k| (by * m + k / m, bx * m + k % m)));
    for (row, (gy, gx)) in data.chunks_exact_mut(cols).zip(patches) {
        let (y0, x0) = (gy * p, gx * p);
        // row: [3, t, p, p]; the t copies of a channel are identical.
        for (c, chan) in row.chunks_exact_mut(t * p * p).enumerate() {
            let (first, rest) = chan.split_at_mut(p * p);
            for (py, line) in first.chunks_exact_mut(p).enumerate() {
                let base = ((y0 + py) * rw + x0) * 3 + c;
                for (px, v) in line.iter_mut().enumerate() {
                    *v = lut[c][pixels[base + px * 3] as usize];
                }
            }
            for copy in rest.chunks_exact_mut(p * p) {
                copy.copy_from_slice(first);
            }
        }
    }
    Ok(PixelValues {
        data,
        rows,
        cols,
        grid_thw: [1, gh, gw],
        resized_hw: (rh, rw),
    })
}
