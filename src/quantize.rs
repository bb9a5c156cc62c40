//! `qwen-vl quantize`: writes a quantized copy of a checkpoint folder, an ordinary Hugging Face
//! folder that native and web load directly: config.json gains a `quantization_config`, every
//! matrix [`quantizable`] names is stored as `{prefix}.qweight` (U32 words) and `{prefix}.scales`
//! (F16), everything else (norms, biases, tables that are not multiplied by) keeps its stored
//! bytes, and the tokenizer, chat template and preprocessor files are copied. Tensors are
//! quantized one at a time, in row blocks, so the full-precision model is never in memory.

use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::quant::{groups_per_row, quantizable, quantize, QuantConfig, Scheme};
use crate::weights::{Checkpoint, WeightsError};
use crate::{Error, ModelConfig, Progress};

/// Largest shard written (bytes of tensor data); larger checkpoints get an index.
pub const SHARD_BYTES: usize = 1 << 30;

/// Rows quantized per block (bounds the f32 copy of a tensor held at once).
const ROW_BLOCK: usize = 4096;

/// What [`quantize_dir`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// The scheme.
    pub scheme: Scheme,
    /// Matrices quantized.
    pub quantized: usize,
    /// Tensors copied as stored.
    pub copied: usize,
    /// Bytes of tensor data read.
    pub bytes_in: usize,
    /// Bytes of tensor data written.
    pub bytes_out: usize,
    /// Safetensors files written.
    pub shards: Vec<String>,
    /// Other files copied.
    pub copied_files: Vec<String>,
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Weights(WeightsError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// One output tensor: its name, dtype, shape and bytes (owned when quantized).
struct Out<'a> {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    data: std::borrow::Cow<'a, [u8]>,
}

/// Quantizes the checkpoint in `src` into `out` (created if missing; it must not hold a
/// checkpoint already).
pub fn quantize_dir(
    src: &Path,
    out: &Path,
    scheme: Scheme,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantizeReport, Error> {
    let config = ModelConfig::from_dir(src)?;
    if let Some(q) = config.quant {
        return Err(Error::BadInput(format!(
            "{} is already quantized ({} in config.json quantization_config); quantize the original checkpoint",
            src.display(),
            q.scheme
        )));
    }
    let same = match (src.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::BadInput(
            "--out must be another folder than --model".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let holds_checkpoint = std::fs::read_dir(out)
        .map_err(|e| io(out, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".safetensors") || n == "config.json"
        });
    if holds_checkpoint {
        return Err(Error::BadInput(format!(
            "{} already holds a checkpoint; choose an empty or new folder for --out",
            out.display()
        )));
    }
    let ckpt = Checkpoint::open_dir(src)?;
    let tensors = ckpt.stored_tensors();
    let total = tensors.len();

    // Plan shards from the output sizes (known before quantizing), then fill them one by one.
    let out_bytes = |t: &crate::weights::StoredTensor| -> usize {
        if quantizable(t.canonical, t.shape) {
            let cols: usize = t.shape[1..].iter().product();
            scheme.bytes(t.shape[0], cols, 2)
        } else {
            t.bytes.len()
        }
    };
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        let b = out_bytes(t);
        if size > 0 && size + b > SHARD_BYTES {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let names: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };

    let mut report = QuantizeReport {
        scheme,
        quantized: 0,
        copied: 0,
        bytes_in: 0,
        bytes_out: 0,
        shards: names.clone(),
        copied_files: Vec::new(),
    };
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (shard, file) in shards.iter().zip(&names) {
        let mut outs: Vec<Out> = Vec::new();
        for &i in shard {
            let t = &tensors[i];
            report.bytes_in += t.bytes.len();
            if quantizable(t.canonical, t.shape) {
                let rows = t.shape[0];
                let cols: usize = t.shape[1..].iter().product();
                let mut words: Vec<u8> = Vec::with_capacity(4 * rows * scheme.words_per_row(cols));
                let mut scales: Vec<u8> = Vec::with_capacity(2 * rows * groups_per_row(cols));
                let mut start = 0;
                while start < rows {
                    let end = (start + ROW_BLOCK).min(rows);
                    let data = ckpt.rows_f32(t.canonical, t.shape, start, end)?;
                    let p = quantize(scheme, &data, end - start, cols).map_err(|source| {
                        WeightsError::Quantize {
                            name: t.stored.to_string(),
                            file: src.display().to_string(),
                            source,
                        }
                    })?;
                    words.extend(p.words.iter().flat_map(|w| w.to_le_bytes()));
                    scales.extend(p.scales.iter().flat_map(|s| s.to_le_bytes()));
                    start = end;
                }
                let prefix = t.stored.strip_suffix(".weight").unwrap_or(t.stored);
                outs.push(Out {
                    name: format!("{prefix}.qweight"),
                    dtype: StDtype::U32,
                    shape: vec![rows, scheme.words_per_row(cols)],
                    data: words.into(),
                });
                outs.push(Out {
                    name: format!("{prefix}.scales"),
                    dtype: StDtype::F16,
                    shape: vec![rows, groups_per_row(cols)],
                    data: scales.into(),
                });
                report.quantized += 1;
            } else {
                outs.push(Out {
                    name: t.stored.to_string(),
                    dtype: t.dtype,
                    shape: t.shape.to_vec(),
                    data: t.bytes.into(),
                });
                report.copied += 1;
            }
            done += 1;
            progress(Progress {
                stage: "quantize",
                done,
                total,
                item: t.stored.to_string(),
            });
        }
        let views = outs
            .iter()
            .map(|o| {
                TensorView::new(o.dtype, o.shape.clone(), &o.data)
                    .map(|v| (o.name.clone(), v))
                    .map_err(|e| Error::BadInput(format!("tensor {}: {e}", o.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for o in &outs {
            report.bytes_out += o.data.len();
            weight_map.insert(o.name.clone(), file.clone().into());
        }
        let path = out.join(file);
        let metadata = std::collections::HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("quantization".to_string(), scheme.name().to_string()),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| Error::BadInput(format!("writing {}: {e}", path.display())))?;
    }
    if names.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": report.bytes_out},
            "weight_map": weight_map,
        });
        let path = out.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap_or_default())
            .map_err(|e| io(&path, e))?;
    }

    // config.json with the quantization_config; the tokenizer, template and preprocessor files.
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::BadInput(format!("{}: {e}", config_path.display())))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "quantization_config".into(),
            QuantConfig { scheme }.to_json(),
        );
    }
    let out_config = out.join("config.json");
    std::fs::write(
        &out_config,
        serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )
    .map_err(|e| io(&out_config, e))?;
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| io(src, e))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let keep = [".json", ".jinja", ".txt", ".model", ".tiktoken"]
            .iter()
            .any(|ext| name.ends_with(ext))
            && name != "config.json"
            && name != "model.safetensors.index.json"
            && !name.starts_with("golden");
        if keep && e.path().is_file() {
            std::fs::copy(e.path(), out.join(&name)).map_err(|err| io(&e.path(), err))?;
            report.copied_files.push(name);
        }
    }
    Ok(report)
}
