//! `qwen-vl selftest`: is this adapter safe to trust? On each wgpu adapter, the WGSL kernels
//! against the plain-Burn reference on the CPU backend, and the bundled fixture against its HF
//! goldens: prefill logits, per-position top-1 agreement with the CPU backend under forced
//! decoding (both fed the golden greedy tokens, so one early flip can neither hide nor fake the
//! rest), and free-running greedy tokens; plus a short timing.
//!
//! Workarounds per adapter come from what it reports, never from its name: f16 kernels are
//! checked only where it has `shader-f16`, and the kernels tile from its `Limits` (shapes a
//! kernel refuses there run on plain Burn, as the model would, and are counted as such).
//!
//! Native only (it blocks on device readbacks).

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor};
use web_time::Instant;

use crate::device::{AdapterEntry, DeviceHandle, Limits};
use crate::generate::{read_f32, read_ids};
use crate::image::{PixelValues, PreprocessConfig};
use crate::kernels::{self, wgsl};
use crate::model::ImageInputs;
use crate::tokenizer::QwenTokenizer;
use crate::weights::{upload, Checkpoint};
use crate::{Error, ModelConfig, Runtime};

/// Max |WGSL - Burn| allowed for f32 attention outputs.
pub const KERNEL_TOL_F32: f32 = 2e-4;
/// Max |WGSL - Burn| allowed for f16 attention outputs (inputs rounded to f16 on both sides).
pub const KERNEL_TOL_F16: f32 = 2e-3;
/// Max |prefill logits - HF| allowed (f32).
pub const LOGIT_TOL: f32 = 1e-3;
/// Goldens checked by default, where the fixture has them.
pub const DEFAULT_GOLDENS: &[&str] = &["img", "text"];

/// The bundled fixture the self-test runs on by default.
pub fn default_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_hub")
}

/// Why the self-test could not run at all (a failing adapter is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    /// A fixture folder or golden file is missing or malformed.
    #[error("fixture {path}: {reason}")]
    Fixture {
        /// The file or folder.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--adapter N` names no adapter.
    #[error("there is no adapter {index}; `qwen-vl devices` lists {count} (0..{count})")]
    NoSuchAdapter {
        /// The index asked for.
        index: usize,
        /// How many there are.
        count: usize,
    },
    /// wgpu sees no adapter at all.
    #[error("wgpu found no adapter on any graphics API; install a driver (on Linux without a GPU: mesa-vulkan-drivers for lavapipe)")]
    NoAdapters,
    /// Loading the fixture on the CPU reference failed.
    #[error(transparent)]
    Runtime(#[from] Error),
}

/// One golden of a fixture: the inputs and HF's outputs the self-test compares against.
#[derive(Debug, Clone)]
pub struct Golden {
    /// `img`, `text`, ... (from `golden_<tag>.safetensors`).
    pub tag: String,
    /// Prompt token ids.
    pub input_ids: Vec<u32>,
    /// HF's pixel values, per image.
    pub pixels: Vec<PixelValues>,
    /// HF's logits at the last prompt position `[vocab]`.
    pub prefill_logits: Vec<f32>,
    /// HF's greedy continuation.
    pub greedy: Vec<u32>,
}

impl Golden {
    /// Reads `dir/golden_<tag>.safetensors`.
    pub fn load(dir: &Path, tag: &str) -> Result<Self, SelftestError> {
        let path = dir.join(format!("golden_{tag}.safetensors"));
        let bad = |reason: String| SelftestError::Fixture {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let ints = |name: &str| -> Result<Vec<i64>, SelftestError> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("no tensor `{name}`")))?;
            match t.dtype() {
                safetensors::Dtype::I64 => Ok(t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect()),
                safetensors::Dtype::I32 => Ok(t
                    .data()
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect()),
                other => Err(bad(format!("`{name}` is {other:?}, expected I64 or I32"))),
            }
        };
        let floats = |name: &str| -> Result<(Vec<f32>, Vec<usize>), SelftestError> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("no tensor `{name}`")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("`{name}` is {:?}, expected F32", t.dtype())));
            }
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((v, t.shape().to_vec()))
        };
        let ids = |name: &str| -> Result<Vec<u32>, SelftestError> {
            ints(name)?
                .into_iter()
                .map(|v| u32::try_from(v).map_err(|_| bad(format!("`{name}` holds {v}"))))
                .collect()
        };
        let mut pixels = Vec::new();
        if st.tensor("image_grid_thw").is_ok() {
            let grids = ints("image_grid_thw")?;
            let (data, shape) = floats("pixel_values")?;
            let cols = *shape
                .get(1)
                .ok_or_else(|| bad("`pixel_values` is not 2-D".into()))?;
            let mut row = 0;
            for g in grids.chunks_exact(3) {
                let grid_thw = [g[0] as usize, g[1] as usize, g[2] as usize];
                let rows = grid_thw.iter().product::<usize>();
                let part = data
                    .get(row * cols..(row + rows) * cols)
                    .ok_or_else(|| bad("`pixel_values` has fewer rows than the grids".into()))?;
                pixels.push(PixelValues {
                    data: part.to_vec(),
                    rows,
                    cols,
                    grid_thw,
                    resized_hw: (0, 0),
                });
                row += rows;
            }
        }
        Ok(Golden {
            tag: tag.to_string(),
            input_ids: ids("input_ids")?,
            pixels,
            prefill_logits: floats("prefill_logits")?.0,
            greedy: ids("greedy_token_ids")?,
        })
    }
}

/// The goldens of `dir` the self-test checks: [`DEFAULT_GOLDENS`] where present, else all.
pub fn golden_tags(dir: &Path) -> Result<Vec<String>, SelftestError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SelftestError::Fixture {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut all: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("golden_")
                .and_then(|r| r.strip_suffix(".safetensors"))
                .map(str::to_string)
        })
        .collect();
    all.sort();
    let preferred: Vec<String> = DEFAULT_GOLDENS
        .iter()
        .filter(|t| all.iter().any(|a| a == *t))
        .map(|t| t.to_string())
        .collect();
    let tags = if preferred.is_empty() { all } else { preferred };
    if tags.is_empty() {
        return Err(SelftestError::Fixture {
            path: dir.display().to_string(),
            reason: "no golden_<tag>.safetensors in this folder".into(),
        });
    }
    Ok(tags)
}

/// Loads a checkpoint folder onto one device (f32).
pub fn load_runtime(dir: &Path, device: DeviceHandle) -> Result<Runtime, Error> {
    let config = ModelConfig::from_dir(dir)?;
    let tokenizer = QwenTokenizer::from_dir(dir)?;
    let preprocess = PreprocessConfig::from_file(&dir.join("preprocessor_config.json"))?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let model_id =
        crate::model_identity(&config_text, &dir.display().to_string(), DType::F32, None);
    let model = crate::load_model(&ckpt, config, device, DType::F32, None, &mut |_| {})?;
    Ok(Runtime::from_parts(
        model,
        tokenizer,
        preprocess,
        dir.to_path_buf(),
        model_id,
    ))
}

/// A fixture with its goldens and the CPU backend's results on them, computed once and
/// compared against every adapter.
pub struct Fixture {
    /// The folder.
    pub dir: PathBuf,
    /// Its goldens.
    pub goldens: Vec<Golden>,
    /// Per golden: the CPU backend's argmax at each position under forced decoding.
    pub cpu_argmax: Vec<Vec<u32>>,
    /// What the CPU reference itself shows against HF.
    pub reference: Vec<GoldenCheck>,
}

impl Fixture {
    /// Loads the goldens of `dir` and runs them on the CPU backend.
    pub fn load(dir: &Path) -> Result<Self, SelftestError> {
        let goldens = golden_tags(dir)?
            .iter()
            .map(|t| Golden::load(dir, t))
            .collect::<Result<Vec<_>, _>>()?;
        let rt = load_runtime(dir, DeviceHandle::cpu())?;
        let mut cpu_argmax = Vec::new();
        let mut reference = Vec::new();
        for g in &goldens {
            let trace = rt.trace(&g.input_ids, &g.pixels, g.greedy.len(), Some(&g.greedy))?;
            reference.push(GoldenCheck::new(
                dir,
                g,
                max_abs_diff(&trace.prefill_logits, &g.prefill_logits),
                &trace.argmax,
                &g.greedy,
                None,
            ));
            cpu_argmax.push(trace.argmax);
        }
        Ok(Fixture {
            dir: dir.to_path_buf(),
            goldens,
            cpu_argmax,
            reference,
        })
    }

    /// Whether the CPU backend itself matches HF on every golden (else nothing can be judged).
    pub fn reference_ok(&self) -> bool {
        self.reference.iter().all(|r| r.pass)
    }
}

/// One golden on one device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GoldenCheck {
    /// `fixture/golden` name.
    pub golden: String,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Max |prefill logits - HF golden|.
    pub logits_max_err: f32,
    /// Positions whose argmax under forced decoding equals the reference's.
    pub top1_agree: usize,
    /// Positions compared.
    pub positions: usize,
    /// First position where they differ.
    pub first_disagreement: Option<usize>,
    /// Free-running greedy tokens equal HF's (`None` where not run).
    pub greedy_match: Option<bool>,
    /// Why the golden could not be run on this device.
    pub error: Option<String>,
    /// All of the above within tolerance.
    pub pass: bool,
}

impl GoldenCheck {
    fn new(
        dir: &Path,
        g: &Golden,
        logits_max_err: f32,
        argmax: &[u32],
        reference: &[u32],
        greedy: Option<&[u32]>,
    ) -> Self {
        let positions = reference.len();
        let top1_agree = argmax.iter().zip(reference).filter(|(a, b)| a == b).count();
        let first_disagreement = (0..positions).find(|&i| argmax.get(i) != reference.get(i));
        let greedy_match = greedy.map(|t| t == g.greedy.as_slice());
        GoldenCheck {
            golden: golden_name(dir, g),
            prompt_tokens: g.input_ids.len(),
            logits_max_err,
            top1_agree,
            positions,
            first_disagreement,
            greedy_match,
            error: None,
            pass: logits_max_err <= LOGIT_TOL
                && first_disagreement.is_none()
                && greedy_match != Some(false),
        }
    }

    fn failed(dir: &Path, g: &Golden, error: &str) -> Self {
        GoldenCheck {
            golden: golden_name(dir, g),
            prompt_tokens: g.input_ids.len(),
            logits_max_err: f32::INFINITY,
            top1_agree: 0,
            positions: g.greedy.len(),
            first_disagreement: Some(0),
            greedy_match: None,
            error: Some(error.to_string()),
            pass: false,
        }
    }
}

/// `fixture/tag`.
fn golden_name(dir: &Path, g: &Golden) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name}/{}", g.tag)
}

/// The kernel conformance suite on one adapter.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KernelReport {
    /// Cases run.
    pub cases: usize,
    /// Cases the WGSL kernel took (the rest ran on plain Burn under this adapter's limits).
    pub wgsl_cases: usize,
    /// Cases over tolerance.
    pub failed: usize,
    /// Worst max |adapter - CPU reference| over the f32 cases.
    pub worst_f32: f32,
    /// Worst over the f16 cases (`None` without shader-f16).
    pub worst_f16: Option<f32>,
    /// Worst error as a fraction of its case's tolerance (pass: <= 1), comparable across
    /// kernels and dtypes.
    pub worst_ratio: f32,
    /// The failing cases, described.
    pub failures: Vec<String>,
    /// Every case: the conformance report.
    pub results: Vec<CaseResult>,
    /// Wall-clock seconds (on software adapters mostly shader compilation).
    pub seconds: f64,
}

/// One kernel case on one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    /// What was run (kernel and shape).
    pub case: String,
    /// `f32` or `f16`.
    pub dtype: String,
    /// Max |adapter - CPU reference| (`None` when it errored).
    pub max_err: Option<f32>,
    /// Allowed.
    pub tolerance: f32,
    /// The WGSL kernel ran (else plain Burn, the kernel having refused the shape).
    pub wgsl: bool,
    /// Wall-clock seconds, shader compilation included.
    pub seconds: f64,
}

/// Timing of the fixture's longest golden, after the checks warmed the shaders up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    /// Which golden.
    pub golden: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Vision tower + prompt forward pass + first token read back, in ms.
    pub prefill_ms: f64,
    /// Per generated token after the first, in ms (one id read back per step).
    pub decode_ms_per_token: f64,
    /// Tokens generated.
    pub tokens: usize,
}

/// Everything checked on one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterCheck {
    /// What was adapted to this adapter's features and limits.
    pub notes: Vec<String>,
    /// Kernel conformance.
    pub kernels: KernelReport,
    /// Fixture parity, per golden.
    pub goldens: Vec<GoldenCheck>,
    /// Worst max |prefill logits - HF| over the goldens.
    pub worst_logits_err: f32,
    /// Short timing.
    pub timing: Option<Timing>,
    /// Wall-clock seconds of the fixture checks, model loading and shader compilation included.
    pub parity_seconds: f64,
    /// Kernels and every golden passed.
    pub pass: bool,
}

/// Runs the kernel suite and the fixture checks on `device`.
pub fn check_adapter(device: &DeviceHandle, fixtures: &[Fixture]) -> AdapterCheck {
    let mut notes = vec![format!(
        "kernel tiles from limits: {} invocations, {} KiB workgroup memory, {} MiB per binding",
        device.limits.max_invocations,
        device.limits.max_shared >> 10,
        device.limits.max_binding >> 20
    )];
    if !device.adapter.shader_f16 {
        notes.push("no shader-f16: f16 kernels not checked, --dtype f16 refused".into());
    }
    let kernels = kernel_suite(device);
    if kernels.wgsl_cases < kernels.cases {
        notes.push(format!(
            "{} of {} kernel cases ran on plain Burn (the WGSL kernel refused the shape under these limits)",
            kernels.cases - kernels.wgsl_cases,
            kernels.cases
        ));
    }
    let start = Instant::now();
    let mut goldens = Vec::new();
    let mut timing: Option<Timing> = None;
    for f in fixtures {
        let rt = match load_runtime(&f.dir, device.clone()) {
            Ok(rt) => rt,
            Err(e) => {
                let e = format!("loading the fixture: {e}");
                goldens.extend(f.goldens.iter().map(|g| GoldenCheck::failed(&f.dir, g, &e)));
                continue;
            }
        };
        for (g, cpu) in f.goldens.iter().zip(&f.cpu_argmax) {
            let result = rt
                .trace(&g.input_ids, &g.pixels, g.greedy.len(), Some(&g.greedy))
                .and_then(|forced| Ok((forced, greedy_timed(&rt, g, g.greedy.len())?)));
            let (forced, run) = match result {
                Ok(r) => r,
                Err(e) => {
                    goldens.push(GoldenCheck::failed(&f.dir, g, &e.to_string()));
                    continue;
                }
            };
            let check = GoldenCheck::new(
                &f.dir,
                g,
                max_abs_diff(&forced.prefill_logits, &g.prefill_logits),
                &forced.argmax,
                cpu,
                Some(&run.tokens),
            );
            if timing
                .as_ref()
                .is_none_or(|t| g.input_ids.len() > t.prompt_tokens)
            {
                timing = Some(Timing {
                    golden: check.golden.clone(),
                    prompt_tokens: g.input_ids.len(),
                    prefill_ms: run.prefill_ms,
                    decode_ms_per_token: run.decode_ms_per_token,
                    tokens: run.tokens.len(),
                });
            }
            goldens.push(check);
        }
    }
    let worst_logits_err = goldens.iter().map(|g| g.logits_max_err).fold(0.0, f32::max);
    let pass = kernels.failed == 0 && goldens.iter().all(|g| g.pass);
    AdapterCheck {
        notes,
        kernels,
        goldens,
        worst_logits_err,
        timing,
        parity_seconds: start.elapsed().as_secs_f64(),
        pass,
    }
}

struct GreedyRun {
    tokens: Vec<u32>,
    prefill_ms: f64,
    decode_ms_per_token: f64,
}

/// Free-running greedy decoding with the prefill and per-step costs measured.
fn greedy_timed(rt: &Runtime, g: &Golden, steps: usize) -> Result<GreedyRun, Error> {
    let model = &rt.model;
    let grids: Vec<[usize; 3]> = g.pixels.iter().map(|p| p.grid_thw).collect();
    model.check_prompt(&g.input_ids, &grids)?;
    let start = Instant::now();
    let vision = rt.encode_pixels(&g.pixels)?;
    let mut cache = model.new_cache(g.input_ids.len() + steps);
    let positions = model.positions(&g.input_ids, &grids);
    let images = vision.as_ref().map(|v| ImageInputs {
        vision: v,
        grids: &grids,
    });
    let hidden = model.prefill(&g.input_ids, images.as_ref(), &positions, &mut cache)?;
    let mut tokens = first_id(pollster::block_on(read_ids(
        model.last_logits(hidden).argmax(1),
    ))?)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    for _ in 1..steps {
        let last = tokens[tokens.len() - 1];
        let hidden = model.decode_step(last, positions.rope_delta, &mut cache)?;
        tokens.extend(first_id(pollster::block_on(read_ids(
            model.text.logits(hidden, cache.limits()).argmax(1),
        ))?)?);
    }
    let decode_ms_per_token =
        start.elapsed().as_secs_f64() * 1e3 / steps.saturating_sub(1).max(1) as f64;
    Ok(GreedyRun {
        tokens,
        prefill_ms,
        decode_ms_per_token,
    })
}

fn first_id(v: Vec<u32>) -> Result<Vec<u32>, Error> {
    v.first()
        .map(|&id| vec![id])
        .ok_or(Error::Internal("empty argmax"))
}

/// Largest absolute difference; NaN counts as infinite, a length mismatch too.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                scale * (((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }
}

/// One case of the kernel conformance suite.
#[derive(Debug, Clone, Copy)]
enum KernelCase {
    /// One query row against `len` cached positions.
    Decode {
        hd: usize,
        heads: usize,
        kv: usize,
        len: usize,
    },
    /// `n` query rows at positions `[p0, p0 + n)`.
    Prefill {
        hd: usize,
        heads: usize,
        kv: usize,
        p0: usize,
        n: usize,
    },
    /// `n` rows written at `len` into caches of `cap` positions.
    KvAppend {
        kv: usize,
        hd: usize,
        cap: usize,
        len: usize,
        n: usize,
    },
    /// One row `[1, d_in]` times `[out, d_in]` weights (decode-time Linear and lm_head).
    Matvec { d_in: usize, out: usize },
}

const fn decode(hd: usize, heads: usize, kv: usize, len: usize) -> KernelCase {
    KernelCase::Decode { hd, heads, kv, len }
}

const fn prefill(hd: usize, heads: usize, kv: usize, p0: usize, n: usize) -> KernelCase {
    KernelCase::Prefill {
        hd,
        heads,
        kv,
        p0,
        n,
    }
}

const fn kv_append(kv: usize, hd: usize, cap: usize, len: usize, n: usize) -> KernelCase {
    KernelCase::KvAppend {
        kv,
        hd,
        cap,
        len,
        n,
    }
}

const fn matvec(d_in: usize, out: usize) -> KernelCase {
    KernelCase::Matvec { d_in, out }
}

/// f32 cases: GQA ratios 1, 2, 6, 7 and 8/8 heads; head sizes 16 (the bundled fixture), 64, 80
/// and 128 (every real Qwen-VL decoder); lengths and offsets that are not multiples of the tile
/// sizes; matvec at the fixture's lm_head (a 2-D grid) and Qwen2-VL-2B's MLP. Each distinct
/// (kernel, head size, ratio) compiles its own pipeline; on software rasterizers a prefill
/// pipeline takes minutes to compile at head size 128 (LLVM unrolls its tile loops), so prefill
/// runs at three head sizes only.
const CASES: &[KernelCase] = &[
    decode(64, 2, 2, 1),
    decode(64, 4, 2, 7),
    decode(80, 12, 2, 129),
    decode(128, 14, 2, 1000),
    decode(128, 16, 8, 4097),
    decode(16, 2, 1, 77),
    prefill(64, 2, 2, 0, 2),
    prefill(64, 7, 1, 31, 300),
    prefill(128, 4, 2, 100, 129),
    prefill(16, 2, 1, 0, 76),
    kv_append(2, 128, 300, 0, 37),
    kv_append(2, 128, 300, 37, 1),
    kv_append(1, 80, 4100, 4000, 97),
    matvec(24, 7),
    matvec(1536, 8960),
    matvec(8960, 1536),
    matvec(32, 151_936),
];

/// f16 cases, run where the adapter has shader-f16: the f16 loads and stores of every kernel.
/// Workgroup memory is f32 in both dtypes, so the f32 cases already cover tile sizing.
const F16_CASES: &[KernelCase] = &[
    decode(64, 4, 2, 7),
    decode(128, 14, 2, 1000),
    decode(16, 2, 1, 77),
    prefill(16, 2, 1, 0, 76),
    kv_append(2, 128, 300, 37, 1),
    matvec(1536, 8960),
];

impl KernelCase {
    fn name(&self) -> String {
        match *self {
            KernelCase::Decode { hd, heads, kv, len } => {
                format!("decode hd {hd} heads {heads}/{kv} len {len}")
            }
            KernelCase::Prefill {
                hd,
                heads,
                kv,
                p0,
                n,
            } => format!("prefill hd {hd} heads {heads}/{kv} p0 {p0} n {n}"),
            KernelCase::KvAppend {
                kv,
                hd,
                cap,
                len,
                n,
            } => format!("kv_append kv {kv} hd {hd} cap {cap} at {len} + {n}"),
            KernelCase::Matvec { d_in, out } => format!("matvec {d_in} -> {out}"),
        }
    }

    /// Attention within a dtype's tolerance; a copy exactly; a dot product of `d_in` terms in
    /// [-1, 1] allowing for summation order (and, in f16, for rounding outputs up to ~50).
    fn tolerance(&self, dtype: DType) -> f32 {
        match (self, dtype) {
            (KernelCase::KvAppend { .. }, _) => 0.0,
            (KernelCase::Matvec { d_in, .. }, DType::F16) => 1e-4 * *d_in as f32,
            (KernelCase::Matvec { d_in, .. }, _) => 1e-6 * *d_in as f32,
            (_, DType::F16) => KERNEL_TOL_F16,
            _ => KERNEL_TOL_F32,
        }
    }

    /// Max |adapter - CPU reference| and whether the WGSL kernel took the case.
    fn run(
        &self,
        device: &DeviceHandle,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<(f32, bool), Error> {
        match *self {
            KernelCase::Decode { hd, heads, kv, len } => {
                let cap = len + 3;
                let (q, k, v) = attention_inputs(rng, dtype, heads * hd, kv * cap * hd);
                let shapes = ([heads, 1, hd], [kv, cap, hd]);
                attention_case(device, dtype, (q, k, v), shapes, len - 1, |q, k, v, l| {
                    wgsl::attention_decode(q, k, v, len, l)
                })
            }
            KernelCase::Prefill {
                hd,
                heads,
                kv,
                p0,
                n,
            } => {
                let cap = p0 + n + 5;
                let (q, k, v) = attention_inputs(rng, dtype, heads * n * hd, kv * cap * hd);
                let shapes = ([heads, n, hd], [kv, cap, hd]);
                attention_case(device, dtype, (q, k, v), shapes, p0, |q, k, v, l| {
                    wgsl::attention_prefill(q, k, v, p0, l)
                })
            }
            KernelCase::KvAppend {
                kv,
                hd,
                cap,
                len,
                n,
            } => kv_append_case(device, dtype, rng, [kv, cap, hd], [kv, n, hd], len),
            KernelCase::Matvec { d_in, out } => matvec_case(device, dtype, rng, d_in, out),
        }
    }
}

/// `wgsl::matvec` on the adapter (plain Burn if it refuses) against a CPU matmul.
fn matvec_case(
    device: &DeviceHandle,
    dtype: DType,
    rng: &mut Rng,
    d_in: usize,
    out: usize,
) -> Result<(f32, bool), Error> {
    let cpu = Device::flex();
    let x = rounded(rng.vec(d_in, 1.0), dtype);
    let w = rounded(rng.vec(out * d_in, 1.0), dtype);
    // [1, d_in] x [d_in, out]
    let want = upload(x.clone(), [1, d_in], &cpu, DType::F32)
        .matmul(upload(w.clone(), [out, d_in], &cpu, DType::F32).transpose());
    let gpu = &device.device;
    let (x, w) = (
        upload(x, [1, d_in], gpu, dtype),
        upload(w, [out, d_in], gpu, dtype),
    );
    let (got, on_wgsl) = match wgsl::matvec(&x, &w, &device.limits) {
        Some(y) => (y, true),
        None => (x.matmul(w.transpose()), false),
    };
    let got = pollster::block_on(read_f32(got))?;
    let want = pollster::block_on(read_f32(want))?;
    Ok((max_abs_diff(&got, &want), on_wgsl))
}

/// Queries scaled so the softmax is not flat (scores spread like a real model's).
fn attention_inputs(
    rng: &mut Rng,
    dtype: DType,
    q: usize,
    kv: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rounded(rng.vec(q, 3.0), dtype),
        rounded(rng.vec(kv, 1.0), dtype),
        rounded(rng.vec(kv, 1.0), dtype),
    )
}

/// `kernel` on the adapter (plain Burn there if it refuses the shape) against plain Burn on
/// the CPU, for queries at positions `[p0, p0 + rows)`.
fn attention_case(
    device: &DeviceHandle,
    dtype: DType,
    (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>),
    (q_shape, kv_shape): ([usize; 3], [usize; 3]),
    p0: usize,
    kernel: impl Fn(&Tensor<3>, &Tensor<3>, &Tensor<3>, &Limits) -> Option<Tensor<3>>,
) -> Result<(f32, bool), Error> {
    let cpu = Device::flex();
    let want = read3(kernels::attention(
        upload(q.clone(), q_shape, &cpu, DType::F32),
        upload(k.clone(), kv_shape, &cpu, DType::F32),
        upload(v.clone(), kv_shape, &cpu, DType::F32),
        p0,
        &Limits::unbounded(),
    ))?;
    let gpu = &device.device;
    let (q, k, v) = (
        upload(q, q_shape, gpu, dtype),
        upload(k, kv_shape, gpu, dtype),
        upload(v, kv_shape, gpu, dtype),
    );
    let (got, on_wgsl) = match kernel(&q, &k, &v, &device.limits) {
        Some(t) => (t, true),
        None => (kernels::attention(q, k, v, p0, &device.limits), false),
    };
    Ok((max_abs_diff(&read3(got)?, &want), on_wgsl))
}

/// kv_append of `new`-shaped rows at `len` into `cache`-shaped K and V caches.
fn kv_append_case(
    device: &DeviceHandle,
    dtype: DType,
    rng: &mut Rng,
    cache: [usize; 3],
    new: [usize; 3],
    len: usize,
) -> Result<(f32, bool), Error> {
    let cpu = Device::flex();
    let base = rounded(rng.vec(cache.iter().product(), 1.0), dtype);
    let nk = rounded(rng.vec(new.iter().product(), 1.0), dtype);
    let nv = rounded(rng.vec(new.iter().product(), 1.0), dtype);
    let (want_k, want_v) = kernels::kv_append(
        upload(base.clone(), cache, &cpu, DType::F32),
        upload(base.clone(), cache, &cpu, DType::F32),
        upload(nk.clone(), new, &cpu, DType::F32),
        upload(nv.clone(), new, &cpu, DType::F32),
        len,
        &Limits::unbounded(),
    );
    let gpu = &device.device;
    let (ck, cv) = (
        upload(base.clone(), cache, gpu, dtype),
        upload(base, cache, gpu, dtype),
    );
    let (nk, nv) = (upload(nk, new, gpu, dtype), upload(nv, new, gpu, dtype));
    // In place when the kernel runs; plain Burn otherwise.
    let on_wgsl = wgsl::kv_append(&ck, &cv, &nk, &nv, len, &device.limits);
    let (ck, cv) = if on_wgsl {
        (ck, cv)
    } else {
        kernels::kv_append(ck, cv, nk, nv, len, &device.limits)
    };
    let dk = max_abs_diff(&read3(ck)?, &read3(want_k)?);
    let dv = max_abs_diff(&read3(cv)?, &read3(want_v)?);
    Ok((dk.max(dv), on_wgsl))
}

/// Rounds to what `dtype` stores, so the reference sees the adapter's inputs exactly.
fn rounded(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => v
            .into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect(),
        _ => v,
    }
}

fn read3(t: Tensor<3>) -> Result<Vec<f32>, Error> {
    pollster::block_on(read_f32(t))
}

/// The WGSL kernels on `device` against plain Burn on the CPU backend: decode and prefill
/// attention (tolerance [`KERNEL_TOL_F32`], or [`KERNEL_TOL_F16`]) and kv_append (exact), the
/// f32 cases and, where the adapter has shader-f16, the f16 ones. A case that errors is a
/// failed case.
pub fn kernel_suite(device: &DeviceHandle) -> KernelReport {
    let start = Instant::now();
    let mut report = KernelReport::default();
    let mut runs = vec![(DType::F32, CASES)];
    if device.adapter.shader_f16 {
        runs.push((DType::F16, F16_CASES));
    }
    let mut rng = Rng(7);
    for (dtype, cases) in runs {
        for case in cases {
            let case_start = Instant::now();
            let outcome = case.run(device, dtype, &mut rng);
            let tol = case.tolerance(dtype);
            let mut result = CaseResult {
                case: case.name(),
                dtype: format!("{dtype:?}").to_lowercase(),
                max_err: None,
                tolerance: tol,
                wgsl: false,
                seconds: case_start.elapsed().as_secs_f64(),
            };
            report.cases += 1;
            match outcome {
                Ok((d, on_wgsl)) => {
                    result.max_err = Some(d);
                    result.wgsl = on_wgsl;
                    report.wgsl_cases += usize::from(on_wgsl);
                    match dtype {
                        DType::F16 => {
                            report.worst_f16 = Some(report.worst_f16.unwrap_or(0.0).max(d))
                        }
                        _ => report.worst_f32 = report.worst_f32.max(d),
                    }
                    // A copy (tolerance 0) scores 0 when exact and infinite otherwise.
                    let ratio = match d {
                        d if d.is_nan() => f32::INFINITY,
                        0.0 => 0.0,
                        d => d / tol,
                    };
                    report.worst_ratio = report.worst_ratio.max(ratio);
                    if d > tol || d.is_nan() {
                        report.failed += 1;
                        report.failures.push(format!(
                            "{} {}: max |diff| {d:.3e} > {tol:.0e}",
                            result.case, result.dtype
                        ));
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    report
                        .failures
                        .push(format!("{} {}: {e}", result.case, result.dtype));
                }
            }
            report.results.push(result);
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Which adapters to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every adapter [`enumerate_adapters`](crate::device::enumerate_adapters) lists.
    All,
    /// One, by its index there.
    Index(usize),
}

/// One adapter's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterRow {
    /// The adapter as enumerated.
    pub adapter: AdapterEntry,
    /// What was checked (absent when the adapter could not be opened or a check crashed).
    pub check: Option<AdapterCheck>,
    /// Why there is no check, or what crashed.
    pub error: Option<String>,
    /// Seconds the adapter took, opening included.
    pub seconds: f64,
    /// Passed every check.
    pub pass: bool,
}

/// The whole self-test.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelftestReport {
    /// The CPU backend against HF on each golden (the reference every adapter is compared to).
    pub reference: Vec<GoldenCheck>,
    /// One row per adapter checked.
    pub adapters: Vec<AdapterRow>,
    /// The reference and every adapter passed.
    pub pass: bool,
}

/// Runs the self-test on the selected adapters against the fixtures in `fixture_dirs`.
/// `progress` hears what is being done (for stderr).
pub fn run(
    selection: Selection,
    fixture_dirs: &[PathBuf],
    progress: &mut dyn FnMut(&str),
) -> Result<SelftestReport, SelftestError> {
    let adapters = crate::device::enumerate_adapters();
    if adapters.is_empty() {
        return Err(SelftestError::NoAdapters);
    }
    let chosen: Vec<AdapterEntry> = match selection {
        Selection::All => adapters,
        Selection::Index(index) => match adapters.get(index) {
            Some(a) => vec![a.clone()],
            None => {
                return Err(SelftestError::NoSuchAdapter {
                    index,
                    count: adapters.len(),
                })
            }
        },
    };
    let mut fixtures = Vec::new();
    for dir in fixture_dirs {
        progress(&format!("CPU reference on {}", dir.display()));
        fixtures.push(Fixture::load(dir)?);
    }
    let reference: Vec<GoldenCheck> = fixtures
        .iter()
        .flat_map(|f| f.reference.iter().cloned())
        .collect();
    let mut rows = Vec::new();
    for adapter in chosen {
        progress(&format!(
            "adapter {}: {} ({})",
            adapter.index, adapter.name, adapter.backend
        ));
        rows.push(check_row(adapter, &fixtures));
    }
    let pass = fixtures.iter().all(Fixture::reference_ok) && rows.iter().all(|r| r.pass);
    Ok(SelftestReport {
        reference,
        adapters: rows,
        pass,
    })
}

/// Opens and checks one adapter; a panic inside wgpu or a kernel fails this row only.
pub fn check_row(adapter: AdapterEntry, fixtures: &[Fixture]) -> AdapterRow {
    let start = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let device = DeviceHandle::wgpu_adapter(&adapter).map_err(|e| e.to_string())?;
        Ok::<_, String>(check_adapter(&device, fixtures))
    }));
    let (check, error) = match outcome {
        Ok(Ok(check)) => (Some(check), None),
        Ok(Err(e)) => (None, Some(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (None, Some(format!("crashed: {msg}")))
        }
    };
    AdapterRow {
        pass: check.as_ref().is_some_and(|c| c.pass),
        adapter,
        check,
        error,
        seconds: start.elapsed().as_secs_f64(),
    }
}
