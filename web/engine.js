// The model engine: owns the wasm module (web/pkg, built by web/build.sh) and answers requests.
// It runs inside a Web Worker (web/worker.js) when WebGPU is available there, else on the page's
// main thread (web/app.js imports it directly); both talk to it with the same messages:
//
//   {id, op: "init"}                                       -> {adapter, version}
//   {id, op: "load", files: {name: ArrayBuffer}, options}  -> {family, load_ms, weight_bytes, adapter}
//   {id, op: "generate", image: ArrayBuffer|null, prompt, options} -> the `generate --json` object
//   {id, op: "pipeline", image: ArrayBuffer, question, options}    -> the `pipeline --json` report
//   {id, op: "chat", image: ArrayBuffer|null, message, options}    -> one chat turn (see src/web.rs)
//   {id, op: "chat-reset"}                                          -> null
//
// Each reply is {type: "reply", id, ok, value | error, fatal}; while a request runs the engine
// also sends {type: "progress", id, ...} (load), {type: "text", id, piece} (generate, chat) and
// {type: "text", id, phase, piece} (pipeline).
// `fatal` means the wasm module trapped (a Rust panic): it must be thrown away and restarted.
// Page flags passed through: `?debug=shaders` logs every WGSL module the browser rejects (with its
// source), `?debug=counts` the dispatches, submits and buffer maps of each request.

import init, { adapterInfo, loadModel, lastPanic, version } from './pkg/qwen_vl.js';

// `?debug=shaders` on the page: log every WGSL module WebGPU rejects, with its source.
function logShaderErrors() {
  const create = GPUDevice.prototype.createShaderModule;
  let n = 0;
  const t0 = performance.now();
  GPUDevice.prototype.createShaderModule = function (desc) {
    n += 1;
    console.debug(`shader #${n} at ${((performance.now() - t0) / 1000).toFixed(1)} s: ${desc.label}`);
    const module = create.call(this, desc);
    module.getCompilationInfo().then((info) => {
      const errors = info.messages.filter((m) => m.type === 'error');
      if (errors.length) {
        const text = errors.map((m) => `${m.lineNum}:${m.linePos} ${m.message}`).join('\n');
        console.error(`WGSL rejected (${desc.label}):\n${text}\n--- source ---\n${desc.code}`);
      }
    });
    return module;
  };
}

// `?debug=counts`: count dispatches, submits and buffer maps (printed after each request).
const counts = { dispatch: 0, submit: 0, map: 0, createBuffer: 0 };
function countGpuCalls() {
  const d = GPUComputePassEncoder.prototype.dispatchWorkgroups;
  GPUComputePassEncoder.prototype.dispatchWorkgroups = function (...a) {
    counts.dispatch += 1;
    return d.apply(this, a);
  };
  const s = GPUQueue.prototype.submit;
  GPUQueue.prototype.submit = function (...a) {
    counts.submit += 1;
    return s.apply(this, a);
  };
  const m = GPUBuffer.prototype.mapAsync;
  GPUBuffer.prototype.mapAsync = function (...a) {
    counts.map += 1;
    return m.apply(this, a);
  };
  const c = GPUDevice.prototype.createBuffer;
  GPUDevice.prototype.createBuffer = function (...a) {
    counts.createBuffer += 1;
    return c.apply(this, a);
  };
}

export function createEngine(post, options = {}) {
  if (options.debugCounts && typeof GPUDevice !== 'undefined') countGpuCalls();
  if (options.debugShaders && typeof GPUDevice !== 'undefined') logShaderErrors();
  let ready = null;
  let model = null;

  function errorOf(e) {
    if (e instanceof WebAssembly.RuntimeError) {
      const panic = safeLastPanic();
      return { error: `internal failure: ${panic || e.message}`, fatal: true };
    }
    const message = e && e.message ? e.message : String(e);
    return { error: message, fatal: false };
  }

  async function run(msg) {
    switch (msg.op) {
      case 'init': {
        if (!('gpu' in navigator) || !navigator.gpu) {
          return { noWebGpu: true };
        }
        ready ??= init();
        await ready;
        const adapter = await adapterInfo();
        return { adapter, version: version() };
      }
      case 'load': {
        ready ??= init();
        await ready;
        if (model) {
          model.free();
          model = null;
        }
        const files = new Map();
        for (const [name, buf] of Object.entries(msg.files)) files.set(name, new Uint8Array(buf));
        const m = await loadModel(files, msg.options ?? {}, (p) => post({ type: 'progress', id: msg.id, ...p }));
        model = m;
        return { family: m.family, load_ms: m.loadMs, weight_bytes: m.weightBytes, adapter: m.adapter };
      }
      case 'generate': {
        if (!model) throw new Error('no model is loaded yet; load a checkpoint first');
        const image = msg.image ? new Uint8Array(msg.image) : null;
        return await model.generate(image, msg.prompt, msg.options ?? {}, (piece) =>
          post({ type: 'text', id: msg.id, piece }),
        );
      }
      case 'pipeline': {
        if (!model) throw new Error('no model is loaded yet; load a checkpoint first');
        if (!msg.image) throw new Error('the pipeline needs an image; drop or choose one first');
        return await model.pipeline(new Uint8Array(msg.image), msg.question, msg.options ?? {}, (phase, piece) =>
          post({ type: 'text', id: msg.id, phase, piece }),
        );
      }
      case 'chat': {
        if (!model) throw new Error('no model is loaded yet; load a checkpoint first');
        const image = msg.image ? new Uint8Array(msg.image) : null;
        return await model.chat(image, msg.message, msg.options ?? {}, (piece) =>
          post({ type: 'text', id: msg.id, piece }),
        );
      }
      case 'chat-reset': {
        model?.chatReset();
        return null;
      }
      default:
        throw new Error(`unknown request ${msg.op}`);
    }
  }

  return async function handle(msg) {
    try {
      const value = await run(msg);
      if (options.debugCounts) {
        console.debug(`gpu calls after ${msg.op}: ${JSON.stringify(counts)}`);
        for (const k in counts) counts[k] = 0;
      }
      post({ type: 'reply', id: msg.id, ok: true, value });
    } catch (e) {
      post({ type: 'reply', id: msg.id, ok: false, ...errorOf(e) });
    }
  };
}

export function safeLastPanic() {
  try {
    return lastPanic();
  } catch {
    return undefined;
  }
}
