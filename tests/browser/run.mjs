#!/usr/bin/env node
// Browser tests of the Perishable client, in real headless Chromium (run by tests/browser.rs).
//
//   node tests/browser/run.mjs http://127.0.0.1:PORT             # the client suite
//   node tests/browser/run.mjs http://127.0.0.1:PORT --realtime  # the Realtime suite
//
// The URL is a Perishable proxy that serves the demo page at `/` and the client at `/client.js`,
// backed by a mock upstream, allowing its own origin. The client suite, four tests:
//
// 1. the demo page gets synthetic mouse and key input, the official `openai` SDK (bundled with
//    esbuild, injected into the page so it is same-origin) mints a DPoP-bound session with proof
//    of work through the client's fetch and streams a chat completion; chunk arrival is timed;
// 2. the token, copied out of the page with its fingerprint and User-Agent, is replayed from Node
//    without the non-extractable key, and refused;
// 3. a page on another origin cannot mint a session;
// 4. the demo's own chat box streams an answer, and a screenshot is saved to
//    target/test-artifacts/demo.png.
//
// The Realtime suite (the proxy has `realtime.enabled = true` and DPoP required), after the same
// synthetic input:
//
// 1. the client's `realtimeWebSocket` opens `/openai/realtime` with a key-bound session: the
//    mock's session.created, a response's text deltas and response.done arrive;
// 2. the official SDK's `OpenAIRealtimeWebSocket`, through `realtimeSDK`, does the same, and the
//    global WebSocket is restored; a refresh (asked for with `minLifetime`) closes the connection
//    of the old token;
// 3. handshakes the proxy must refuse (another fingerprint, no proof, a replayed proof, no
//    token) never open;
// 4. the demo's Realtime tab answers, and a screenshot is saved to demo-realtime.png beside
//    SCREENSHOT.
//
// Prints one JSON line of results; exits non-zero when a check fails.
//
// Environment: CHROMIUM (default /usr/bin/chromium), SCREENSHOT (default
// <repo>/target/test-artifacts/demo.png).

import { mkdtemp, mkdir, readFile, rm, stat } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { webcrypto } from "node:crypto";

import * as esbuild from "esbuild";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const clientFile = path.join(repo, "crates/perishable-axum/client/perishable.js");
const screenshotPath =
  process.env.SCREENSHOT || path.join(repo, "target/test-artifacts/demo.png");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const PROMPT = "Hello from headless Chromium";
const RT_MODEL = "gpt-realtime";
const RT_PROMPT = "Hello over a Realtime WebSocket";

const args = process.argv.slice(2);
const proxy = (args.find((a) => !a.startsWith("--")) || "").replace(/\/+$/, "");
const suite = args.includes("--realtime") ? "realtime" : "client";
if (!/^https?:\/\//.test(proxy)) {
  console.error("usage: node run.mjs http://127.0.0.1:PORT [--realtime]");
  process.exit(2);
}

const results = { ok: false, proxy, suite, failures: [] };
const check = (name, ok, detail) => {
  if (!ok) results.failures.push(detail === undefined ? name : `${name}: ${JSON.stringify(detail)}`);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A seeded generator, so the synthetic input is reproducible.
function prng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Mouse along a curved, jittered path with varied steps and pauses; then typing with a delay.
async function humanInput(page, seed, typeInto) {
  const rnd = prng(seed);
  await page.mouse.move(180, 260);
  for (let i = 0; i < 60; i++) {
    const a = i / 9;
    const x = 470 + 250 * Math.cos(a) + (rnd() - 0.5) * 16;
    const y = 380 + 150 * Math.sin(1.7 * a) + (rnd() - 0.5) * 16;
    await page.mouse.move(x, y, { steps: 1 + Math.floor(rnd() * 4) });
    await sleep(3 + rnd() * 35);
  }
  if (typeInto) {
    await page.click(typeInto);
    for (const ch of "perishable") {
      await page.keyboard.type(ch, { delay: 20 + Math.floor(rnd() * 60) });
      await sleep(20 + rnd() * 120);
    }
  }
}

async function bundle() {
  const dir = await mkdtemp(path.join(tmpdir(), "perishable-bundle-"));
  const outfile = path.join(dir, "page.js");
  await esbuild.build({
    entryPoints: [path.join(here, "page-entry.mjs")],
    bundle: true,
    format: "iife",
    platform: "browser",
    target: "es2020",
    external: ["/client.js"],
    outfile,
    logLevel: "silent",
  });
  const code = await readFile(outfile, "utf8");
  await rm(dir, { recursive: true, force: true });
  return code;
}

// 0. The module as the router serves it.
async function checkModule() {
  const res = await fetch(proxy + "/client.js");
  const body = await res.text();
  const expected = await readFile(clientFile, "utf8");
  const m = {
    status: res.status,
    content_type: res.headers.get("content-type"),
    cache_control: res.headers.get("cache-control"),
    etag: res.headers.get("etag"),
    same_as_repo: body === expected,
  };
  check("GET /client.js is 200", m.status === 200, m);
  check("GET /client.js is JavaScript", /^text\/javascript/.test(m.content_type || ""), m);
  check("GET /client.js is cacheable", /max-age=\d+/.test(m.cache_control || ""), m);
  check("GET /client.js serves the repository's perishable.js", m.same_as_repo);
  return m;
}

async function errorOf(res) {
  const text = await res.text();
  try {
    const e = JSON.parse(text).error || {};
    return { status: res.status, code: e.code || null, message: e.message || null };
  } catch {
    return { status: res.status, code: null, body: text.slice(0, 200) };
  }
}

const b64url = (bytes) => Buffer.from(bytes).toString("base64url");

// A DPoP proof from a key the attacker holds (not the page's).
async function foreignProof(htm, htu, token) {
  const subtle = webcrypto.subtle;
  const pair = await subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign"]);
  const { kty, crv, x, y } = await subtle.exportKey("jwk", pair.publicKey);
  const ath = b64url(new Uint8Array(await subtle.digest("SHA-256", new TextEncoder().encode(token))));
  const enc = (o) => b64url(Buffer.from(JSON.stringify(o)));
  const input = `${enc({ typ: "dpop+jwt", alg: "ES256", jwk: { kty, crv, x, y } })}.${enc({
    jti: b64url(webcrypto.getRandomValues(new Uint8Array(16))),
    htm,
    htu,
    iat: Math.floor(Date.now() / 1000),
    ath,
  })}`;
  const sig = await subtle.sign({ name: "ECDSA", hash: "SHA-256" }, pair.privateKey, Buffer.from(input));
  return `${input}.${b64url(new Uint8Array(sig))}`;
}

// 2. The page's token, replayed from Node with the fingerprint and User-Agent but not the key.
async function replay(stolen, pageProof) {
  const url = proxy + "/openai/chat/completions";
  const body = JSON.stringify({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "replayed from node" }],
  });
  const headers = (authorization, dpop) => {
    const h = {
      "content-type": "application/json",
      "x-perishable-fingerprint": stolen.fingerprint,
      "user-agent": stolen.user_agent,
      authorization,
    };
    if (dpop) h.dpop = dpop;
    return h;
  };
  const send = async (authorization, dpop) =>
    errorOf(await fetch(url, { method: "POST", headers: headers(authorization, dpop), body }));
  const out = {
    bearer: await send(`Bearer ${stolen.token}`),
    dpop_without_proof: await send(`DPoP ${stolen.token}`),
    dpop_foreign_key: await send(`DPoP ${stolen.token}`, await foreignProof("POST", url, stolen.token)),
    dpop_reused_page_proof: pageProof ? await send(`DPoP ${stolen.token}`, pageProof) : null,
  };
  check("replay with Bearer is 401 dpop_required",
    out.bearer.status === 401 && out.bearer.code === "dpop_required", out.bearer);
  check("replay as DPoP without a proof is 401 dpop_required",
    out.dpop_without_proof.status === 401 && out.dpop_without_proof.code === "dpop_required",
    out.dpop_without_proof);
  check("replay with another key's proof is 401 invalid_dpop_proof",
    out.dpop_foreign_key.status === 401 && out.dpop_foreign_key.code === "invalid_dpop_proof",
    out.dpop_foreign_key);
  if (out.dpop_reused_page_proof) {
    check("replay of the page's own proof is 401 invalid_dpop_proof",
      out.dpop_reused_page_proof.status === 401 &&
        out.dpop_reused_page_proof.code === "invalid_dpop_proof",
      out.dpop_reused_page_proof);
  }
  return out;
}

// 3. A page on another origin (a tiny server on another port) tries to mint.
async function disallowedOrigin(context) {
  const source = await readFile(clientFile, "utf8");
  const html = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>elsewhere</title></head>
<body><p>Another origin.</p><script type="module">
import { createClient } from "/perishable.js";
const proxy = ${JSON.stringify(proxy)};
window.__tryMint = async () => {
  const out = {};
  try {
    const c = await createClient({ baseURL: proxy, storage: "memory" });
    const s = await c.getSession();
    out.minted = true;
    out.token_type = s.token_type;
  } catch (e) {
    out.minted = false;
    out.error = String(e && e.message || e);
    out.error_name = e && e.name;
    out.code = e && e.code || null;
    out.status = e && e.status || 0;
  }
  try {
    const r = await fetch(proxy + "/session", { method: "POST",
      headers: { "content-type": "application/json" }, body: "{}" });
    out.direct_post = { status: r.status };
  } catch (e) {
    out.direct_post = { failed: String(e && e.message || e) };
  }
  return out;
};
window.__ready = true;
</script></body></html>`;
  const server = createServer((req, res) => {
    if (req.url === "/perishable.js") {
      res.writeHead(200, { "content-type": "text/javascript; charset=utf-8" });
      res.end(source);
    } else if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(html);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const page = await context.newPage();
  const seen = [];
  page.on("response", (r) => {
    if (r.url().startsWith(proxy)) seen.push({ url: r.url().slice(proxy.length), method: r.request().method(), status: r.status() });
  });
  page.on("requestfailed", (r) => {
    if (r.url().startsWith(proxy)) seen.push({ url: r.url().slice(proxy.length), method: r.method(), failed: r.failure() && r.failure().errorText });
  });
  try {
    await page.goto(origin + "/");
    await page.waitForFunction(() => window.__ready === true);
    await humanInput(page, 7, null);
    const out = await page.evaluate(() => window.__tryMint());
    // The same request from Node, where the refusal can be read: 403 origin_not_allowed.
    const node = await errorOf(
      await fetch(proxy + "/challenge", { headers: { origin } }),
    );
    const result = { origin, ...out, network: seen, node_challenge_with_origin: node };
    check("a disallowed origin cannot mint", out.minted === false, result);
    check("a disallowed origin cannot POST /session",
      !(out.direct_post && out.direct_post.status === 200), result);
    check("the proxy answers a disallowed Origin with 403 origin_not_allowed",
      node.status === 403 && node.code === "origin_not_allowed", node);
    return result;
  } finally {
    await page.close();
    server.close();
  }
}

// 4. The demo's own chat box, then a screenshot.
async function demoScreenshot(page) {
  await page.click("#prompt");
  await page.keyboard.type("Stream me an answer, word by word", { delay: 15 });
  // Watch the answer grow while it streams.
  const growth = page.evaluate(async () => {
    const lengths = [];
    const start = performance.now();
    while (performance.now() - start < 20000) {
      const li = document.querySelector("#log li.assistant:last-child span:last-child");
      lengths.push(li ? li.textContent.length : 0);
      if (document.getElementById("log").dataset.state !== "streaming" && lengths[lengths.length - 1] > 0) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    return [...new Set(lengths)].length;
  });
  await page.click("#send");
  await page.waitForSelector('#log[data-state="done"], #log[data-state="error"]', { timeout: 30000 });
  const distinctLengths = await growth;
  await sleep(1100); // let the countdown tick once
  const demo = await page.evaluate(() => ({
    state: document.getElementById("log").dataset.state,
    answer: document.querySelector("#log li.assistant:last-child span:last-child").textContent,
    token_type: document.getElementById("token-type").textContent,
    session_id: document.getElementById("session-id").textContent,
    expires_in: document.getElementById("expires-in").textContent,
    status: document.getElementById("status").textContent,
  }));
  demo.distinct_lengths_seen = distinctLengths;
  await mkdir(path.dirname(screenshotPath), { recursive: true });
  await page.screenshot({ path: screenshotPath, fullPage: true });
  const size = (await stat(screenshotPath)).size;
  demo.screenshot = screenshotPath;
  demo.screenshot_bytes = size;
  check("the demo streamed an answer", demo.state === "done" && demo.answer.length > 0, demo);
  check("the demo answer grew in steps", distinctLengths >= 3, demo);
  check("the demo shows a DPoP session", /^DPoP/.test(demo.token_type), demo);
  check("the demo shows a countdown", /^\d+:\d\d$/.test(demo.expires_in), demo);
  check("the screenshot was saved", size > 0, demo);
  return demo;
}

// Chromium with a fresh profile, for `body(context)`.
async function withChromium(body) {
  const userDataDir = await mkdtemp(path.join(tmpdir(), "perishable-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 960, height: 820 },
  });
  try {
    await body(context);
  } finally {
    await context.close();
    await rm(userDataDir, { recursive: true, force: true });
  }
}

// What one Realtime conversation through the page returned, checked.
function checkTalk(name, talk) {
  const times = talk.deltas.map((d) => d.t);
  const summary = {
    url: talk.url,
    protocol: talk.protocol,
    token_type: talk.session && talk.session.token_type,
    model: talk.session_created && talk.session_created.model,
    types: [...new Set(talk.types)],
    deltas: talk.deltas.length,
    distinct_times: new Set(times).size,
    text: talk.text,
    status: talk.done && talk.done.status,
    usage: talk.done && talk.done.usage,
    close_code: talk.close_code,
  };
  check(`${name}: the socket is ws:// to the Realtime route`,
    talk.url.startsWith(proxy.replace(/^http/, "ws") + "/openai/realtime?model="), summary);
  check(`${name}: the proxy answered the realtime subprotocol`, talk.protocol === "realtime", summary);
  check(`${name}: the session is DPoP-bound`, summary.token_type === "DPoP", summary);
  check(`${name}: session.created names the model`, summary.model === RT_MODEL, summary);
  check(`${name}: response.created came`, talk.types.includes("response.created"), summary);
  check(`${name}: several text deltas`, talk.deltas.length >= 3, summary);
  check(`${name}: the deltas carry the mock's answer`, talk.text.includes(RT_PROMPT), summary);
  check(`${name}: response.done completed`, summary.status === "completed", summary);
  check(`${name}: response.done has usage`,
    !!summary.usage && summary.usage.total_tokens > 0, summary);
  check(`${name}: closed normally`, talk.close_code === 1000, summary);
  return summary;
}

// The demo's Realtime tab, then a screenshot.
async function demoRealtime(page) {
  await page.click("#tab-realtime");
  await page.click("#rt-connect");
  await page.waitForSelector('#rt-state[data-state="open"], #rt-state[data-state="refused"]', {
    timeout: 30000,
  });
  const connection = await page.evaluate(() => document.getElementById("rt-state").textContent);
  if (/^refused|^could not/.test(connection)) {
    check("the demo's Realtime tab connects", false, connection);
    return { connection };
  }
  // session.created names the model in the status line.
  await page
    .waitForFunction(() => /connected to/.test(document.getElementById("rt-state").textContent), null, {
      timeout: 10000,
    })
    .catch(() => {});
  await page.click("#rt-prompt");
  await page.keyboard.type("Realtime from the demo tab", { delay: 10 });
  await page.click("#rt-send");
  await page.waitForSelector('#rt-log[data-state="done"], #rt-log[data-state="error"]', {
    timeout: 30000,
  });
  const shot = path.join(path.dirname(screenshotPath), "demo-realtime.png");
  await mkdir(path.dirname(shot), { recursive: true });
  await page.screenshot({ path: shot, fullPage: true });
  const demo = await page.evaluate(() => ({
    log_state: document.getElementById("rt-log").dataset.state,
    connection: document.getElementById("rt-state").textContent,
    answer: (document.querySelector("#rt-log li.assistant:last-child span:last-child") || {})
      .textContent,
    usage: document.getElementById("rt-usage").textContent,
    chat_hidden: document.getElementById("panel-chat").hidden,
  }));
  await page.click("#rt-disconnect");
  await page.waitForSelector('#rt-state[data-state="closed"]', { timeout: 10000 });
  demo.after_disconnect = await page.evaluate(() => document.getElementById("rt-state").textContent);
  demo.screenshot = shot;
  demo.screenshot_bytes = (await stat(shot)).size;
  check("the demo's Realtime tab answered",
    demo.log_state === "done" && (demo.answer || "").includes("Realtime from the demo tab"), demo);
  check("the demo's Realtime tab shows the connection", /connected to gpt-realtime/.test(demo.connection), demo);
  check("the demo's Realtime tab shows the usage", /tokens in/.test(demo.usage), demo);
  check("the demo's Realtime tab closes on Disconnect", /closed \(1000/.test(demo.after_disconnect), demo);
  check("the Realtime screenshot was saved", demo.screenshot_bytes > 0, demo);
  return demo;
}

async function realtimeMain() {
  const pageScript = await bundle();
  results.bundle_bytes = pageScript.length;
  await withChromium(async (context) => {
    const page = context.pages()[0] || (await context.newPage());
    const consoleErrors = [];
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });
    const sockets = [];
    page.on("websocket", (ws) => {
      const entry = { url: ws.url(), errors: [] };
      sockets.push(entry);
      ws.on("socketerror", (e) => entry.errors.push(String(e)));
    });

    await page.goto(proxy + "/");
    await page.waitForFunction(() => !!window.perishableDemo, null, { timeout: 15000 });
    await page.addScriptTag({ content: pageScript });
    results.setup = await page.evaluate(() => window.__perishableTest.setup());
    await humanInput(page, 42, "#prompt");
    await page.fill("#prompt", "");

    // 1. The helper's own WebSocket.
    const raw = await page.evaluate(
      ([m, p]) => window.__perishableTest.realtimeRaw(m, p),
      [RT_MODEL, RT_PROMPT],
    );
    results.raw = checkTalk("raw WebSocket", raw);
    results.raw.open_ms = raw.open_ms;

    // 2. The official SDK.
    const sdk = await page.evaluate(
      ([m, p]) => window.__perishableTest.realtimeSDK(m, p),
      [RT_MODEL, RT_PROMPT],
    );
    results.sdk = checkTalk("official SDK", sdk);
    Object.assign(results.sdk, {
      sdk_url: sdk.sdk_url,
      sdk_events: [...new Set(sdk.sdk_events)],
      sdk_errors: sdk.sdk_errors,
      websocket_restored: sdk.websocket_restored,
      is_native_websocket: sdk.is_native_websocket,
    });
    check("official SDK: the global WebSocket is restored", sdk.websocket_restored, results.sdk);
    check("official SDK: the socket is a real WebSocket", sdk.is_native_websocket, results.sdk);
    check("official SDK: its own events fired",
      ["session.created", "response.output_text.delta", "response.done"].every((t) =>
        sdk.sdk_events.includes(t)), results.sdk);
    check("official SDK: no error", sdk.sdk_errors.length === 0, results.sdk);
    check("both used the same session", raw.session.session_id === sdk.session.session_id,
      [raw.session.session_id, sdk.session.session_id]);

    // The demo's own client takes the session now, so that it holds the token the refresh
    // below revokes: its Realtime tab (4.) must pick up the refreshed one from storage.
    await page.evaluate(() => window.perishableDemo.client.getSession());
    // A refresh revokes the token a connection opened with: the proxy closes it (1008).
    const refresh = await page.evaluate((m) => window.__perishableTest.realtimeRefresh(m), RT_MODEL);
    results.refresh = refresh;
    check("minLifetime refreshes the session first",
      refresh.after !== refresh.before && refresh.a_opened && refresh.b_opened, refresh);
    check("the connection of a revoked token is closed 1008 session revoked",
      refresh.a_close.code === 1008 && /revoked/.test(refresh.a_close.reason), refresh);

    // 3. Refused handshakes.
    const refused = await page.evaluate((m) => window.__perishableTest.realtimeRefused(m), RT_MODEL);
    results.refused = refused;
    for (const name of ["wrong_fingerprint", "without_proof", "replayed_proof", "without_token"]) {
      check(`${name}: the socket never opens`,
        refused[name].opened === false && refused[name].close_code === 1006, refused[name]);
    }
    check("a proof opens once", refused.first_use.opened === true && refused.first_use.protocol === "realtime",
      refused.first_use);
    check("withRealtime without a socket rejects with realtime_not_opened",
      refused.not_opened.rejected && refused.not_opened.code === "realtime_not_opened" &&
        refused.not_opened.restored, refused.not_opened);
    check("withRealtime restores WebSocket when the function throws",
      refused.thrown.rejected && refused.thrown.message === "boom" && refused.thrown.restored,
      refused.thrown);

    // 4. The demo's Realtime tab.
    results.demo = await demoRealtime(page);

    results.sockets = sockets;
    // Chromium logs each refused handshake; a 401 (with WWW-Authenticate) reads "HTTP
    // Authentication failed", other statuses "Unexpected response code: N".
    results.handshake_errors = consoleErrors.filter((e) => /^WebSocket connection to/.test(e));
    results.console_errors = consoleErrors.filter((e) => !/^WebSocket connection to/.test(e));
    const failed = sockets.filter((s) => s.errors.length > 0);
    check("Chromium saw four refused handshakes, each a 401",
      failed.length === 4 &&
        failed.every((s) => s.errors.every((e) => /HTTP Authentication failed|response code: 401/.test(e))),
      sockets);
    check("no other console errors", results.console_errors.length === 0, results.console_errors);
  });
  results.ok = results.failures.length === 0;
}

async function main() {
  if (suite === "realtime") return realtimeMain();
  results.module = await checkModule();
  const pageScript = await bundle();
  results.bundle_bytes = pageScript.length;

  const userDataDir = await mkdtemp(path.join(tmpdir(), "perishable-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 960, height: 820 },
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    const consoleErrors = [];
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });
    let pageProof = null;
    page.on("request", (r) => {
      if (!pageProof && r.url() === proxy + "/openai/chat/completions") {
        pageProof = r.headers()["dpop"] || null;
      }
    });

    // 1. Mint with interaction and proof of work; stream through the official SDK.
    await page.goto(proxy + "/");
    await page.waitForFunction(() => !!window.perishableDemo, null, { timeout: 15000 });
    await page.addScriptTag({ content: pageScript });
    results.setup = await page.evaluate(() => window.__perishableTest.setup());
    await humanInput(page, 42, "#prompt");
    await page.fill("#prompt", "");
    results.entropy = await page.evaluate(() => window.__perishableTest.entropy());
    const run = await page.evaluate((p) => window.__perishableTest.streamChat(p), PROMPT);
    const times = run.chunks.map((c) => c.t);
    const contentChunks = run.chunks.filter((c) => c.n > 0);
    results.mint = {
      token_type: run.minted_session.token_type,
      session_id: run.minted_session.session_id,
      expires_in: run.minted_session.expires_in,
      mint_ms: run.mint_ms,
      dpop: run.dpop,
    };
    results.stream = {
      chunks: run.chunks.length,
      content_chunks: contentChunks.length,
      distinct_times: new Set(times).size,
      first_ms: times[0],
      last_ms: times[times.length - 1],
      content: run.content,
      finish: run.finish,
    };
    results.models = run.models;
    results.sdk_headers = run.sdk_headers;
    check("the session is DPoP-bound", run.minted_session.token_type === "DPoP", results.mint);
    check("the stream has several chunks", contentChunks.length >= 3, results.stream);
    check("the chunks arrived at distinct times",
      results.stream.distinct_times >= 3 && results.stream.last_ms - results.stream.first_ms >= 50,
      results.stream);
    check("the stream carries the mock's answer", run.content.includes(PROMPT), results.stream);
    check("the page's key still works (models list)", run.models.includes("gpt-4o-mini"), run.models);

    // 2. Replay from Node.
    results.replay = await replay(
      { token: run.session.token, fingerprint: run.fingerprint, user_agent: run.user_agent },
      pageProof,
    );

    // 3. Disallowed origin.
    results.disallowed = await disallowedOrigin(context);

    // 4. The demo chat box and a screenshot.
    results.demo = await demoScreenshot(page);
    results.console_errors = consoleErrors;
  } finally {
    await context.close();
    await rm(userDataDir, { recursive: true, force: true });
  }
  results.ok = results.failures.length === 0;
}

try {
  await main();
} catch (e) {
  results.failures.push(`exception: ${e && e.stack ? e.stack : e}`);
}
console.log(JSON.stringify(results));
process.exit(results.ok ? 0 : 1);
