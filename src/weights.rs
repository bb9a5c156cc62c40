//! Safetensors checkpoints: a single `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, memory-mapped on native targets and held in memory on the web.
//!
//! Tensor names are canonicalised so one loader serves both layouts:
//! hub `model.layers.*` / `model.embed_tokens` / `model.norm` and transformers-5
//! `model.language_model.*` become `lm.*`; `visual.*` and `model.visual.*` become `visual.*`;
//! `lm_head.weight` stays. bf16 / f16 / f32 on disk are converted to the runtime dtype at load.

use std::collections::HashMap;

use burn::tensor::{DType, Device, Tensor, TensorData};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

/// Errors reading a checkpoint's weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No weights file in the folder.
    #[error("{dir} has no model.safetensors or model.safetensors.index.json; point --model at a Hugging Face checkpoint folder")]
    NoWeights {
        /// The folder.
        dir: String,
    },
    /// The shard index is malformed.
    #[error("{path} is not a valid safetensors index: {message}")]
    BadIndex {
        /// The index file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("{path} is not a valid safetensors file ({message}); it may be truncated or corrupt, download it again")]
    Corrupt {
        /// The file.
        path: String,
        /// What safetensors reported.
        message: String,
    },
    /// A tensor the model needs is absent.
    #[error("tensor `{name}` is missing from the checkpoint in {dir} (looked for it under the hub and transformers-5 names); the folder does not match its config.json")]
    Missing {
        /// Canonical name.
        name: String,
        /// The folder.
        dir: String,
    },
    /// A tensor has another shape than config.json implies.
    #[error("tensor `{name}` in {file} has shape {found:?}, but config.json implies {expected:?}")]
    Shape {
        /// Name as stored.
        name: String,
        /// The file holding it.
        file: String,
        /// Stored shape.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A packed (quantized) tensor does not match the layout its config.json names.
    #[error("tensor `{name}` in {file}: {message}; the quantized checkpoint is corrupt or was written by another tool: quantize the original checkpoint again with `qwen-vl quantize`")]
    Packed {
        /// Name as stored.
        name: String,
        /// The file holding it.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A weight could not be quantized.
    #[error("tensor `{name}` in {file}: {source}")]
    Quantize {
        /// Name as stored.
        name: String,
        /// The file holding it.
        file: String,
        /// The cause.
        source: crate::quant::QuantError,
    },
    /// A tensor has a dtype this loader does not convert.
    #[error(
        "tensor `{name}` in {file} has dtype {dtype}; only BF16, F16 and F32 weights are supported"
    )]
    Dtype {
        /// Name as stored.
        name: String,
        /// The file holding it.
        file: String,
        /// The dtype found.
        dtype: String,
    },
}

/// The bytes of one safetensors file.
enum Blob {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Blob::Mapped(m) => m,
            Blob::Owned(v) => v,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    stored_name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the file.
    start: usize,
    end: usize,
}

/// One tensor as a checkpoint stores it.
pub struct StoredTensor<'a> {
    /// Canonical name (see [`canonical_name`]).
    pub canonical: &'a str,
    /// Name in the file.
    pub stored: &'a str,
    /// Stored dtype.
    pub dtype: StDtype,
    /// Stored shape.
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub bytes: &'a [u8],
}

/// An opened checkpoint: file bytes plus a name -> location table, or (for benchmarks of real
/// model shapes without downloads) a seeded generator of random weights of any requested shape.
pub struct Checkpoint {
    source: String,
    files: Vec<(String, Blob)>,
    entries: HashMap<String, Entry>,
    synthetic: Option<u64>,
}

/// Maps a stored tensor name to the canonical one used by the model code.
pub fn canonical_name(stored: &str) -> String {
    if let Some(rest) = stored.strip_prefix("model.language_model.") {
        format!("lm.{rest}")
    } else if let Some(rest) = stored.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if stored.starts_with("visual.") || stored.starts_with("lm_head.") {
        stored.to_string()
    } else if let Some(rest) = stored.strip_prefix("model.") {
        format!("lm.{rest}")
    } else {
        stored.to_string()
    }
}

impl Checkpoint {
    /// Opens the safetensors files of a checkpoint folder (memory-mapped).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_dir(dir: &std::path::Path) -> Result<Self, WeightsError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<String> = if index.exists() {
            shard_names(
                &std::fs::read(&index).map_err(|source| WeightsError::Io {
                    path: index.display().to_string(),
                    source,
                })?,
                &index.display().to_string(),
            )?
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            // Some exports use other names (e.g. `model-00001-of-00001.safetensors` without an
            // index): take every .safetensors file in the folder.
            let mut found: Vec<String> = std::fs::read_dir(dir)
                .map_err(|source| WeightsError::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors") && !n.starts_with("golden"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(WeightsError::NoWeights {
                    dir: dir.display().to_string(),
                });
            }
            found
        };
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path: std::path::PathBuf = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|source| WeightsError::Io {
                path: path.display().to_string(),
                source,
            })?;
            // SAFETY: the map is read-only and the file is not modified while the checkpoint is
            // open (a concurrent writer would be a user error, as with any mmap-based loader).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightsError::Io {
                path: path.display().to_string(),
                source,
            })?;
            files.push((path.display().to_string(), Blob::Mapped(map)));
        }
        Self::index(dir.display().to_string(), files)
    }

    /// Builds a checkpoint from file contents already in memory (the web build).
    pub fn from_buffers(
        source: &str,
        buffers: Vec<(String, Vec<u8>)>,
    ) -> Result<Self, WeightsError> {
        let files = buffers
            .into_iter()
            .map(|(name, bytes)| (name, Blob::Owned(bytes)))
            .collect();
        Self::index(source.to_string(), files)
    }

    fn index(source: String, files: Vec<(String, Blob)>) -> Result<Self, WeightsError> {
        let mut entries = HashMap::new();
        for (i, (path, blob)) in files.iter().enumerate() {
            let st = SafeTensors::deserialize(blob).map_err(|e| WeightsError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let base = blob.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                entries.insert(
                    canonical_name(&name),
                    Entry {
                        file: i,
                        stored_name: name.clone(),
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
        }
        Ok(Checkpoint {
            source,
            files,
            entries,
            synthetic: None,
        })
    }

    /// Random weights of whatever shape is asked for, deterministic in `seed`: norms 1, biases
    /// small, matrices uniform with variance 1 / fan_in. For benchmarks only.
    pub fn synthetic(seed: u64) -> Self {
        Checkpoint {
            source: format!("synthetic weights (seed {seed})"),
            files: Vec::new(),
            entries: HashMap::new(),
            synthetic: Some(seed),
        }
    }

    /// Whether a canonical tensor name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.synthetic.is_some() || self.entries.contains_key(name)
    }

    /// Total bytes of all tensors (for progress reporting).
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    /// Bytes of one tensor as stored.
    pub fn stored_bytes(&self, name: &str) -> usize {
        self.entries.get(name).map(|e| e.end - e.start).unwrap_or(0)
    }

    fn entry(&self, name: &str, expected: &[usize]) -> Result<&Entry, WeightsError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
                dir: self.source.clone(),
            })?;
        if e.shape != expected {
            return Err(WeightsError::Shape {
                name: e.stored_name.clone(),
                file: self.files[e.file].0.clone(),
                found: e.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(e)
    }

    /// Checks presence and shape without reading the data.
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<(), WeightsError> {
        if self.synthetic.is_some() {
            return Ok(());
        }
        self.entry(name, expected).map(|_| ())
    }

    /// Converts rows `[row_start, row_end)` of a tensor (first dimension) to f32 on the host.
    pub fn rows_f32(
        &self,
        name: &str,
        expected: &[usize],
        row_start: usize,
        row_end: usize,
    ) -> Result<Vec<f32>, WeightsError> {
        if let Some(seed) = self.synthetic {
            return Ok(synthetic_rows(seed, name, expected, row_start, row_end));
        }
        let e = self.entry(name, expected)?;
        let row: usize = e.shape.iter().skip(1).product();
        let elem = dtype_size(e).ok_or_else(|| self.dtype_error(e))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let bytes = &bytes[row_start * row * elem..row_end * row * elem];
        self.decode(e, bytes)
    }

    /// The whole tensor as f32 on the host.
    pub fn to_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let rows = expected.first().copied().unwrap_or(1);
        if expected.is_empty() && self.synthetic.is_none() {
            let e = self.entry(name, expected)?;
            return self.decode(e, &self.files[e.file].1[e.start..e.end]);
        }
        self.rows_f32(name, expected, 0, rows)
    }

    fn dtype_error(&self, e: &Entry) -> WeightsError {
        WeightsError::Dtype {
            name: e.stored_name.clone(),
            file: self.files[e.file].0.clone(),
            dtype: format!("{:?}", e.dtype),
        }
    }

    fn decode(&self, e: &Entry, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
        // Byte-wise decoding: the data of a safetensors tensor need not be aligned.
        Ok(match e.dtype {
            StDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            _ => return Err(self.dtype_error(e)),
        })
    }

    /// Every stored tensor, in file order then offset order.
    pub fn stored_tensors(&self) -> Vec<StoredTensor<'_>> {
        let mut v: Vec<(&String, &Entry)> = self.entries.iter().collect();
        v.sort_by_key(|(_, e)| (e.file, e.start));
        v.into_iter()
            .map(|(canonical, e)| StoredTensor {
                canonical,
                stored: &e.stored_name,
                dtype: e.dtype,
                shape: &e.shape,
                bytes: &self.files[e.file].1[e.start..e.end],
            })
            .collect()
    }

    /// Where a tensor is stored, for messages: `(stored name, file)`.
    pub fn describe(&self, name: &str) -> (String, String) {
        match self.entries.get(name) {
            Some(e) => (e.stored_name.clone(), self.files[e.file].0.clone()),
            None => (name.to_string(), self.source.clone()),
        }
    }

    /// Whether the matrix `{prefix}.weight` is stored packed (`{prefix}.qweight` and
    /// `{prefix}.scales`, see [`crate::quant`]).
    pub fn is_packed(&self, prefix: &str) -> bool {
        self.synthetic.is_none() && self.entries.contains_key(&format!("{prefix}.qweight"))
    }

    /// Rows `[start, end)` of the packed matrix `{prefix}` (`[rows, cols]` before packing),
    /// checking dtypes and shapes against `scheme`.
    pub fn packed_rows(
        &self,
        prefix: &str,
        scheme: crate::quant::Scheme,
        [rows, cols]: [usize; 2],
        start: usize,
        end: usize,
    ) -> Result<crate::quant::Packed, WeightsError> {
        let groups = crate::quant::groups_per_row(cols);
        let wpr = scheme.words_per_row(cols);
        let read = |suffix: &str, want: StDtype, width: usize| -> Result<&[u8], WeightsError> {
            let name = format!("{prefix}.{suffix}");
            let e = self
                .entries
                .get(&name)
                .ok_or_else(|| WeightsError::Missing {
                    name: name.clone(),
                    dir: self.source.clone(),
                })?;
            let bad = |message: String| WeightsError::Packed {
                name: e.stored_name.clone(),
                file: self.files[e.file].0.clone(),
                message,
            };
            if e.dtype != want {
                return Err(bad(format!(
                    "has dtype {:?} where {scheme} stores {want:?}",
                    e.dtype
                )));
            }
            if e.shape != [rows, width] {
                return Err(bad(format!(
                    "has shape {:?}, but {scheme} of a [{rows}, {cols}] weight (config.json) is [{rows}, {width}]",
                    e.shape
                )));
            }
            let elem = if want == StDtype::U32 { 4 } else { 2 };
            let bytes = &self.files[e.file].1[e.start..e.end];
            if bytes.len() != rows * width * elem {
                return Err(bad(format!(
                    "holds {} bytes where its shape needs {}",
                    bytes.len(),
                    rows * width * elem
                )));
            }
            Ok(&bytes[start * width * elem..end * width * elem])
        };
        let words = read("qweight", StDtype::U32, wpr)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let scales = read("scales", StDtype::F16, groups)?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(crate::quant::Packed {
            scheme,
            rows: end - start,
            cols,
            words,
            scales,
        })
    }

    /// Loads a tensor onto `device` as `dtype` after checking its shape.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<D>, WeightsError> {
        let data = self.to_f32(name, &shape)?;
        Ok(upload(data, shape, device, dtype))
    }

    /// Loads rows `[start, end)` of a 2-D tensor onto `device` (for tables split across bindings).
    pub fn rows_tensor(
        &self,
        name: &str,
        shape: [usize; 2],
        start: usize,
        end: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<2>, WeightsError> {
        let data = self.rows_f32(name, &shape, start, end)?;
        Ok(upload(data, [end - start, shape[1]], device, dtype))
    }
}

/// Uploads host f32 data as a tensor of `dtype`.
pub fn upload<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    let data = match dtype {
        DType::F16 => TensorData::new(
            data.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        _ => TensorData::new(data, shape),
    };
    Tensor::from_data(data, (device, dtype))
}

/// Deterministic random values for rows `[a, b)` of a synthetic tensor.
fn synthetic_rows(seed: u64, name: &str, shape: &[usize], a: usize, b: usize) -> Vec<f32> {
    let row: usize = shape.iter().skip(1).product::<usize>().max(1);
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for byte in name.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let is_norm = shape.len() == 1 && name.ends_with(".weight");
    let is_bias = shape.len() == 1 && !is_norm;
    // Uniform in [-r, r] has variance r^2 / 3.
    let r = if is_bias {
        0.02
    } else {
        (3.0 / row as f32).sqrt()
    };
    (a * row..b * row)
        .map(|i| {
            // splitmix64 of (tensor, index)
            let mut z = h.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if is_norm {
                1.0 + 0.05 * u
            } else {
                r * u
            }
        })
        .collect()
}

fn dtype_size(e: &Entry) -> Option<usize> {
    match e.dtype {
        StDtype::BF16 | StDtype::F16 => Some(2),
        StDtype::F32 => Some(4),
        _ => None,
    }
}

/// The distinct shard files named by an index, in first-seen order.
#[cfg(not(target_arch = "wasm32"))]
fn shard_names(bytes: &[u8], path: &str) -> Result<Vec<String>, WeightsError> {
    let bad = |message: String| WeightsError::BadIndex {
        path: path.to_string(),
        message,
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            bad(format!(
                "weight_map entry for `{tensor}` is not a file name"
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(bad(format!(
                "shard name `{file}` must be a plain file name in the folder"
            )));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn both_layouts_map_to_one_name() {
        assert_eq!(
            canonical_name("model.layers.3.mlp.up_proj.weight"),
            "lm.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_name("model.language_model.layers.3.mlp.up_proj.weight"),
            "lm.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_name("visual.blocks.0.attn.qkv.weight"),
            "visual.blocks.0.attn.qkv.weight"
        );
        assert_eq!(
            canonical_name("model.visual.blocks.0.attn.qkv.weight"),
            "visual.blocks.0.attn.qkv.weight"
        );
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(
            canonical_name("model.embed_tokens.weight"),
            "lm.embed_tokens.weight"
        );
    }
}
