//! The browser surface (wasm-bindgen, feature `web`): describe the WebGPU adapter, load a
//! checkpoint from a map of file name -> bytes, and, while streaming text to a JS callback,
//! generate from image bytes + a prompt (the `qwen-vl generate --json` object), run the
//! multi-phase pipeline (the `qwen-vl pipeline --json` report) or hold a multi-turn chat that
//! reuses its KV prefix across turns. Every failure reaches JS as a plain `Error` whose message
//! says what went wrong; a Rust panic (a bug) traps the module, and [`last_panic`] then tells
//! what it was.
//!
//! JS usage (see web/engine.js):
//! ```js
//! const info = await adapterInfo();                       // {name, backend, ..., limits, features}
//! const model = await loadModel(files, {dtype: "f32"}, p => console.log(p.stage, p.done, p.total));
//! const out = await model.generate(imageBytes, "Describe this image.", {max_new_tokens: 16}, t => ...);
//! const report = await model.pipeline(imageBytes, "Where is the cat?", {main_tokens: 256},
//!                                     (phase, piece) => ...);
//! const turn = await model.chat(imageBytes, "What is in it?", {max_new_tokens: 64}, t => ...);
//! ```

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;

use burn::backend::wgpu::wgpu;
use burn::tensor::{DType, Device};
use js_sys::{Array, Function, Object, Promise, Uint8Array, JSON};
use serde::Deserialize;
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;
use web_time::Instant;

use crate::generate::{GenerateOptions, Request, Sampling};
use crate::image::PreprocessConfig;
use crate::pipeline::{FixedPlan, Pipeline, PipelineOptions};
use crate::quant::Scheme;
use crate::session::{Session, SessionOptions};
use crate::tokenizer::{ChatMessage, Content, QwenTokenizer, TokenizerFiles};
use crate::weights::Checkpoint;
use crate::{load_model, model_identity, DeviceHandle, ModelConfig, Progress, Runtime};

/// A wasm32 page holds at most 4 GiB; the weight files, the model's host-side conversions and the
/// rest of the heap must fit in it together.
const WASM_WEIGHT_BUDGET: usize = 3 << 30;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str);
}

// Burn 0.22's WGSL matmul kernels use subgroup builtins and operations (`subgroup_size`,
// `subgroupAdd`), for which cubecl writes `enable subgroups;` on wasm. The browser refuses such a
// shader unless (1) the device was created with the "subgroups" feature, which wgpu 30 never
// asks for (it has no mapping for it), and (2) every subgroup operation is in subgroup-uniform
// control flow by WGSL's static analysis, which cubecl's kernels (written against naga, which
// does not check it) are not always. So: ask for "subgroups" wherever the adapter offers it, and
// turn that one static check off (`diagnostic(off, subgroup_uniformity)`) in shaders that enable
// subgroups. Natively the same kernels run with neither (naga checks no subgroup uniformity);
// tests/web_e2e.rs compares every browser token with the CPU backend.
#[wasm_bindgen(inline_js = r#"
export function request_subgroups() {
  if (typeof GPUAdapter === 'undefined' || typeof GPUDevice === 'undefined') return;
  const adapter = GPUAdapter.prototype;
  if (adapter.__qwenVlRequestDevice) return;
  adapter.__qwenVlRequestDevice = adapter.requestDevice;
  adapter.requestDevice = function (desc) {
    const d = Object.assign({}, desc || {});
    const features = Array.from(d.requiredFeatures || []);
    const has = this.features.has('subgroups');
    if (has && !features.includes('subgroups')) features.push('subgroups');
    d.requiredFeatures = features;
    globalThis.__qwenVlSubgroups = has;
    const info = this.info || {};
    globalThis.__qwenVlAdapterName =
      info.description || [info.vendor, info.architecture].filter(Boolean).join(' ');
    return adapter.__qwenVlRequestDevice.call(this, d);
  };
  const device = GPUDevice.prototype;
  const create = device.createShaderModule;
  device.createShaderModule = function (desc) {
    const code = desc && desc.code;
    if (typeof code === 'string' && code.includes('enable subgroups;') &&
        !code.includes('subgroup_uniformity')) {
      desc = Object.assign({}, desc, {
        code: code.replace('enable subgroups;', 'enable subgroups;\ndiagnostic(off, subgroup_uniformity);'),
      });
    }
    return create.call(this, desc);
  };
}
export function subgroups_enabled() {
  return globalThis.__qwenVlSubgroups === true;
}
export function adapter_name() {
  return globalThis.__qwenVlAdapterName || '';
}
"#)]
extern "C" {
    fn request_subgroups();
    fn subgroups_enabled() -> bool;
    /// GPUAdapterInfo's description, else "vendor architecture" (wgpu leaves the name empty
    /// when the browser gives no description, e.g. "google swiftshader").
    fn adapter_name() -> String;
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static DEVICE: RefCell<Option<Rc<WebDevice>>> = const { RefCell::new(None) };
    static DEVICE_PENDING: Cell<bool> = const { Cell::new(false) };
}

/// Runs when the module is instantiated: a panic is logged to the console and kept for
/// [`last_panic`], so the page can show what failed after the module traps.
#[wasm_bindgen(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("{payload}{at}");
        console_error(&format!("qwen-vl: internal failure: {message}"));
        LAST_PANIC.with(|p| {
            if let Ok(mut slot) = p.try_borrow_mut() {
                *slot = Some(message);
            }
        });
    }));
}

/// The message of the last Rust panic, if any. After a panic the module is unusable: the page
/// shows this message and starts a fresh module (a new worker).
#[wasm_bindgen(js_name = lastPanic)]
pub fn last_panic() -> Option<String> {
    LAST_PANIC.with(|p| p.try_borrow().ok().and_then(|p| p.clone()))
}

/// The crate version, to show in the page.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn js_error(message: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&message.to_string()).into()
}

fn to_js(value: &Value) -> JsValue {
    // serde_json output is always valid JSON, so parsing it back cannot fail.
    JSON::parse(&value.to_string()).unwrap_or(JsValue::NULL)
}

/// The WebGPU device the module runs on, shared by every model it loads (Burn registers one
/// runtime per device selector, so it is initialised once).
struct WebDevice {
    handle: DeviceHandle,
    limits: wgpu::Limits,
    features: wgpu::Features,
}

async fn web_device() -> Result<Rc<WebDevice>, JsValue> {
    if let Some(d) = DEVICE.with(|d| d.borrow().clone()) {
        return Ok(d);
    }
    if DEVICE_PENDING.with(|p| p.replace(true)) {
        return Err(js_error(
            "the WebGPU device is still being initialised; wait for the first call to finish",
        ));
    }
    request_subgroups();
    let result = Device::wgpu_options().init_with_setup_async().await;
    DEVICE_PENDING.with(|p| p.set(false));
    let (device, setup) = result.map_err(|e| {
        js_error(format!(
            "WebGPU could not be initialised: {e}. The browser may lack WebGPU, or have it disabled for this GPU"
        ))
    })?;
    // cubecl-wgpu requests the device with the adapter's own limits (maxBufferSize,
    // maxStorageBufferBindingSize, ...) rather than the WebGPU defaults, so `limits` here are
    // what the adapter really offers; DeviceHandle splits the vocab tables by them.
    let mut handle = DeviceHandle::from_setup(device, &setup);
    if handle.adapter.name.is_empty() {
        handle.adapter.name = adapter_name();
    }
    let web = Rc::new(WebDevice {
        handle,
        limits: setup.device.limits(),
        features: setup.device.features(),
    });
    DEVICE.with(|d| *d.borrow_mut() = Some(web.clone()));
    Ok(web)
}

fn adapter_json(d: &WebDevice) -> Value {
    let l = &d.limits;
    let mut info = serde_json::to_value(&d.handle.adapter).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut info {
        map.insert(
            "limits".into(),
            json!({
                "max_buffer_size": l.max_buffer_size,
                "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
                "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
                "max_compute_workgroup_size_x": l.max_compute_workgroup_size_x,
                "max_compute_workgroup_size_y": l.max_compute_workgroup_size_y,
                "max_compute_workgroup_size_z": l.max_compute_workgroup_size_z,
                "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            }),
        );
        let features = d.features.to_string();
        let names: Vec<&str> = features.split(" | ").filter(|s| !s.is_empty()).collect();
        map.insert("features".into(), json!(names));
        // Not in wgpu's feature list (see `request_subgroups`), but on the device.
        map.insert("webgpu_subgroups".into(), json!(subgroups_enabled()));
    }
    info
}

/// Initialises WebGPU (once) and describes the adapter: the fields of `adapter` in the
/// `generate --json` output plus `limits` and `features`.
#[wasm_bindgen(js_name = adapterInfo)]
pub async fn adapter_info() -> Result<JsValue, JsValue> {
    let d = web_device().await?;
    Ok(to_js(&adapter_json(&d)))
}

/// Options of [`load_model`]; every field may be left out.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct LoadOptionsJs {
    /// "f32" (default) or "f16" (needs shader-f16).
    dtype: Option<String>,
    /// Where the files came from, for messages (a URL or a folder name).
    source: Option<String>,
    /// "wgsl" (default): the hand-written WGSL kernels where they apply; "burn": plain Burn ops
    /// only (for comparison, or to work around a browser that refuses one of those shaders).
    kernels: Option<String>,
    /// "q8" or "q4": quantize the matrices while loading (a quantized checkpoint loads as it is
    /// stored without this).
    quant: Option<String>,
}

/// Options of [`WebModel::generate`], the `qwen-vl generate` flags by their JSON names.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GenerateOptionsJs {
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    ignore_eos: bool,
    system: Option<String>,
    max_context: Option<usize>,
}

impl Default for GenerateOptionsJs {
    fn default() -> Self {
        GenerateOptionsJs {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: false,
            system: None,
            max_context: None,
        }
    }
}

fn parse_options<T: Default + for<'de> Deserialize<'de>>(
    value: &JsValue,
    what: &str,
) -> Result<T, JsValue> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    let text: String = JSON::stringify(value)
        .map_err(|_| js_error(format!("{what} must be a plain object")))?
        .into();
    serde_json::from_str(&text).map_err(|e| js_error(format!("bad {what}: {e}")))
}

fn report(progress: &Option<Function>, value: Value) {
    if let Some(f) = progress {
        // A throwing progress callback must not stop the load.
        let _ = f.call1(&JsValue::NULL, &to_js(&value));
    }
}

/// The files of a checkpoint as given by JS: base name -> bytes (still in JS memory).
fn collect_files(files: &JsValue) -> Result<BTreeMap<String, Uint8Array>, JsValue> {
    let entries: Array = if let Some(map) = files.dyn_ref::<js_sys::Map>() {
        Array::from(&map.entries())
    } else if files.is_object() {
        Object::entries(files.unchecked_ref())
    } else {
        return Err(js_error(
            "the model files must be a Map or an object of file name -> Uint8Array/ArrayBuffer",
        ));
    };
    let mut out = BTreeMap::new();
    for entry in entries.iter() {
        let pair: Array = entry.unchecked_into();
        let name = pair
            .get(0)
            .as_string()
            .ok_or_else(|| js_error("a model file name is not a string"))?;
        let bytes = pair.get(1);
        // `new Uint8Array(typedArray)` would copy; a view on an ArrayBuffer does not.
        let bytes = if bytes.is_instance_of::<Uint8Array>() {
            bytes.unchecked_into::<Uint8Array>()
        } else if bytes.is_instance_of::<js_sys::ArrayBuffer>() {
            Uint8Array::new(&bytes)
        } else {
            return Err(js_error(format!(
                "{name}: the contents must be a Uint8Array or an ArrayBuffer"
            )));
        };
        // A folder pick gives `folder/config.json`; only the base name matters.
        let base = name.rsplit('/').next().unwrap_or(&name).to_string();
        out.insert(base, bytes);
    }
    Ok(out)
}

fn text_file(files: &BTreeMap<String, Uint8Array>, name: &str) -> Result<Option<String>, JsValue> {
    match files.get(name) {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| js_error(format!("{name} is not UTF-8 text; re-download it"))),
    }
}

fn required_text(files: &BTreeMap<String, Uint8Array>, name: &str) -> Result<String, JsValue> {
    text_file(files, name)?.ok_or_else(|| {
        js_error(format!(
            "{name} is missing: a checkpoint folder needs config.json, tokenizer.json, preprocessor_config.json and its *.safetensors weights"
        ))
    })
}

/// The weight files to read, in order: the shards listed by model.safetensors.index.json, or
/// model.safetensors.
fn weight_files(files: &BTreeMap<String, Uint8Array>) -> Result<Vec<String>, JsValue> {
    if let Some(index) = text_file(files, "model.safetensors.index.json")? {
        let value: Value = serde_json::from_str(&index).map_err(|e| {
            js_error(format!(
                "model.safetensors.index.json is not valid JSON ({e}); re-download it"
            ))
        })?;
        let shards: BTreeSet<String> = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| js_error("model.safetensors.index.json has no `weight_map` object"))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if let Some(missing) = shards.iter().find(|s| !files.contains_key(*s)) {
            return Err(js_error(format!(
                "{missing} is listed in model.safetensors.index.json but was not among the files given"
            )));
        }
        return Ok(shards.into_iter().collect());
    }
    if files.contains_key("model.safetensors") {
        return Ok(vec!["model.safetensors".into()]);
    }
    Err(js_error(
        "no weights: the files include neither model.safetensors nor model.safetensors.index.json",
    ))
}

/// Copies a JS byte array into WebAssembly memory, failing with a message instead of aborting
/// when the 4 GiB wasm32 memory cannot grow that far.
fn copy_in(name: &str, bytes: &Uint8Array) -> Result<Vec<u8>, JsValue> {
    let len = bytes.length() as usize;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        js_error(format!(
            "out of memory: {name} ({} MiB) does not fit in WebAssembly memory (at most 4 GiB per page)",
            len >> 20
        ))
    })?;
    v.resize(len, 0);
    bytes.copy_to(&mut v);
    Ok(v)
}

/// Bytes the weights take on the device, and the largest single tensor that is not a vocab table
/// (those are split by the library). Packed tensors count as stored (scales as `scale_bytes`
/// each); with `quant`, the matrices it quantizes count at their quantized size.
fn device_bytes(
    buffers: &[(String, Vec<u8>)],
    dtype: DType,
    quant: Option<Scheme>,
    scale_bytes: usize,
) -> (u64, u64, String) {
    let elem = if dtype == DType::F16 { 2u64 } else { 4u64 };
    let mut total = 0u64;
    let mut largest = (0u64, String::new());
    for (_, bytes) in buffers {
        let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(bytes) else {
            continue;
        };
        for (name, info) in meta.tensors() {
            let numel = info.shape.iter().product::<usize>() as u64;
            let canonical = crate::weights::canonical_name(&name);
            let n = match quant {
                _ if name.ends_with(".qweight") => numel * 4,
                _ if name.ends_with(".scales") => numel * scale_bytes as u64,
                Some(q) if crate::quant::quantizable(&canonical, &info.shape) => {
                    let cols = info.shape[1..].iter().product::<usize>();
                    q.bytes(info.shape[0], cols, scale_bytes) as u64
                }
                _ => numel * elem,
            };
            total += n;
            let vocab = name.contains("embed_tokens") || name.starts_with("lm_head");
            if !vocab && n > largest.0 {
                largest = (n, name.clone());
            }
        }
    }
    (total, largest.0, largest.1)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Loads a checkpoint from its files (`Map` or object: file name -> `Uint8Array`/`ArrayBuffer`;
/// config.json, tokenizer.json, preprocessor_config.json, model.safetensors or the index and its
/// shards, plus tokenizer_config.json, chat_template.json/.jinja, generation_config.json when the
/// model has them). `options`: `{dtype: "f32"|"f16", source: "name for messages"}`.
/// `on_progress({stage, done, total, item})` is called for each file copied (stage "copy", in
/// bytes) and each model part uploaded (stage "load").
#[wasm_bindgen(js_name = loadModel)]
pub async fn load_model_js(
    files: JsValue,
    options: JsValue,
    on_progress: Option<Function>,
) -> Result<WebModel, JsValue> {
    let t0 = Instant::now();
    let options: LoadOptionsJs = parse_options(&options, "load options")?;
    let source = options.source.unwrap_or_else(|| "the files given".into());
    let dtype = match options.dtype.as_deref() {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some(other) => {
            return Err(js_error(format!(
                "dtype must be \"f32\" or \"f16\", got {other:?}"
            )))
        }
    };
    let wgsl_kernels = match options.kernels.as_deref() {
        None | Some("wgsl") => true,
        Some("burn") => false,
        Some(other) => {
            return Err(js_error(format!(
                "kernels must be \"wgsl\" or \"burn\", got {other:?}"
            )))
        }
    };
    let quant = match options.quant.as_deref() {
        None => None,
        Some(q) => Some(
            Scheme::parse(q)
                .ok_or_else(|| js_error(format!("quant must be \"q8\" or \"q4\", got {q:?}")))?,
        ),
    };
    let files = collect_files(&files)?;
    let shards = weight_files(&files)?;
    let weight_bytes: usize = shards.iter().map(|s| files[s].length() as usize).sum();
    if weight_bytes > WASM_WEIGHT_BUDGET {
        return Err(js_error(format!(
            "this checkpoint's weights are {} but the browser build holds them in WebAssembly memory, which is at most 4 GiB per page; use a smaller model or the native qwen-vl CLI",
            mib(weight_bytes as u64)
        )));
    }

    let device = web_device().await?;
    if !subgroups_enabled() {
        return Err(js_error(
            "this browser's WebGPU does not offer the \"subgroups\" feature, which Burn's matrix kernels need in the browser; use a Chromium-based browser (Chrome or Edge 134 or later)",
        ));
    }
    let config_text = required_text(&files, "config.json")?;
    let config = ModelConfig::from_json_str(&config_text, "config.json").map_err(js_error)?;
    let tokenizer = QwenTokenizer::from_files(&TokenizerFiles {
        tokenizer_json: required_text(&files, "tokenizer.json")?,
        tokenizer_config_json: text_file(&files, "tokenizer_config.json")?,
        chat_template_jinja: text_file(&files, "chat_template.jinja")?,
        chat_template_json: text_file(&files, "chat_template.json")?,
        processor_config_json: text_file(&files, "processor_config.json")?,
        generation_config_json: text_file(&files, "generation_config.json")?,
        config_json: text_file(&files, "config.json")?,
    })
    .map_err(js_error)?;
    let preprocess = PreprocessConfig::from_json_str(
        &required_text(&files, "preprocessor_config.json")?,
        "preprocessor_config.json",
    )
    .map_err(js_error)?;

    let mut buffers = Vec::with_capacity(shards.len());
    let mut copied = 0usize;
    for name in &shards {
        let bytes = copy_in(name, &files[name])?;
        copied += bytes.len();
        buffers.push((name.clone(), bytes));
        report(
            &on_progress,
            json!({"stage": "copy", "done": copied, "total": weight_bytes, "item": name}),
        );
    }
    let scale_bytes = if device.handle.adapter.shader_f16 {
        2
    } else {
        4
    };
    let (on_device, largest, largest_name) = device_bytes(&buffers, dtype, quant, scale_bytes);
    let max_buffer = device.limits.max_buffer_size;
    if largest > max_buffer {
        return Err(js_error(format!(
            "this GPU cannot hold the model: tensor `{largest_name}` needs {} in one buffer but the adapter's maxBufferSize is {}",
            mib(largest),
            mib(max_buffer)
        )));
    }
    report(
        &on_progress,
        json!({"stage": "device", "done": 0, "total": on_device,
               "item": format!("{} of weights on the GPU", mib(on_device))}),
    );
    let ckpt = Checkpoint::from_buffers(&source, buffers).map_err(js_error)?;
    let mut handle = device.handle.clone();
    handle.limits.wgsl_kernels &= wgsl_kernels;
    let model = load_model(&ckpt, config, handle, dtype, quant, &mut |p: Progress| {
        report(
            &on_progress,
            json!({"stage": p.stage, "done": p.done, "total": p.total, "item": p.item}),
        )
    })
    .map_err(js_error)?;
    drop(ckpt);
    let model_id = model_identity(&config_text, &source, dtype, model.quant);
    let rt = Runtime::from_parts(
        model,
        tokenizer,
        preprocess,
        PathBuf::from(source),
        model_id,
    );
    Ok(WebModel {
        rt: Rc::new(rt),
        busy: Rc::new(Cell::new(false)),
        load_ms: t0.elapsed().as_secs_f64() * 1000.0,
        weight_bytes_on_device: on_device,
        pipeline: Rc::new(RefCell::new(None)),
        chat: Rc::new(RefCell::new(None)),
    })
}

/// A model loaded on the WebGPU device. One request runs on it at a time.
#[wasm_bindgen]
pub struct WebModel {
    rt: Rc<Runtime>,
    busy: Rc<Cell<bool>>,
    load_ms: f64,
    weight_bytes_on_device: u64,
    /// The pipeline of the last `pipeline` call, kept (with its caches) while its options stay
    /// the same. Taken out while a run is in flight.
    pipeline: Rc<RefCell<Option<KeptPipeline>>>,
    /// The conversation of `chat`. Taken out while a turn is in flight.
    chat: Rc<RefCell<Option<ChatState>>>,
}

/// Marks the model busy for one request; a second request while one runs is refused, since the
/// requests share the model's caches and the device queue.
struct BusyGuard(Rc<Cell<bool>>);

impl BusyGuard {
    fn take(busy: &Rc<Cell<bool>>) -> Result<Self, JsValue> {
        if busy.replace(true) {
            return Err(js_error(
                "a request is already running on this model; wait for it to finish",
            ));
        }
        Ok(BusyGuard(busy.clone()))
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Extends a borrow of the runtime to `'static` so a [`Session`] or [`Pipeline`] can live in
/// the `WebModel` next to the `Rc` that owns the runtime.
///
/// # Safety
/// The caller keeps a clone of `rt` alive for as long as anything made from the returned
/// reference, and drops that thing first (see [`KeptPipeline`] and [`ChatState`], whose borrowing
/// field is declared before their `rt` field, so it is dropped first). The reference never
/// leaves this module.
unsafe fn extend_runtime(rt: &Rc<Runtime>) -> &'static Runtime {
    // An Rc's value never moves while a clone is alive.
    unsafe { &*Rc::as_ptr(rt) }
}

#[wasm_bindgen]
impl WebModel {
    /// The family: "qwen2_vl", "qwen2_5_vl" or "qwen3_vl".
    #[wasm_bindgen(getter)]
    pub fn family(&self) -> String {
        self.rt.family().to_string()
    }

    /// Milliseconds the load took (device set-up, parsing, copying and uploading the weights).
    #[wasm_bindgen(getter, js_name = loadMs)]
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Bytes of weights on the GPU.
    #[wasm_bindgen(getter, js_name = weightBytes)]
    pub fn weight_bytes(&self) -> f64 {
        self.weight_bytes_on_device as f64
    }

    /// The adapter, as in the `adapter` field of the generate output.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> JsValue {
        to_js(&serde_json::to_value(&self.rt.model.device.adapter).unwrap_or(Value::Null))
    }

    /// Generates a reply to `prompt` about `image` (encoded PNG/JPEG/WebP/GIF bytes, or null).
    /// `options`: `{max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, system,
    /// max_context}` (temperature 0 = greedy). `on_text(piece)` receives the text as it is
    /// generated. Resolves to the `qwen-vl generate --json` object.
    pub fn generate(
        &self,
        image: Option<Uint8Array>,
        prompt: String,
        options: JsValue,
        on_text: Option<Function>,
    ) -> Promise {
        let rt = self.rt.clone();
        let busy = self.busy.clone();
        let load_ms = self.load_ms;
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = BusyGuard::take(&busy)?;
            generate(&rt, image, prompt, &options, on_text, load_ms).await
        })
    }

    /// Runs the multi-phase pipeline (reasoning steps, a box for each, a caption of each box,
    /// the answer) on `image` (encoded bytes) for `question`. `options`: the `qwen-vl pipeline`
    /// flags by their JSON names (see [`PipelineOptionsJs`]); `plan_steps: N` forces N synthetic
    /// steps with boxes (a benchmark and test mode). `on_text(phase, piece)` receives the model's
    /// text as it is generated, `phase` being "reasoning", "grounding", "evidence" or
    /// "synthesis". Resolves to the `qwen-vl pipeline --json` report. The image embeddings and
    /// the image + question prefix stay cached for the next call with the same options.
    pub fn pipeline(
        &self,
        image: Uint8Array,
        question: String,
        options: JsValue,
        on_text: Option<Function>,
    ) -> Promise {
        let rt = self.rt.clone();
        let busy = self.busy.clone();
        let kept = self.pipeline.clone();
        let load_ms = self.load_ms;
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = BusyGuard::take(&busy)?;
            let o: PipelineOptionsJs = parse_options(&options, "pipeline options")?;
            let image =
                crate::image::decode_image(&image.to_vec(), "the image").map_err(js_error)?;
            if question.trim().is_empty() {
                return Err(js_error("the question is empty"));
            }
            // Reuse the kept pipeline (and its caches) only if it was built with these options.
            let previous = kept.borrow_mut().take().filter(|k| k.options == o);
            let mut state = match previous {
                Some(k) => k,
                None => KeptPipeline::new(&rt, o)?,
            };
            let result = state
                .pipeline
                .run_async(&image, &question, &mut |phase, piece| {
                    if let Some(f) = &on_text {
                        let _ = f.call2(
                            &JsValue::NULL,
                            &JsValue::from_str(phase),
                            &JsValue::from_str(piece),
                        );
                    }
                })
                .await
                .map_err(js_error)?;
            // Kept only after a run that finished: a failed one may leave a slot half-written.
            *kept.borrow_mut() = Some(state);
            let mut report = serde_json::to_value(&result).map_err(js_error)?;
            if let Value::Object(map) = &mut report {
                map.insert(
                    "timings_ms".into(),
                    json!({"load": load_ms, "total": result.total_ms}),
                );
                map.insert("adapter".into(), json!(rt.model.device.adapter));
            }
            Ok(to_js(&report))
        })
    }

    /// One chat turn: `message` from the user about `image` (encoded bytes, or null for text
    /// only), answered with the conversation so far in context. The KV cache keeps the previous
    /// turns, so only the new message is computed. A different image (or `chatReset`) starts a
    /// new conversation. When the context is full the oldest exchanges are dropped (the image
    /// moves to the first remaining turn); a message that does not fit alone is refused.
    /// `options`: `{max_new_tokens, temperature, top_k, top_p, seed, system, max_context}`.
    /// Resolves to `{text, token_ids, finish_reason, turn, prompt_tokens, reused_tokens,
    /// computed_tokens, generated_tokens, vision_cache_hits, dropped_turns, capacity,
    /// timings_ms}`.
    pub fn chat(
        &self,
        image: Option<Uint8Array>,
        message: String,
        options: JsValue,
        on_text: Option<Function>,
    ) -> Promise {
        let rt = self.rt.clone();
        let busy = self.busy.clone();
        let kept = self.chat.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = BusyGuard::take(&busy)?;
            let o: ChatOptionsJs = parse_options(&options, "chat options")?;
            if message.trim().is_empty() {
                return Err(js_error("the message is empty"));
            }
            let image = match image {
                Some(bytes) => Some(
                    crate::image::decode_image(&bytes.to_vec(), "the image").map_err(js_error)?,
                ),
                None => None,
            };
            let previous = kept
                .borrow_mut()
                .take()
                .filter(|c| c.max_context == o.max_context);
            let mut state = match previous {
                Some(c) => c,
                None => ChatState::new(&rt, o.max_context)?,
            };
            let result = state.turn(image, message, &o, on_text.as_ref()).await;
            *kept.borrow_mut() = Some(state);
            result.map(|v| to_js(&v))
        })
    }

    /// Forgets the conversation of `chat` (its KV cache and history).
    #[wasm_bindgen(js_name = chatReset)]
    pub fn chat_reset(&self) -> Result<(), JsValue> {
        if self.busy.get() {
            return Err(js_error(
                "a request is running on this model; reset the chat when it has finished",
            ));
        }
        *self.chat.borrow_mut() = None;
        Ok(())
    }
}

/// Options of [`WebModel::pipeline`]: the `qwen-vl pipeline` flags by their JSON names, with
/// browser-sized defaults (fewer visual tokens than the CLI's 1024: a browser GPU, let alone
/// SwiftShader, is slow at that size).
#[derive(Deserialize, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct PipelineOptionsJs {
    max_steps: usize,
    max_regions: usize,
    /// Visual tokens the image gets at least in phases 1, 2 and 4.
    main_tokens: usize,
    /// Visual tokens each crop gets at most in phase 3.
    crop_tokens: usize,
    steps_tokens: usize,
    box_tokens: usize,
    caption_tokens: usize,
    answer_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    /// Vision cache and prefix KV reuse (false: every phase recomputes everything).
    caches: bool,
    vision_cache_mb: usize,
    /// KV positions per slot (default: what `kv_budget_mb` holds).
    max_context: Option<usize>,
    kv_budget_mb: usize,
    /// Force this many synthetic steps with boxes, every phase generating exactly its budget.
    plan_steps: Option<usize>,
}

impl Default for PipelineOptionsJs {
    fn default() -> Self {
        PipelineOptionsJs {
            max_steps: 4,
            max_regions: 4,
            main_tokens: 256,
            crop_tokens: 128,
            steps_tokens: 256,
            box_tokens: 64,
            caption_tokens: 64,
            answer_tokens: 160,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            caches: true,
            vision_cache_mb: 128,
            max_context: None,
            kv_budget_mb: 256,
            plan_steps: None,
        }
    }
}

impl PipelineOptionsJs {
    fn to_options(&self) -> Result<PipelineOptions, JsValue> {
        check_sampling(self.temperature, self.top_p)?;
        if self.max_steps == 0 || self.main_tokens == 0 || self.crop_tokens == 0 {
            return Err(js_error(
                "max_steps, main_tokens and crop_tokens must be at least 1",
            ));
        }
        if self.plan_steps == Some(0) {
            return Err(js_error("plan_steps must be at least 1"));
        }
        Ok(PipelineOptions {
            max_steps: self.max_steps.max(self.plan_steps.unwrap_or(0)),
            max_regions: self.max_regions,
            main_min_tokens: self.main_tokens,
            crop_max_tokens: self.crop_tokens,
            steps_tokens: self.steps_tokens,
            box_tokens: self.box_tokens,
            caption_tokens: self.caption_tokens,
            answer_tokens: self.answer_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            caches: self.caches,
            vision_cache_bytes: self.vision_cache_mb << 20,
            max_context: self.max_context,
            kv_budget_bytes: self.kv_budget_mb << 20,
            plan: self.plan_steps.map(|steps| FixedPlan { steps }),
            ..Default::default()
        })
    }
}

/// A pipeline kept between calls, with the options it was built from.
struct KeptPipeline {
    // Declared before `rt`: it borrows the runtime and must be dropped first.
    pipeline: Pipeline<'static>,
    options: PipelineOptionsJs,
    _rt: Rc<Runtime>,
}

impl KeptPipeline {
    fn new(rt: &Rc<Runtime>, options: PipelineOptionsJs) -> Result<Self, JsValue> {
        // SAFETY: `_rt` keeps the runtime alive and is dropped after `pipeline`.
        let runtime = unsafe { extend_runtime(rt) };
        let pipeline = Pipeline::new(runtime, options.to_options()?).map_err(js_error)?;
        Ok(KeptPipeline {
            pipeline,
            options,
            _rt: rt.clone(),
        })
    }
}

/// Options of [`WebModel::chat`].
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ChatOptionsJs {
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    system: Option<String>,
    /// KV positions of the conversation (default: what 256 MiB holds); changing it starts a
    /// new conversation.
    max_context: Option<usize>,
}

impl Default for ChatOptionsJs {
    fn default() -> Self {
        ChatOptionsJs {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            system: None,
            max_context: None,
        }
    }
}

/// The conversation of [`WebModel::chat`].
struct ChatState {
    // Declared before `rt`: it borrows the runtime and must be dropped first.
    session: Session<'static>,
    max_context: Option<usize>,
    /// The image the conversation is about.
    image: Option<::image::RgbImage>,
    /// User and assistant messages so far (no system message).
    history: Vec<ChatMessage>,
    turns: usize,
    _rt: Rc<Runtime>,
}

impl ChatState {
    fn new(rt: &Rc<Runtime>, max_context: Option<usize>) -> Result<Self, JsValue> {
        // SAFETY: `_rt` keeps the runtime alive and is dropped after `session`.
        let runtime = unsafe { extend_runtime(rt) };
        let session = Session::new(
            runtime,
            SessionOptions {
                max_context,
                kv_budget_bytes: 256 << 20,
                ..Default::default()
            },
        )
        .map_err(js_error)?;
        Ok(ChatState {
            session,
            max_context,
            image: None,
            history: Vec::new(),
            turns: 0,
            _rt: rt.clone(),
        })
    }

    async fn turn(
        &mut self,
        image: Option<::image::RgbImage>,
        message: String,
        o: &ChatOptionsJs,
        on_text: Option<&Function>,
    ) -> Result<Value, JsValue> {
        check_sampling(o.temperature, o.top_p)?;
        if image != self.image {
            // A new image starts a new conversation; its image tokens carry the new image's
            // hash, so nothing of the old KV cache can be reused for it anyway.
            self.image = image;
            self.history.clear();
            self.turns = 0;
        }
        let mut content = Vec::new();
        if self.history.is_empty() && self.image.is_some() {
            content.push(Content::Image);
        }
        content.push(Content::Text(message));
        self.history.push(ChatMessage {
            role: "user".into(),
            content,
        });
        let options = GenerateOptions {
            max_new_tokens: o.max_new_tokens,
            sampling: Sampling {
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
                seed: o.seed,
            },
            ..Default::default()
        };
        let images: Vec<::image::RgbImage> = self.image.iter().cloned().collect();
        let rt = self.session.runtime();
        let mut dropped = 0;
        // Context policy (as `qwen-vl chat`): drop the oldest exchanges, moving the image to the
        // first remaining turn, until the prompt fits; a message that alone does not fit is
        // refused.
        let (out, stats) = loop {
            let mut messages = Vec::new();
            if let Some(s) = &o.system {
                messages.push(ChatMessage::system(s.clone()));
            }
            messages.extend(self.history.iter().cloned());
            let result = self
                .session
                .generate_async(&messages, &images, &rt.preprocess, &options, &mut |piece| {
                    if let Some(f) = on_text {
                        let _ = f.call1(&JsValue::NULL, &JsValue::from_str(piece));
                    }
                })
                .await;
            match result {
                Ok(r) => break r,
                Err(crate::Error::BadInput(msg))
                    if msg.contains("context holds") && self.history.len() > 1 =>
                {
                    let old: Vec<ChatMessage> = self.history.drain(..2).collect();
                    if old.iter().any(|m| m.content.contains(&Content::Image)) {
                        if let Some(first) = self.history.first_mut() {
                            first.content.insert(0, Content::Image);
                        }
                    }
                    dropped += 1;
                }
                Err(e) => {
                    self.history.pop();
                    return Err(js_error(e));
                }
            }
        };
        self.history.push(ChatMessage {
            role: "assistant".into(),
            content: vec![Content::Text(out.text.clone())],
        });
        self.turns += 1;
        Ok(json!({
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "turn": self.turns,
            "prompt_tokens": stats.prompt_tokens,
            "reused_tokens": stats.reused_tokens,
            "computed_tokens": stats.computed_tokens,
            "generated_tokens": stats.generated_tokens,
            "vision_cache_hits": stats.vision_cache_hits,
            "dropped_turns": dropped,
            "capacity": self.session.capacity(),
            "timings_ms": {
                "vision": out.timings.vision,
                "prefill": out.timings.prefill,
                "decode": out.timings.decode,
            },
        }))
    }
}

fn check_sampling(temperature: f32, top_p: f32) -> Result<(), JsValue> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(js_error(format!("top_p must be in (0, 1], got {top_p}")));
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(js_error(format!(
            "temperature must be >= 0, got {temperature}"
        )));
    }
    Ok(())
}

async fn generate(
    rt: &Runtime,
    image: Option<Uint8Array>,
    prompt: String,
    options: &JsValue,
    on_text: Option<Function>,
    load_ms: f64,
) -> Result<JsValue, JsValue> {
    let o: GenerateOptionsJs = parse_options(options, "generate options")?;
    check_sampling(o.temperature, o.top_p)?;
    let mut request = Request::user(prompt);
    request.system = o.system;
    if let Some(bytes) = image {
        let img = crate::image::decode_image(&bytes.to_vec(), "the image").map_err(js_error)?;
        request.images.push(img);
    }
    let options = GenerateOptions {
        max_new_tokens: o.max_new_tokens,
        sampling: Sampling {
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            seed: o.seed,
        },
        ignore_eos: o.ignore_eos,
        max_context: o.max_context,
        ..Default::default()
    };
    let out = rt
        .generate_async(&request, &options, &mut |piece| {
            if let Some(f) = &on_text {
                let _ = f.call1(&JsValue::NULL, &JsValue::from_str(piece));
            }
        })
        .await
        .map_err(js_error)?;
    Ok(to_js(&out.report(rt, load_ms)))
}
