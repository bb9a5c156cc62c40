// Opens the demo page in headless Chromium (the system browser; playwright-core downloads none),
// waits for the page's autorun to finish, saves a screenshot, and prints one JSON line on stdout:
//   {"result": <#result parsed>, "stats": <window.__qwenVl>, "wall_ms": N, "browser": "..."}
// Everything else (page console, errors) goes to stderr. More URL SCREENSHOT pairs open those
// pages one after the other in the same tab (same browser profile, so the model files come from
// the page's Cache API), one JSON line each, in order.
//
//   node tests/web/e2e.mjs URL SCREENSHOT.png [URL2 SCREENSHOT2.png ...]
//
// Env: CHROMIUM (default /usr/bin/chromium), E2E_TIMEOUT_MS (default 900000),
//      E2E_CHROMIUM_ARGS (extra flags, space separated), E2E_REPEAT (below),
//      E2E_CHAT="first message|second message|..." (on the last page, after its run: one chat
//      turn per message through the chat box, replies of E2E_CHAT_TOKENS tokens, default 4; each
//      turn's result goes to stats.chatTurns).

import { chromium } from 'playwright-core';

const pairs = [];
const argv = process.argv.slice(2);
for (let i = 0; i + 1 < argv.length; i += 2) pairs.push([argv[i], argv[i + 1]]);
if (!pairs.length || argv.length % 2) {
  console.error('usage: node e2e.mjs URL SCREENSHOT.png [URL2 SCREENSHOT2.png ...]');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const timeout = Number(process.env.E2E_TIMEOUT_MS || 900000);

// WebGPU on the CPU: SwiftShader's Vulkan, exposed through Dawn (no GPU needed).
const args = [
  '--enable-unsafe-webgpu',
  '--use-webgpu-adapter=swiftshader',
  '--no-sandbox',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  ...(process.env.E2E_CHROMIUM_ARGS || '').split(' ').filter(Boolean),
];

let t0 = Date.now();
const browser = await chromium.launch({ executablePath, headless: true, args, timeout: 120000 });
let code = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1500 } });
  page.on('console', (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
  page.on('worker', (w) => console.error(`[page] worker started: ${w.url()}`));
  for (const [i, [url, screenshot]] of pairs.entries()) {
    await visit(page, url, screenshot, i + 1 === pairs.length);
    t0 = Date.now();
  }
} catch (e) {
  console.error(`e2e: ${e.stack || e}`);
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);

async function chat(page, messages) {
  const tokens = process.env.E2E_CHAT_TOKENS || '4';
  await page.evaluate((n) => {
    document.getElementById('max-new-tokens').value = n;
  }, tokens);
  for (const message of messages) {
    const turns = await page.evaluate(() => window.__qwenVl.chatTurns?.length ?? 0);
    await page.fill('#chat-input', message);
    await page.click('#chat-send');
    await page.waitForFunction(
      (n) => (window.__qwenVl.chatTurns?.length ?? 0) > n || !document.getElementById('error').hidden,
      turns,
      { timeout, polling: 500 },
    );
    const error = await page.evaluate(() => (document.getElementById('error').hidden ? '' : document.getElementById('error').textContent));
    if (error) throw new Error(`chat turn "${message}" failed: ${error}`);
  }
}

async function visit(page, url, screenshot, last) {
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  await page.waitForFunction(() => document.body.dataset.state === 'done', null, { timeout, polling: 500 });
  const text = (await page.textContent('#result')) || '';
  // E2E_REPEAT=N: press Generate (or Run pipeline, on a pipeline page) N more times with the
  // same inputs to time warm runs, when every kernel is already compiled (and, for the
  // pipeline, its caches hold the image and the prompt prefixes); their stats go to `warm`.
  const warm = [];
  const pipeline = await page.evaluate(() => Boolean(window.__qwenVl.pipeline));
  const counter = pipeline ? () => window.__qwenVl.pipeline?.runs ?? 0 : () => window.__qwenVl.runs ?? 0;
  for (let i = 0; i < Number(process.env.E2E_REPEAT || 0); i++) {
    const runs = await page.evaluate(counter);
    if (!runs) break;
    await page.click(pipeline ? '#run-pipeline' : '#generate');
    await page.waitForFunction(
      ([n, p]) => (p ? window.__qwenVl.pipeline?.runs ?? 0 : window.__qwenVl.runs ?? 0) > n,
      [runs, pipeline],
      { timeout, polling: 500 },
    );
    warm.push(await page.evaluate((p) => (p ? window.__qwenVl.pipeline.last : window.__qwenVl.last), pipeline));
  }
  if (last && process.env.E2E_CHAT) await chat(page, process.env.E2E_CHAT.split('|'));
  const stats = await page.evaluate(() => window.__qwenVl);
  if (warm.length) stats.warm = warm;
  await page.screenshot({ path: screenshot, fullPage: true });
  let result;
  try {
    result = JSON.parse(text);
  } catch {
    result = { error: `#result is not JSON: ${JSON.stringify(text.slice(0, 500))}` };
  }
  const out = { result, stats, wall_ms: Date.now() - t0, browser: `${browser.browserType().name()} ${browser.version()}` };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}
