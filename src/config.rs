//! Hugging Face `config.json` -> [`ModelConfig`].
//!
//! Two layouts exist in the wild and both are read here:
//! - hub (Qwen2-VL / Qwen2.5-VL as shipped): text fields at the top level, `rope_scaling`
//!   (`{"type": "mrope", "mrope_section": [..]}`) and `rope_theta`;
//! - transformers >= 5 (and the Qwen3-VL hub files): text fields under `text_config`, rope
//!   settings in `rope_parameters` or `rope_scaling` there.
//!
//! Vision fields differ per family: Qwen2-VL calls the tower width `embed_dim` and the merger
//! output `hidden_size`; Qwen2.5-VL and Qwen3-VL call the width `hidden_size` and the merger output
//! `out_hidden_size`.

use std::path::Path;

use serde_json::{Map, Value};

/// The model families this runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Family {
    /// Qwen2-VL (`qwen2_vl`).
    #[serde(rename = "qwen2_vl")]
    Qwen2Vl,
    /// Qwen2.5-VL (`qwen2_5_vl`).
    #[serde(rename = "qwen2_5_vl")]
    Qwen25Vl,
    /// Qwen3-VL dense (`qwen3_vl`).
    #[serde(rename = "qwen3_vl")]
    Qwen3Vl,
}

impl Family {
    /// The `model_type` string of the family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen2Vl => "qwen2_vl",
            Family::Qwen25Vl => "qwen2_5_vl",
            Family::Qwen3Vl => "qwen3_vl",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Errors reading or validating `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source} (a checkpoint folder must contain config.json)")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A field is missing or has the wrong type.
    #[error("{path}: field `{field}` {problem}")]
    Field {
        /// The file.
        path: String,
        /// The field, dotted.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The checkpoint is of a family or variant this runtime does not implement.
    #[error("{path}: {message}")]
    Unsupported {
        /// The file.
        path: String,
        /// What is unsupported.
        message: String,
    },
}

/// The language model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Residual width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// How many rotary frequencies use the t, h and w position (sums to head_dim / 2).
    pub mrope_section: [usize; 3],
    /// Qwen3-VL interleaves the t/h/w frequencies instead of using contiguous sections.
    pub mrope_interleaved: bool,
    /// Rows of the embedding table and of the lm_head.
    pub vocab_size: usize,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding table (no `lm_head.weight` in the files).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2/2.5-VL).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3-VL).
    pub qk_norm: bool,
}

/// The vision tower's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Number of transformer blocks.
    pub depth: usize,
    /// Tower width.
    pub width: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Merger output width (= the LM hidden size).
    pub out_hidden_size: usize,
    /// Spatial patch side in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Patches merged per side by the merger (2 -> 2x2 patches per LM token).
    pub spatial_merge_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Qwen2.5-VL: window side in pixels (0 when the family has no window attention).
    pub window_size: usize,
    /// Qwen2.5-VL: blocks that attend over the whole image instead of a window.
    pub fullatt_block_indexes: Vec<usize>,
    /// Qwen3-VL: entries of the learned position table (a square grid).
    pub num_position_embeddings: usize,
    /// Qwen3-VL: blocks whose output feeds a deepstack merger.
    pub deepstack_visual_indexes: Vec<usize>,
}

impl VisionConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.width / self.num_heads
    }
}

/// Everything the runtime needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family.
    pub family: Family,
    /// Language model.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>` id.
    pub image_token_id: u32,
    /// `<|video_pad|>` id.
    pub video_token_id: u32,
    /// `<|vision_start|>` id.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>` id.
    pub vision_end_token_id: u32,
    /// Eos ids named by config.json (generation_config.json takes precedence, see tokenizer).
    pub eos_token_ids: Vec<u32>,
    /// `quantization_config` of a checkpoint written by `qwen-vl quantize`.
    pub quant: Option<crate::quant::QuantConfig>,
}

/// A view of a JSON object that reports missing or mistyped fields with their dotted path.
struct Fields<'a> {
    path: &'a str,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_string(),
            field: format!("{}{}", self.prefix, key),
            problem: problem.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("must be a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "is missing; it is required for this model family"))
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(self.err(key, "must be greater than zero"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a number, found {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be true or false, found {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }

    fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        self.err(key, format!("must be a list of integers, found {v}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("must be a list of integers, found {v}"))),
        }
    }

    /// Token ids may be an int or a list of ints (eos).
    fn id_list(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|id| vec![id as u32])
                .ok_or_else(|| self.err(key, "must be a token id")),
            Some(_) => Ok(self
                .usize_list(key)?
                .unwrap_or_default()
                .into_iter()
                .map(|id| id as u32)
                .collect()),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                path: self.path,
                prefix: format!("{}{}.", self.prefix, key),
                map,
            })),
            Some(v) => Err(self.err(key, format!("must be an object, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_string(),
            source,
        })?;
        let Value::Object(map) = &value else {
            return Err(ConfigError::Field {
                path: path.to_string(),
                field: "(root)".into(),
                problem: "must be a JSON object".into(),
            });
        };
        let root = Fields {
            path,
            prefix: String::new(),
            map,
        };
        let family = detect_family(&root)?;
        // transformers >= 5 and Qwen3-VL keep the text fields under `text_config`.
        let text_fields = root.object("text_config")?.unwrap_or(Fields {
            path,
            prefix: String::new(),
            map,
        });
        let text = parse_text(family, &root, &text_fields)?;
        let vision_fields = root.object("vision_config")?.ok_or_else(|| {
            root.err(
                "vision_config",
                "is missing; a Qwen-VL config.json describes its vision tower there",
            )
        })?;
        let vision = parse_vision(family, &vision_fields, &text)?;

        let id = |key: &str, default: u32| -> Result<u32, ConfigError> {
            Ok(root
                .usize_opt(key)?
                .or(text_fields.usize_opt(key)?)
                .map(|v| v as u32)
                .unwrap_or(default))
        };
        let mut eos_token_ids = root.id_list("eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = text_fields.id_list("eos_token_id")?;
        }
        Ok(ModelConfig {
            family,
            text,
            vision,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
            eos_token_ids,
            quant: match map.get("quantization_config") {
                None | Some(Value::Null) => None,
                Some(v) => Some(crate::quant::QuantConfig::from_json(v).map_err(
                    |(field, problem)| ConfigError::Field {
                        path: path.to_string(),
                        field,
                        problem,
                    },
                )?),
            },
        })
    }
}

fn detect_family(root: &Fields) -> Result<Family, ConfigError> {
    let model_type = root.str_opt("model_type");
    let architectures: Vec<&str> = root
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let unsupported = |message: String| ConfigError::Unsupported {
        path: root.path.to_string(),
        message,
    };
    if model_type.is_some_and(|t| t.contains("moe"))
        || architectures.iter().any(|a| a.contains("Moe"))
    {
        return Err(unsupported(format!(
            "model_type `{}` is a mixture-of-experts Qwen-VL; only the dense Qwen2-VL, Qwen2.5-VL and Qwen3-VL models are supported",
            model_type.unwrap_or("?")
        )));
    }
    let from_type = match model_type {
        Some("qwen2_vl") => Some(Family::Qwen2Vl),
        Some("qwen2_5_vl") => Some(Family::Qwen25Vl),
        Some("qwen3_vl") => Some(Family::Qwen3Vl),
        Some(other) => {
            return Err(unsupported(format!(
                "model_type `{other}` is not a supported Qwen-VL family (expected qwen2_vl, qwen2_5_vl or qwen3_vl)"
            )))
        }
        None => None,
    };
    let from_arch = architectures.iter().find_map(|a| match *a {
        "Qwen2VLForConditionalGeneration" => Some(Family::Qwen2Vl),
        "Qwen2_5_VLForConditionalGeneration" => Some(Family::Qwen25Vl),
        "Qwen3VLForConditionalGeneration" => Some(Family::Qwen3Vl),
        _ => None,
    });
    match (from_type, from_arch) {
        (Some(t), Some(a)) if t != a => Err(unsupported(format!(
            "model_type `{t}` contradicts architectures {architectures:?}; fix one of them"
        ))),
        (Some(t), _) => Ok(t),
        (None, Some(a)) => Ok(a),
        (None, None) => Err(root.err(
            "model_type",
            "is missing and `architectures` names no supported Qwen-VL model",
        )),
    }
}

/// Rope settings live in `rope_scaling` (hub) or `rope_parameters` (transformers 5), in the text
/// fields or at the top level; `rope_theta` sits beside them or inside `rope_parameters`.
fn parse_text(family: Family, root: &Fields, t: &Fields) -> Result<TextConfig, ConfigError> {
    let hidden_size = t.positive("hidden_size")?;
    let num_heads = t.positive("num_attention_heads")?;
    let num_kv_heads = t.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(t.err(
            "num_key_value_heads",
            format!("({num_kv_heads}) must divide num_attention_heads ({num_heads})"),
        ));
    }
    let head_dim = match (family, t.usize_opt("head_dim")?) {
        (_, Some(d)) if d > 0 => d,
        (Family::Qwen3Vl, _) => return Err(t.err("head_dim", "is required for Qwen3-VL")),
        _ => {
            if hidden_size % num_heads != 0 {
                return Err(t.err(
                    "hidden_size",
                    format!(
                        "({hidden_size}) must be divisible by num_attention_heads ({num_heads})"
                    ),
                ));
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(t.err(
            "head_dim",
            format!("({head_dim}) must be even for rotary embeddings"),
        ));
    }

    let rope = match t.object("rope_parameters")? {
        Some(r) => Some(r),
        None => match t.object("rope_scaling")? {
            Some(r) => Some(r),
            None => match root.object("rope_parameters")? {
                Some(r) => Some(r),
                None => root.object("rope_scaling")?,
            },
        },
    };
    let rope = rope.ok_or_else(|| {
        t.err(
            "rope_scaling",
            "is missing; Qwen-VL needs {\"mrope_section\": [t, h, w]} in rope_scaling or rope_parameters",
        )
    })?;
    if let Some(kind) = rope.str_opt("type").or(rope.str_opt("rope_type")) {
        if !matches!(kind, "mrope" | "default") {
            return Err(rope.err(
                if rope.get("type").is_some() { "type" } else { "rope_type" },
                format!("`{kind}` is not supported (expected mrope/default); RoPE scaling variants like yarn are not implemented"),
            ));
        }
    }
    let section = rope.usize_list("mrope_section")?.ok_or_else(|| {
        rope.err(
            "mrope_section",
            "is missing; expected three integers [t, h, w]",
        )
    })?;
    let mrope_section: [usize; 3] = section.as_slice().try_into().map_err(|_| {
        rope.err(
            "mrope_section",
            format!("must have 3 entries, found {}", section.len()),
        )
    })?;
    if mrope_section.iter().sum::<usize>() != head_dim / 2 {
        return Err(rope.err(
            "mrope_section",
            format!(
                "{mrope_section:?} sums to {}, but head_dim / 2 is {}",
                mrope_section.iter().sum::<usize>(),
                head_dim / 2
            ),
        ));
    }
    let rope_theta = rope
        .f64_opt("rope_theta")?
        .or(t.f64_opt("rope_theta")?)
        .or(root.f64_opt("rope_theta")?)
        .unwrap_or(match family {
            Family::Qwen3Vl => 5_000_000.0,
            _ => 1_000_000.0,
        });
    // transformers 5.23 interleaves for Qwen3-VL whatever the flag says (see goldens README).
    let mrope_interleaved = family == Family::Qwen3Vl;

    let tie_word_embeddings = root
        .bool_opt("tie_word_embeddings")?
        .or(t.bool_opt("tie_word_embeddings")?)
        .unwrap_or(false);
    let qkv_bias = match family {
        Family::Qwen3Vl => t.bool_opt("attention_bias")?.unwrap_or(false),
        _ => true,
    };
    Ok(TextConfig {
        hidden_size,
        intermediate_size: t.positive("intermediate_size")?,
        num_layers: t.positive("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: t.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        mrope_section,
        mrope_interleaved,
        vocab_size: t.positive("vocab_size")?,
        max_position_embeddings: t.usize_opt("max_position_embeddings")?.unwrap_or(32768),
        tie_word_embeddings,
        qkv_bias,
        qk_norm: family == Family::Qwen3Vl,
    })
}

fn parse_vision(
    family: Family,
    v: &Fields,
    text: &TextConfig,
) -> Result<VisionConfig, ConfigError> {
    let (width, out_hidden_size, intermediate_size) = match family {
        Family::Qwen2Vl => {
            let width = v.positive("embed_dim")?;
            let ratio = v.f64_opt("mlp_ratio")?.unwrap_or(4.0);
            let out = v.usize_opt("hidden_size")?.unwrap_or(text.hidden_size);
            (width, out, (width as f64 * ratio) as usize)
        }
        Family::Qwen25Vl | Family::Qwen3Vl => {
            let width = v.positive("hidden_size")?;
            let out = v.usize_opt("out_hidden_size")?.unwrap_or(text.hidden_size);
            (width, out, v.positive("intermediate_size")?)
        }
    };
    if out_hidden_size != text.hidden_size {
        let key = if family == Family::Qwen2Vl {
            "hidden_size"
        } else {
            "out_hidden_size"
        };
        return Err(v.err(
            key,
            format!(
                "({out_hidden_size}) must equal the language model's hidden_size ({})",
                text.hidden_size
            ),
        ));
    }
    let num_heads = v.positive("num_heads")?;
    if width % num_heads != 0 || (width / num_heads) % 4 != 0 {
        return Err(v.err(
            "num_heads",
            format!(
                "({num_heads}) must divide the tower width ({width}) into heads of a multiple of 4"
            ),
        ));
    }
    let default_patch = if family == Family::Qwen3Vl { 16 } else { 14 };
    let patch_size = v
        .usize_opt("patch_size")?
        .or(v.usize_opt("spatial_patch_size")?)
        .unwrap_or(default_patch);
    let in_channels = v
        .usize_opt("in_channels")?
        .or(v.usize_opt("in_chans")?)
        .unwrap_or(3);
    if in_channels != 3 {
        return Err(v.err(
            "in_channels",
            format!("is {in_channels}; only RGB (3) is supported"),
        ));
    }
    let spatial_merge_size = v.usize_opt("spatial_merge_size")?.unwrap_or(2);
    let temporal_patch_size = v.usize_opt("temporal_patch_size")?.unwrap_or(2);
    if spatial_merge_size == 0 || temporal_patch_size == 0 || patch_size == 0 {
        return Err(v.err(
            "patch_size",
            "patch_size, spatial_merge_size and temporal_patch_size must be positive",
        ));
    }
    let depth = v.positive("depth")?;
    let mut cfg = VisionConfig {
        depth,
        width,
        num_heads,
        intermediate_size,
        out_hidden_size,
        patch_size,
        temporal_patch_size,
        spatial_merge_size,
        in_channels,
        window_size: 0,
        fullatt_block_indexes: Vec::new(),
        num_position_embeddings: 0,
        deepstack_visual_indexes: Vec::new(),
    };
    match family {
        Family::Qwen2Vl => {}
        Family::Qwen25Vl => {
            cfg.window_size = v.positive("window_size")?;
            let unit = patch_size * spatial_merge_size;
            if !cfg.window_size.is_multiple_of(unit) {
                return Err(v.err(
                    "window_size",
                    format!(
                        "({}) must be a multiple of patch_size * spatial_merge_size ({unit})",
                        cfg.window_size
                    ),
                ));
            }
            cfg.fullatt_block_indexes = v.usize_list("fullatt_block_indexes")?.unwrap_or_default();
            if let Some(bad) = cfg.fullatt_block_indexes.iter().find(|&&i| i >= depth) {
                return Err(v.err(
                    "fullatt_block_indexes",
                    format!("names block {bad}, but depth is {depth}"),
                ));
            }
        }
        Family::Qwen3Vl => {
            cfg.num_position_embeddings = v.positive("num_position_embeddings")?;
            let side = (cfg.num_position_embeddings as f64).sqrt().round() as usize;
            if side * side != cfg.num_position_embeddings {
                return Err(v.err(
                    "num_position_embeddings",
                    format!("({}) must be a perfect square", cfg.num_position_embeddings),
                ));
            }
            cfg.deepstack_visual_indexes = v
                .usize_list("deepstack_visual_indexes")?
                .unwrap_or_default();
            if let Some(bad) = cfg.deepstack_visual_indexes.iter().find(|&&i| i >= depth) {
                return Err(v.err(
                    "deepstack_visual_indexes",
                    format!("names block {bad}, but depth is {depth}"),
                ));
            }
            if cfg.deepstack_visual_indexes.len() > text.num_layers {
                return Err(v.err(
                    "deepstack_visual_indexes",
                    format!(
                        "has {} taps but the language model only has {} layers",
                        cfg.deepstack_visual_indexes.len(),
                        text.num_layers
                    ),
                ));
            }
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_QWEN2: &str = r#"{
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 32768,
        "eos_token_id": 151645,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
            "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2}
    }"#;

    #[test]
    fn hub_qwen2_vl_2b_config_parses() {
        let c = ModelConfig::from_json_str(HUB_QWEN2, "config.json").unwrap();
        assert_eq!(c.family, Family::Qwen2Vl);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.mrope_section, [16, 24, 24]);
        assert_eq!(c.vision.width, 1280);
        assert_eq!(c.vision.intermediate_size, 5120);
        assert_eq!(c.vision.out_hidden_size, 1536);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
    }

    #[test]
    fn bad_mrope_section_names_the_field() {
        let bad = HUB_QWEN2.replace("[16, 24, 24]", "[16, 24, 20]");
        let e = ModelConfig::from_json_str(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling.mrope_section"), "{e}");
    }

    #[test]
    fn moe_and_foreign_models_are_rejected_clearly() {
        let moe = HUB_QWEN2.replace("\"qwen2_vl\"", "\"qwen3_vl_moe\"");
        let e = ModelConfig::from_json_str(&moe, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mixture-of-experts"), "{e}");
        let llama = HUB_QWEN2
            .replace("\"qwen2_vl\"", "\"llama\"")
            .replace("Qwen2VLForConditionalGeneration", "LlamaForCausalLM");
        let e = ModelConfig::from_json_str(&llama, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`llama` is not a supported"), "{e}");
    }

    #[test]
    fn gqa_mismatch_is_rejected() {
        let bad = HUB_QWEN2.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 5");
        let e = ModelConfig::from_json_str(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
