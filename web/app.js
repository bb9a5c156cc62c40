// The demo page: picks/downloads a checkpoint (cached with the Cache API), drives the engine (in a
// Web Worker when WebGPU is available there), streams the answer and shows timings; runs the
// multi-phase pipeline (phases as they run, then the boxes over the image with each step's
// evidence beside them, the answer, per-phase costs and cache figures); holds a multi-turn chat.
// Automation:
// ?model=URL&image=URL&prompt=TEXT&max_new_tokens=N&autorun=1[&report=URL] runs greedy decoding
// (temperature 0, ignore_eos, exactly N tokens) and writes the `qwen-vl generate --json` object
// into <pre id="result"> (and POSTs it to `report`, same origin); on failure {"error": "..."}.
// ?mode=pipeline&model=URL&image=URL&question=TEXT&autorun=1[&report=URL] runs the pipeline
// (greedy) and writes the `qwen-vl pipeline --json` report the same way; the pipeline options
// can be given by their names (plan_steps=N forces N synthetic steps with boxes, main_tokens,
// crop_tokens, steps_tokens, box_tokens, caption_tokens, answer_tokens, max_steps, max_regions,
// caches=0, max_context).
// Without ?model the page opens on the bundled micro model with its example scene and question
// (and autorun uses them: ?mode=pipeline&autorun=1 runs the example).

const CACHE_NAME = 'qwen-vl-models-v1';
const REQUIRED = ['config.json', 'tokenizer.json', 'preprocessor_config.json'];
const OPTIONAL = [
  'tokenizer_config.json',
  'chat_template.json',
  'chat_template.jinja',
  'processor_config.json',
  'generation_config.json',
];
const INDEX = 'model.safetensors.index.json';
// A wasm32 page holds at most 4 GiB; the weights are copied into it before the upload.
const WASM_WEIGHT_BUDGET = 3 * 2 ** 30;

// The bundled micro Qwen2-VL (trained on generated shape scenes, 44 MB) and one scene it has not
// seen, relative to this page (web/ in the repository, served from the repository root).
const DEFAULT_MODEL = new URL('../models/micro-qwen2-vl/', location.href).pathname;
const EXAMPLE_IMAGE = new URL('example-scene.png', location.href).pathname;
const EXAMPLE_QUESTION = 'Is the blue diamond to the left or to the right of the purple diamond?';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// Measurements for tools that drive the page (tests/web/e2e.mjs).
const stats = (window.__qwenVl = { engine: null });

// ---------- errors in plain words ----------

function explain(message) {
  const m = String(message);
  if (/no webgpu|navigator\.gpu/i.test(m)) {
    return 'This browser does not offer WebGPU. Use a recent Chrome or Edge (or another browser with WebGPU enabled), on http://localhost or https.';
  }
  if (/dynamically imported module|pkg\/qwen_vl|could not start/i.test(m)) {
    return `The page's WebAssembly build is missing or broken (web/pkg); run web/build.sh and reload. Details: ${m}`;
  }
  if (/extension 'subgroups'|"subgroups" feature/i.test(m)) {
    return 'This browser\'s WebGPU lacks the "subgroups" feature, which the model\'s matrix kernels need; use a Chromium-based browser (Chrome or Edge 134 or later).';
  }
  if (/WebGPU could not be initialised|no adapter|requestAdapter/i.test(m)) {
    return `WebGPU is present but no GPU adapter could be opened (it may be disabled or blocklisted for this GPU). Details: ${m}`;
  }
  if (/out of memory|OutOfMemory|allocation failed|memory allocation|Array buffer allocation/i.test(m)) {
    return `Out of memory: ${m}. Try a smaller model, f16 weights, or close other tabs.`;
  }
  if (/device (was )?lost|DeviceLost/i.test(m)) {
    return `The GPU device was lost (driver reset or out of memory): ${m}. Reload the page to try again.`;
  }
  if (/Failed to fetch|NetworkError|HTTP \d+/i.test(m)) {
    return `Could not download the model files: ${m}`;
  }
  return m;
}

function showError(message) {
  const el = $('error');
  el.textContent = explain(message);
  el.hidden = false;
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}

// ---------- the engine (worker or main thread) ----------

class EngineClient {
  constructor() {
    this.nextId = 1;
    this.pending = new Map();
    this.worker = null;
    this.handle = null;
    this.where = null;
  }

  onMessage(m) {
    const p = this.pending.get(m.id);
    if (m.type === 'fatal') {
      for (const q of this.pending.values()) q.reject(new Error(m.error));
      this.pending.clear();
      this.broken = m.error;
      return;
    }
    if (!p) return;
    if (m.type === 'reply') {
      this.pending.delete(m.id);
      if (m.fatal) this.broken = m.error;
      if (m.ok) p.resolve(m.value);
      else p.reject(new Error(m.error));
    } else {
      p.onEvent?.(m);
    }
  }

  call(op, payload = {}, transfer = [], onEvent = null) {
    if (this.broken) {
      return Promise.reject(new Error(`the model engine stopped after an internal failure (${this.broken}); reload the page`));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onEvent });
      const msg = { id, op, ...payload };
      if (this.worker) this.worker.postMessage(msg, transfer);
      else this.handle(msg);
    });
  }

  async start() {
    // A module worker first (WebGPU in workers is in Chromium since 113); `?engine=main` keeps the
    // model on the main thread (DevTools then shows WebGPU's shader messages in the page console).
    try {
      if (params.get('engine') === 'main') throw new Error('?engine=main');
      const workerUrl = new URL('./worker.js', import.meta.url);
      if (params.get('debug')) workerUrl.searchParams.set('debug', params.get('debug'));
      this.worker = new Worker(workerUrl, { type: 'module' });
      this.worker.onmessage = (e) => this.onMessage(e.data);
      this.worker.onerror = (e) => {
        e.preventDefault?.();
        this.onMessage({ type: 'fatal', error: e.message || 'the model worker could not start (is web/pkg built? run web/build.sh)' });
      };
      const info = await this.call('init');
      if (!info.noWebGpu) {
        this.where = 'worker';
        return info;
      }
      this.worker.terminate();
    } catch (e) {
      this.worker?.terminate();
      if (!('gpu' in navigator)) throw e;
      console.warn('model worker unavailable, running on the main thread:', e);
    }
    this.worker = null;
    this.broken = null;
    this.pending.clear();
    const { createEngine } = await import('./engine.js');
    this.handle = createEngine((m) => this.onMessage(m), { debugShaders: params.get('debug') === 'shaders', debugCounts: params.get('debug') === 'counts' });
    this.where = 'main thread';
    const info = await this.call('init');
    if (info.noWebGpu) throw new Error('no WebGPU: navigator.gpu is missing');
    return info;
  }
}

const engine = new EngineClient();

// ---------- model files ----------

function baseUrl(url) {
  const u = new URL(url, location.href);
  if (!u.pathname.endsWith('/')) u.pathname += '/';
  u.search = '';
  u.hash = '';
  return u.href;
}

async function openCache() {
  try {
    return 'caches' in self ? await caches.open(CACHE_NAME) : null;
  } catch {
    return null; // e.g. an insecure context: everything is downloaded each time
  }
}

async function readBody(response, onBytes) {
  if (!response.body) return new Uint8Array(await response.arrayBuffer());
  const reader = response.body.getReader();
  const chunks = [];
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    n += value.length;
    onBytes(value.length);
  }
  const out = new Uint8Array(n);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function fmtBytes(n) {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

// Downloads (or reads from the cache) every file of the checkpoint at `base`.
// Returns {files: {name: ArrayBuffer}, downloaded, fromCache}.
async function fetchCheckpoint(base, onProgress) {
  const cache = await openCache();
  const manifestUrl = `${base}.qwen-vl-manifest.json`;
  let manifest = null;
  if (cache) {
    const hit = await cache.match(manifestUrl);
    if (hit) manifest = await hit.json().catch(() => null);
  }
  const files = {};
  let downloaded = 0;
  let fromCache = 0;
  let expected = manifest?.total ?? 0;
  let done = 0;
  const progress = (item) => onProgress({ done, total: Math.max(expected, done), item, downloaded, fromCache });

  async function get(name, optional) {
    const url = base + name;
    if (cache) {
      const hit = await cache.match(url);
      if (hit) {
        const bytes = new Uint8Array(await hit.arrayBuffer());
        fromCache += bytes.length;
        done += bytes.length;
        progress(`${name} (cached)`);
        return bytes;
      }
    }
    let response;
    try {
      response = await fetch(url);
    } catch (e) {
      throw new Error(`Failed to fetch ${url}: ${e.message}`);
    }
    if (!response.ok) {
      if (optional && (response.status === 404 || response.status === 403)) return null;
      throw new Error(`HTTP ${response.status} for ${url}${REQUIRED.includes(name) ? ` (${name} is required)` : ''}`);
    }
    const len = Number(response.headers.get('content-length')) || 0;
    if (!manifest && len && /\.safetensors$/.test(name)) expected += len;
    const bytes = await readBody(response, (k) => {
      done += k;
      downloaded += k;
      progress(name);
    });
    if (cache) {
      try {
        await cache.put(url, new Response(bytes, { headers: { 'content-type': 'application/octet-stream' } }));
      } catch (e) {
        console.warn(`not cached (${e.name}): ${name}`);
      }
    }
    return bytes;
  }

  let names = manifest?.files;
  if (!names) {
    names = [];
    for (const name of [...REQUIRED, ...OPTIONAL, INDEX]) {
      const bytes = await get(name, !REQUIRED.includes(name));
      if (bytes) {
        files[name] = bytes.buffer;
        names.push(name);
      }
    }
    if (files[INDEX]) {
      let index;
      try {
        index = JSON.parse(new TextDecoder().decode(files[INDEX]));
      } catch (e) {
        throw new Error(`${INDEX} is not valid JSON (${e.message})`);
      }
      const shards = [...new Set(Object.values(index.weight_map ?? {}))].sort();
      if (!shards.length) throw new Error(`${INDEX} lists no weight files`);
      const total = index.metadata?.total_size;
      if (total > WASM_WEIGHT_BUDGET) {
        throw new Error(`this checkpoint's weights are ${fmtBytes(total)}, more than the browser build can hold in WebAssembly memory (4 GiB per page); use a smaller model or the native qwen-vl CLI`);
      }
      if (total) expected = total;
      names.push(...shards);
    } else {
      names.push('model.safetensors');
    }
  }
  for (const name of names) {
    if (files[name]) continue;
    const bytes = await get(name, false);
    files[name] = bytes.buffer;
  }
  if (cache && !manifest) {
    const total = names
      .filter((n) => /\.safetensors$/.test(n))
      .reduce((s, n) => s + files[n].byteLength, 0);
    await cache
      .put(manifestUrl, new Response(JSON.stringify({ files: names, total }), { headers: { 'content-type': 'application/json' } }))
      .catch(() => {});
  }
  return { files, downloaded, fromCache };
}

const WANTED = new Set([...REQUIRED, ...OPTIONAL, INDEX]);
const wanted = (name) => WANTED.has(name) || name.endsWith('.safetensors');

async function filesFromDirectoryHandle(dir) {
  const files = {};
  for await (const [name, handle] of dir.entries()) {
    if (handle.kind === 'file' && wanted(name)) {
      files[name] = await (await handle.getFile()).arrayBuffer();
    }
  }
  return files;
}

async function filesFromFileList(list) {
  const files = {};
  for (const f of list) {
    // webkitRelativePath is `folder/name`; only files directly in the picked folder count.
    const parts = (f.webkitRelativePath || f.name).split('/');
    if (parts.length > 2) continue;
    if (wanted(f.name)) files[f.name] = await f.arrayBuffer();
  }
  return files;
}

// ---------- loading ----------

let loaded = null;

function setBar(bar, label, done, total, text) {
  $(bar).max = total || 1;
  $(bar).value = Math.min(done, total || 1);
  $(label).textContent = text;
}

async function loadFiles(files, source) {
  const names = Object.keys(files);
  if (!names.length) throw new Error('no checkpoint files were found in that folder (expected config.json, tokenizer.json, *.safetensors, …)');
  $('model-status').textContent = `Loading ${source}…`;
  $('generate').disabled = true;
  const options = { dtype: $('dtype').value, source };
  if (params.get('kernels')) options.kernels = params.get('kernels');
  const transfer = Object.values(files);
  const t0 = performance.now();
  const info = await engine.call('load', { files, options }, transfer, (p) => {
    if (p.type !== 'progress') return;
    if (p.stage === 'copy') setBar('load-progress', 'load-label', p.done, p.total * 2, `copying weights: ${fmtBytes(p.done)} / ${fmtBytes(p.total)}`);
    else if (p.stage === 'device') setBar('load-progress', 'load-label', 1, 2, p.item);
    else setBar('load-progress', 'load-label', p.total + p.done, p.total * 2, `uploading ${p.item} (${p.done}/${p.total})`);
  });
  stats.loadMs = info.load_ms;
  stats.loadWallMs = performance.now() - t0;
  setBar('load-progress', 'load-label', 1, 1, `loaded in ${(info.load_ms / 1000).toFixed(2)} s`);
  loaded = { ...info, source };
  stats.model = source;
  $('model-status').textContent = `Loaded ${info.family} from ${source}: ${fmtBytes(info.weight_bytes)} of weights on the GPU, in ${(info.load_ms / 1000).toFixed(2)} s (${engine.where}).`;
  updateGenerateButton();
  return info;
}

async function loadFromUrl(url) {
  try {
    return await downloadAndLoad(baseUrl(url));
  } catch (e) {
    $('model-status').textContent = loaded ? `Still loaded: ${loaded.family} from ${loaded.source}.` : 'No model loaded.';
    throw e;
  }
}

async function downloadAndLoad(base) {
  $('model-status').textContent = `Downloading ${base}…`;
  const t0 = performance.now();
  const { files, downloaded, fromCache } = await fetchCheckpoint(base, (p) => {
    setBar('download-progress', 'download-label', p.done, p.total, `${fmtBytes(p.done)}${p.total > p.done ? ` / ${fmtBytes(p.total)}` : ''} · ${p.item}`);
  });
  stats.downloadMs = performance.now() - t0;
  stats.downloadedBytes = downloaded;
  stats.cachedBytes = fromCache;
  const total = downloaded + fromCache;
  setBar('download-progress', 'download-label', 1, 1, `${fmtBytes(total)} in ${(stats.downloadMs / 1000).toFixed(2)} s${fromCache ? ` (${fmtBytes(fromCache)} from the browser cache)` : ''}`);
  return loadFiles(files, base);
}

// ---------- image ----------

let imageBytes = null;

async function setImage(blobOrBytes, name) {
  const blob = blobOrBytes instanceof Blob ? blobOrBytes : new Blob([blobOrBytes]);
  imageBytes = await blob.arrayBuffer();
  const img = $('image-preview');
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.alt = name;
  $('image-frame').hidden = false;
  $('drop-hint').firstChild.textContent = 'Drop another image, or ';
  imageVersion += 1;
  updateGenerateButton();
}

let imageVersion = 0;

function updateGenerateButton() {
  $('generate').disabled = !loaded || running;
  $('run-pipeline').disabled = !loaded || running || !imageBytes;
  $('chat-send').disabled = !loaded || running;
}

// ---------- generation ----------

let running = false;

function readOptions() {
  return {
    max_new_tokens: Number($('max-new-tokens').value) || 128,
    temperature: Number($('temperature').value) || 0,
    top_k: Number($('top-k').value) || 0,
    top_p: Number($('top-p').value) || 1,
    seed: Number($('seed').value) || 0,
    ignore_eos: $('ignore-eos').checked,
  };
}

async function generate(options) {
  if (!loaded) throw new Error('load a model first');
  running = true;
  updateGenerateButton();
  $('output').textContent = '';
  $('stats').textContent = 'running the vision tower and the prompt…';
  const t0 = performance.now();
  let first = null;
  let pieces = 0;
  try {
    const image = imageBytes ? imageBytes.slice(0) : null;
    const result = await engine.call('generate', { image, prompt: $('prompt').value, options }, image ? [image] : [], (m) => {
      if (m.type !== 'text') return;
      first ??= performance.now();
      pieces += 1;
      $('output').textContent += m.piece;
      const s = (performance.now() - first) / 1000;
      $('stats').textContent = `streaming… ${pieces} pieces in ${s.toFixed(1)} s`;
    });
    const n = result.token_ids.length;
    const t = result.timings_ms;
    const decodeTps = t.decode > 0 ? (n - 1) / (t.decode / 1000) : 0;
    const prefillTps = t.prefill > 0 ? result.prompt_tokens / (t.prefill / 1000) : 0;
    Object.assign(stats, { decodeTokensPerS: decodeTps, prefillTokensPerS: prefillTps, generateWallMs: performance.now() - t0 });
    stats.runs = (stats.runs ?? 0) + 1;
    stats.last = { timings_ms: t, tokens: n, token_ids: result.token_ids };
    $('output').textContent = result.text;
    $('stats').textContent =
      `${result.prompt_tokens} prompt tokens, ${n} generated (${result.finish_reason}) · ` +
      `vision ${t.vision.toFixed(0)} ms, prefill ${t.prefill.toFixed(0)} ms (${prefillTps.toFixed(1)} tok/s), ` +
      `decode ${t.decode.toFixed(0)} ms (${decodeTps.toFixed(2)} tok/s) · load ${(t.load / 1000).toFixed(2)} s · ${result.adapter.name || result.adapter.backend}`;
    $('result').textContent = JSON.stringify(result);
    return result;
  } finally {
    running = false;
    updateGenerateButton();
  }
}

// ---------- pipeline ----------

const PHASES = ['reasoning', 'grounding', 'evidence', 'synthesis'];
// The colours of `qwen-vl pipeline --annotate` (src/pipeline/annotate.rs), by box order.
const BOX_COLOURS = ['#e6194b', '#3cb44b', '#0082c8', '#f58230', '#911eb4', '#46f0f0'];
const SVG_NS = 'http://www.w3.org/2000/svg';

const PIPELINE_FIELDS = {
  max_steps: 'p-max-steps',
  max_regions: 'p-max-regions',
  main_tokens: 'p-main-tokens',
  crop_tokens: 'p-crop-tokens',
  steps_tokens: 'p-steps-tokens',
  box_tokens: 'p-box-tokens',
  caption_tokens: 'p-caption-tokens',
  answer_tokens: 'p-answer-tokens',
  plan_steps: 'p-plan-steps',
};

function readPipelineOptions() {
  const o = {};
  for (const [name, id] of Object.entries(PIPELINE_FIELDS)) {
    const v = Number($(id).value);
    if (!Number.isInteger(v) || v < 0) throw new Error(`pipeline option ${name} must be a non-negative integer, got ${$(id).value}`);
    o[name] = v;
  }
  if (!o.plan_steps) delete o.plan_steps;
  o.caches = $('p-caches').checked;
  const g = readOptions();
  Object.assign(o, { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed });
  if (params.get('max_context')) o.max_context = Number(params.get('max_context'));
  return o;
}

// `?plan_steps=N&main_tokens=N...&caches=0` fill the pipeline options.
function applyPipelineParams() {
  for (const [name, id] of Object.entries(PIPELINE_FIELDS)) {
    if (params.get(name) !== null) $(id).value = params.get(name);
  }
  if (params.get('caches') !== null) $('p-caches').checked = params.get('caches') !== '0';
}

function el(tag, attrs = {}, text = null) {
  const e = tag === 'svg' || attrs.ns === SVG_NS ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (k !== 'ns') e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

function phaseRows(state, report = null) {
  const body = $('pipeline-phases').querySelector('tbody');
  body.textContent = '';
  for (const name of PHASES) {
    const p = report?.phases.find((x) => x.name === name);
    const status = p ? (p.note ? `done: ${p.note}` : 'done') : state[name] ?? 'waiting';
    const cells = p
      ? [name, status, p.ms.toFixed(0), p.prompt_tokens, p.reused_tokens, p.new_tokens, p.generated_tokens, p.vision_cache_hits]
      : [name, status, '', '', '', '', '', ''];
    const tr = el('tr', { class: `phase-${p ? 'done' : state[name] ?? 'waiting'}`, 'data-phase': name });
    for (const c of cells) tr.append(el('td', {}, String(c)));
    body.append(tr);
  }
}

function drawBoxes(report) {
  const [w, h] = report.image_size;
  const svg = $('pipeline-overlay');
  svg.textContent = '';
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const tag = Math.max(w, h) / 14;
  let k = 0;
  for (const step of report.steps) {
    if (!step.bbox) continue;
    const colour = BOX_COLOURS[k++ % BOX_COLOURS.length];
    const [x1, y1, x2, y2] = step.bbox;
    const g = el('g', { ns: SVG_NS, class: 'box', 'data-step': step.index });
    g.append(
      el('rect', { ns: SVG_NS, x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: colour, 'fill-opacity': 0.12, stroke: colour, 'stroke-width': 3, 'vector-effect': 'non-scaling-stroke' }),
      el('rect', { ns: SVG_NS, x: x1, y: y1, width: tag * (0.35 + 0.6 * String(step.index).length), height: tag, fill: colour }),
      el('text', { ns: SVG_NS, x: x1 + tag * 0.3, y: y1 + tag * 0.8, 'font-size': tag * 0.85, 'font-weight': 700, fill: '#fff' }, String(step.index)),
    );
    svg.append(g);
  }
}

function showEvidence(report) {
  const box = $('pipeline-evidence');
  box.textContent = '';
  if (!report.steps.length) {
    box.append(el('p', { class: 'placeholder' }, 'The model wrote no usable reasoning steps; the answer below comes straight from the image and the question.'));
    return;
  }
  const list = el('ol', { class: 'steps' });
  let k = 0;
  for (const step of report.steps) {
    const li = el('li', { 'data-step': step.index });
    const colour = step.bbox ? BOX_COLOURS[k++ % BOX_COLOURS.length] : '#9aa3b2';
    const badge = el('span', { class: 'badge' }, String(step.index));
    badge.style.background = colour;
    const head = el('div', { class: 'step-text' });
    head.append(badge, document.createTextNode(` ${step.text}`));
    li.append(head);
    const where = step.bbox
      ? `box [${step.bbox.map((v) => Math.round(v)).join(', ')}] px`
      : step.needs_vision
        ? 'needs vision; no usable box'
        : 'no visual check needed';
    li.append(el('div', { class: 'step-box' }, where));
    if (step.evidence) li.append(el('div', { class: 'step-evidence' }, `Seen: ${step.evidence}`));
    else if (step.bbox) li.append(el('div', { class: 'step-evidence none' }, 'no caption for this region'));
    list.append(li);
  }
  box.append(list);
}

function pipelineStats(report) {
  const c = report.cache;
  const v = c.vision;
  return (
    `${report.steps.filter((s) => s.bbox).length} of ${report.steps.length} steps grounded · total ${(report.total_ms / 1000).toFixed(1)} s · ` +
    `prefix KV: ${c.reused_tokens} prompt tokens reused, ${c.computed_tokens} computed · ` +
    `vision cache: ${v.hits} hits, ${v.misses} misses, ${v.entries} entries (${fmtBytes(v.bytes)}) · ` +
    `KV: ${c.kv_slots} slots × ${c.kv_capacity} positions (${fmtBytes(c.kv_bytes)}) · image ${report.image_size.join('×')} · ${report.family}`
  );
}

async function runPipeline(question, options) {
  if (!loaded) throw new Error('load a model first');
  if (!imageBytes) throw new Error('the pipeline needs an image: drop or choose one first');
  if (!question.trim()) throw new Error('write a question first');
  running = true;
  updateGenerateButton();
  const state = { reasoning: 'running' };
  const seen = [];
  phaseRows(state);
  $('pipeline-stream').textContent = '';
  $('pipeline-evidence').textContent = '';
  $('pipeline-overlay').textContent = '';
  $('pipeline-answer').textContent = '';
  $('pipeline-stats').textContent = 'encoding the image and writing the reasoning steps…';
  const fig = $('pipeline-image');
  if (fig.src) URL.revokeObjectURL(fig.src);
  fig.src = URL.createObjectURL(new Blob([imageBytes]));
  $('pipeline-figure').hidden = false;
  const t0 = performance.now();
  try {
    const image = imageBytes.slice(0);
    const report = await engine.call('pipeline', { image, question, options }, [image], (m) => {
      if (m.type !== 'text') return;
      if (seen.at(-1) !== m.phase) {
        seen.push(m.phase);
        for (const p of PHASES.slice(0, PHASES.indexOf(m.phase))) if (state[p] !== 'done') state[p] = 'done';
        state[m.phase] = 'running';
        phaseRows(state);
        $('pipeline-stream').textContent += `${$('pipeline-stream').textContent ? '\n' : ''}[${m.phase}] `;
        $('pipeline-stats').textContent = `${m.phase}…`;
      }
      const s = $('pipeline-stream');
      s.textContent = (s.textContent + m.piece).slice(-4000);
      s.scrollTop = s.scrollHeight;
    });
    phaseRows(state, report);
    drawBoxes(report);
    showEvidence(report);
    $('pipeline-answer').textContent = report.answer;
    $('pipeline-stats').textContent = pipelineStats(report);
    $('result').textContent = JSON.stringify(report);
    stats.pipeline = {
      runs: (stats.pipeline?.runs ?? 0) + 1,
      wallMs: performance.now() - t0,
      streamedPhases: seen,
      last: { total_ms: report.total_ms, phases: report.phases, cache: report.cache },
    };
    return report;
  } catch (e) {
    $('pipeline-stats').textContent = 'the pipeline stopped (see the error above)';
    throw e;
  } finally {
    running = false;
    updateGenerateButton();
  }
}

// ---------- chat ----------

let chatImageVersion = null;

function chatBubble(role, text) {
  const b = el('div', { class: `bubble ${role}` }, text);
  $('chat-log').append(b);
  $('chat-log').scrollTop = $('chat-log').scrollHeight;
  return b;
}

async function sendChat() {
  if (!loaded) throw new Error('load a model first');
  const message = $('chat-input').value.trim();
  if (!message) return;
  if (chatImageVersion !== null && chatImageVersion !== imageVersion) {
    $('chat-log').append(el('div', { class: 'divider' }, 'new conversation about the new image'));
  }
  chatImageVersion = imageVersion;
  running = true;
  updateGenerateButton();
  $('chat-input').value = '';
  chatBubble('user', message);
  const reply = chatBubble('assistant', '');
  const g = readOptions();
  const options = { max_new_tokens: g.max_new_tokens, temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed };
  try {
    const image = imageBytes ? imageBytes.slice(0) : null;
    const r = await engine.call('chat', { image, message, options }, image ? [image] : [], (m) => {
      if (m.type === 'text') reply.textContent += m.piece;
    });
    reply.textContent = r.text;
    const t = r.timings_ms;
    $('chat-stats').textContent =
      `turn ${r.turn}: ${r.prompt_tokens} prompt tokens, ${r.reused_tokens} reused from the KV cache, ${r.computed_tokens} computed, ` +
      `${r.generated_tokens} generated (${r.finish_reason}) · vision cache hits ${r.vision_cache_hits}` +
      `${r.dropped_turns ? ` · dropped ${r.dropped_turns} oldest exchange(s) to fit ${r.capacity} positions` : ''} · ` +
      `prefill ${t.prefill.toFixed(0)} ms, decode ${t.decode.toFixed(0)} ms`;
    stats.chatTurns = [...(stats.chatTurns ?? []), r];
    return r;
  } catch (e) {
    reply.remove();
    throw e;
  } finally {
    running = false;
    updateGenerateButton();
  }
}

// ---------- wiring ----------

function describeAdapter(info) {
  const a = info.adapter;
  const l = a.limits;
  const f16 = a.shader_f16 ? 'shader-f16' : 'no shader-f16';
  return `WebGPU: ${a.name || '(unnamed adapter)'} · ${a.device_type} · maxBufferSize ${fmtBytes(l.max_buffer_size)}, maxStorageBufferBindingSize ${fmtBytes(l.max_storage_buffer_binding_size)}, ${l.max_compute_invocations_per_workgroup} invocations/workgroup · ${f16} · model runs on the ${engine.where}`;
}

async function guarded(fn) {
  clearError();
  try {
    return await fn();
  } catch (e) {
    console.error(e);
    showError(e.message ?? String(e));
    throw e;
  }
}

function wire() {
  $('load-url').onclick = () => guarded(() => loadFromUrl($('model-url').value)).catch(() => {});
  $('model-url').onkeydown = (e) => {
    if (e.key === 'Enter') $('load-url').click();
  };
  $('pick-folder').onclick = async () => {
    if ('showDirectoryPicker' in window) {
      let dir;
      try {
        dir = await window.showDirectoryPicker();
      } catch {
        return; // cancelled
      }
      guarded(async () => loadFiles(await filesFromDirectoryHandle(dir), dir.name)).catch(() => {});
    } else {
      $('folder-input').click();
    }
  };
  $('folder-input').onchange = (e) => {
    const list = e.target.files;
    const name = list.length ? (list[0].webkitRelativePath || '').split('/')[0] || 'the folder' : 'the folder';
    guarded(async () => loadFiles(await filesFromFileList(list), name)).catch(() => {});
  };
  $('clear-cache').onclick = async () => {
    const ok = 'caches' in self && (await caches.delete(CACHE_NAME));
    $('download-label').textContent = ok ? 'browser cache cleared' : 'nothing cached';
  };
  $('pick-image').onclick = (e) => {
    e.preventDefault();
    $('image-input').click();
  };
  $('image-input').onchange = (e) => {
    const f = e.target.files[0];
    if (f) guarded(() => setImage(f, f.name)).catch(() => {});
  };
  const drop = $('drop');
  drop.ondragover = (e) => {
    e.preventDefault();
    drop.classList.add('over');
  };
  drop.ondragleave = () => drop.classList.remove('over');
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const f = [...e.dataTransfer.files].find((x) => x.type.startsWith('image/'));
    if (f) guarded(() => setImage(f, f.name)).catch(() => {});
    else showError('that is not an image file (PNG, JPEG, WebP or GIF)');
  };
  $('generate').onclick = () => guarded(() => generate(readOptions())).catch(() => {});
  $('run-pipeline').onclick = () => guarded(() => runPipeline($('prompt').value, readPipelineOptions())).catch(() => {});
  $('chat-send').onclick = () => guarded(sendChat).catch(() => {});
  $('chat-input').onkeydown = (e) => {
    if (e.key === 'Enter' && !$('chat-send').disabled) $('chat-send').click();
  };
  $('chat-reset').onclick = () =>
    guarded(async () => {
      if (running) throw new Error('wait for the running request to finish');
      if (loaded) await engine.call('chat-reset');
      $('chat-log').textContent = '';
      $('chat-stats').textContent = '';
      chatImageVersion = null;
    }).catch(() => {});
}

async function fetchBytes(url) {
  const r = await fetch(url).catch((e) => {
    throw new Error(`Failed to fetch ${url}: ${e.message}`);
  });
  if (!r.ok) throw new Error(`HTTP ${r.status} for ${url}`);
  return r.blob();
}

async function postReport(body) {
  const target = params.get('report');
  if (!target) return;
  const url = new URL(target, location.href);
  if (url.origin !== location.origin) {
    console.warn(`report URL ${url} is not on this origin; not posting`);
    return;
  }
  await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body }).catch((e) =>
    console.warn(`report POST failed: ${e.message}`),
  );
}

async function autorun() {
  const model = params.get('model') || DEFAULT_MODEL;
  // The example image goes with the default model only.
  const image = params.get('image') || (params.get('model') ? null : EXAMPLE_IMAGE);
  const mode = params.get('mode') ?? 'generate';
  if (mode === 'pipeline') {
    if (!image) throw new Error('?mode=pipeline needs &image=URL');
    applyPipelineParams();
    const options = readPipelineOptions();
    await loadFromUrl(model);
    await setImage(await fetchBytes(image), image);
    return runPipeline($('prompt').value, options);
  }
  if (mode !== 'generate') throw new Error(`mode must be "generate" or "pipeline", got ${mode}`);
  const n = Number(params.get('max_new_tokens') ?? 16);
  if (!Number.isInteger(n) || n < 1) throw new Error(`max_new_tokens must be a positive integer, got ${params.get('max_new_tokens')}`);
  $('max-new-tokens').value = n;
  $('temperature').value = 0;
  $('ignore-eos').checked = true;
  await loadFromUrl(model);
  if (image) await setImage(await fetchBytes(image), image);
  return generate({ max_new_tokens: n, temperature: 0, top_k: 0, top_p: 1, seed: 0, ignore_eos: true });
}

// No ?model: load the bundled micro model and its example scene, ready to run the pipeline.
async function openDefault() {
  await setImage(await fetchBytes(EXAMPLE_IMAGE), 'example-scene.png');
  await loadFromUrl(DEFAULT_MODEL);
}

async function main() {
  wire();
  $('model-url').value = params.get('model') || DEFAULT_MODEL;
  if (!params.get('model')) $('prompt').value = EXAMPLE_QUESTION;
  if (params.get('prompt') !== null) $('prompt').value = params.get('prompt');
  if (params.get('question') !== null) $('prompt').value = params.get('question');
  const auto = params.get('autorun') === '1';
  try {
    const info = await guarded(async () => {
      if (!('gpu' in navigator) || !navigator.gpu) throw new Error('no WebGPU: navigator.gpu is missing');
      return engine.start();
    });
    stats.engine = engine.where;
    stats.adapter = info.adapter;
    $('adapter').textContent = describeAdapter(info);
    $('version').textContent = `qwen-vl-webgpu ${info.version}`;
    if (auto) {
      const result = await guarded(autorun);
      await postReport(JSON.stringify(result));
    } else if (!params.get('model')) {
      await guarded(openDefault).catch(() => {});
    }
  } catch (e) {
    $('adapter').textContent = 'WebGPU: unavailable';
    if (auto) {
      const body = JSON.stringify({ error: explain(e.message ?? String(e)) });
      $('result').textContent = body;
      await postReport(body);
    }
  } finally {
    document.body.dataset.state = 'done';
  }
}

main();
