// Runs the engine (web/engine.js) off the page's main thread. A trap of the wasm module inside a
// WebGPU callback (not inside a request) surfaces here as an uncaught error: report it as fatal.

import { createEngine, safeLastPanic } from './engine.js';

const post = (m) => self.postMessage(m);
const debugShaders = new URL(self.location.href).searchParams.get('debug') === 'shaders';
const debugCounts = new URL(self.location.href).searchParams.get('debug') === 'counts';
const handle = createEngine(post, { debugShaders, debugCounts });

self.onmessage = (e) => handle(e.data);

function fatal(message) {
  const panic = safeLastPanic();
  post({ type: 'fatal', error: panic ? `internal failure: ${panic}` : message });
}

self.addEventListener('error', (e) => {
  e.preventDefault();
  fatal(e.message || 'the model worker failed');
});
self.addEventListener('unhandledrejection', (e) => {
  e.preventDefault();
  fatal(String(e.reason && e.reason.message ? e.reason.message : e.reason));
});
