// Perishable browser client: a dependency-free ES module (ES2020), served at `GET /client.js`.
//
//   import { createClient } from "https://api.example.com/ai/client.js";
//   const p = await createClient({ baseURL: "https://api.example.com/ai" });
//   const openai = new OpenAI({ baseURL: p.baseURL + "/openai", apiKey: "perishable",
//                               fetch: p.fetch, dangerouslyAllowBrowser: true });
//
// It derives a stable fingerprint, collects bounded interaction samples, solves the proof of
// work in a Web Worker, keeps a non-extractable P-256 key in IndexedDB for DPoP (RFC 9449), and
// mints, caches, refreshes and re-mints the session as needed, following the Perishable wire
// protocol, version 1. It also opens Realtime WebSockets with the session's credentials as
// subprotocols (`realtimeWebSocket`, and `realtimeSDK` for the official SDK's
// `OpenAIRealtimeWebSocket`). See docs/client.md.

/** The module's version. */
export const VERSION = "0.1.0";

/** Most pointer samples, and most key times, sent with a mint (PROTOCOL: 512 each). */
const MAX_SAMPLES = 512;
/** 401 codes after which the session is replaced and the request sent once more. */
const REMINT_CODES = ["token_expired", "session_revoked", "invalid_token"];
/** Below this many seconds left, a session is re-minted rather than refreshed. */
const MIN_REFRESH_SECS = 5;
/** The subprotocol the proxy answers a Realtime handshake with. */
const REALTIME_PROTOCOL = "realtime";
/**
 * Realtime credentials as WebSocket subprotocols (a page cannot set headers on a WebSocket):
 * the token where the official SDK puts its API key, the fingerprint (base64url, no padding)
 * and a DPoP proof.
 */
const TOKEN_PROTOCOL = "openai-insecure-api-key.";
const FINGERPRINT_PROTOCOL = "perishable-fingerprint.";
const DPOP_PROTOCOL = "perishable-dpop.";

/** An error from Perishable: `status` and `code` are the server's when it answered. */
export class PerishableError extends Error {
  constructor(message, details) {
    super(message);
    const d = details || {};
    this.name = "PerishableError";
    /** HTTP status (0 when the server was not reached). */
    this.status = d.status || 0;
    /** PROTOCOL error code (`insufficient_entropy`, `origin_not_allowed`, ...) or null. */
    this.code = d.code || null;
    /** PROTOCOL error type (`invalid_request_error`, ...) or null. */
    this.type = d.type || null;
    /** The server's refusal as a fresh, unread Response, or null. */
    this.response = d.response || null;
    if (d.cause !== undefined) this.cause = d.cause;
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding helpers

const encoder = new TextEncoder();
const utf8 = (s) => encoder.encode(s);

function b64url(data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomId(bytes) {
  return b64url(crypto.getRandomValues(new Uint8Array(bytes || 16)));
}

// ---------------------------------------------------------------------------------------------
// SHA-256 in plain JavaScript: the proof-of-work search (fast: the challenge's full blocks are
// hashed once, then only the tail per nonce), and a fallback digest where WebCrypto is missing
// (insecure contexts). Self-contained, so its source can be sent to the worker as is.

function sha256Kit() {
  const K = new Int32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
  ]);
  const IV = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  ];
  const W = new Int32Array(64);
  const tail = new Uint8Array(192);

  function compress(H, m, off) {
    for (let i = 0; i < 16; i++) {
      const j = off + i * 4;
      W[i] = (m[j] << 24) | (m[j + 1] << 16) | (m[j + 2] << 8) | m[j + 3];
    }
    for (let i = 16; i < 64; i++) {
      const x = W[i - 15];
      const y = W[i - 2];
      const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (let i = 0; i < 64; i++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (h + S1 + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }

  // Pads the `len` bytes already in `tail` (a message of `total` bytes) and hashes them into H.
  function finish(H, len, total) {
    tail[len] = 0x80;
    const blocks = len + 9 <= 64 ? 1 : len + 9 <= 128 ? 2 : 3;
    const end = blocks * 64;
    const bits = total * 8;
    const hi = Math.floor(bits / 4294967296);
    const lo = bits >>> 0;
    tail[end - 8] = hi >>> 24; tail[end - 7] = (hi >>> 16) & 255;
    tail[end - 6] = (hi >>> 8) & 255; tail[end - 5] = hi & 255;
    tail[end - 4] = lo >>> 24; tail[end - 3] = (lo >>> 16) & 255;
    tail[end - 2] = (lo >>> 8) & 255; tail[end - 1] = lo & 255;
    for (let b = 0; b < blocks; b++) compress(H, tail, b * 64);
  }

  function absorb(bytes) {
    const H = Int32Array.from(IV);
    const full = bytes.length - (bytes.length % 64);
    for (let off = 0; off < full; off += 64) compress(H, bytes, off);
    return { H, rest: bytes.subarray(full) };
  }

  function digest(bytes) {
    const { H, rest } = absorb(bytes);
    tail.fill(0);
    tail.set(rest);
    finish(H, rest.length, bytes.length);
    const out = new Uint8Array(32);
    for (let i = 0; i < 8; i++) {
      out[i * 4] = H[i] >>> 24; out[i * 4 + 1] = (H[i] >>> 16) & 255;
      out[i * 4 + 2] = (H[i] >>> 8) & 255; out[i * 4 + 3] = H[i] & 255;
    }
    return out;
  }

  function zeroBits(H) {
    let n = 0;
    for (let i = 0; i < 8; i++) {
      if (H[i] === 0) n += 32;
      else return n + Math.clz32(H[i]);
    }
    return n;
  }

  // The first decimal nonce in [start, start + count) such that SHA-256(challenge + nonce) has
  // at least `difficulty` leading zero bits, or null.
  function search(challenge, difficulty, start, count) {
    const prefix = new TextEncoder().encode(challenge);
    const { H: mid, rest } = absorb(prefix);
    const H = new Int32Array(8);
    for (let n = start, end = start + count; n < end; n++) {
      const nonce = String(n);
      tail.fill(0);
      tail.set(rest);
      let len = rest.length;
      for (let i = 0; i < nonce.length; i++) tail[len++] = nonce.charCodeAt(i);
      H.set(mid);
      finish(H, len, prefix.length + nonce.length);
      if (zeroBits(H) >= difficulty) return nonce;
    }
    return null;
  }

  return { digest, search };
}

let kit = null;
const jsKit = () => kit || (kit = sha256Kit());

async function sha256(bytes) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (subtle) {
    try {
      return new Uint8Array(await subtle.digest("SHA-256", bytes));
    } catch (_) {
      // Fall through to the JavaScript digest.
    }
  }
  return jsKit().digest(bytes);
}

// ---------------------------------------------------------------------------------------------
// Proof of work, off the main thread: the worker is built from inline source (a Blob URL), so
// the module stays one file.

function powWorkerMain(makeKit) {
  const k = makeKit();
  self.onmessage = (event) => {
    const { challenge, difficulty, deadline } = event.data;
    const chunk = 20000;
    for (let n = 0; ; n += chunk) {
      const nonce = k.search(challenge, difficulty, n, chunk);
      if (nonce !== null) {
        self.postMessage({ nonce });
        return;
      }
      if (Date.now() > deadline) {
        self.postMessage({ expired: true });
        return;
      }
    }
  };
}

const WORKER_SOURCE = `"use strict";(${powWorkerMain})(${sha256Kit});`;

function expiredChallenge() {
  return new PerishableError("the proof-of-work challenge expired before it was solved", {
    code: "pow_invalid",
  });
}

function solveInWorker(challenge, difficulty, deadline) {
  return new Promise((resolve, reject) => {
    let url = null;
    let worker = null;
    const unavailable = (cause) => reject({ workerUnavailable: true, cause });
    try {
      url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
      worker = new Worker(url);
    } catch (e) {
      if (url) URL.revokeObjectURL(url);
      unavailable(e);
      return;
    }
    const done = () => {
      worker.terminate();
      URL.revokeObjectURL(url);
    };
    worker.onmessage = (event) => {
      done();
      if (event.data && typeof event.data.nonce === "string") resolve(event.data.nonce);
      else reject(expiredChallenge());
    };
    worker.onerror = (event) => {
      if (event && event.preventDefault) event.preventDefault();
      done();
      unavailable(event);
    };
    worker.postMessage({ challenge, difficulty, deadline });
  });
}

async function solveOnMainThread(challenge, difficulty, deadline) {
  const k = jsKit();
  for (let n = 0; ; n += 4000) {
    const nonce = k.search(challenge, difficulty, n, 4000);
    if (nonce !== null) return nonce;
    if (Date.now() > deadline) throw expiredChallenge();
    await new Promise((r) => setTimeout(r, 0));
  }
}

async function solvePow(challenge, difficulty, deadline, useWorker) {
  if (useWorker && typeof Worker !== "undefined" && typeof Blob !== "undefined") {
    try {
      return await solveInWorker(challenge, difficulty, deadline);
    } catch (e) {
      if (!(e && e.workerUnavailable)) throw e;
      // A Content-Security-Policy without `worker-src blob:`, or no workers: solve here.
    }
  }
  return solveOnMainThread(challenge, difficulty, deadline);
}

// ---------------------------------------------------------------------------------------------
// Storage: IndexedDB (can hold non-extractable CryptoKeys), memory, or the caller's own.

function memoryStore() {
  const map = new Map();
  return {
    persistent: false,
    async get(key) {
      return map.get(key);
    },
    async set(key, value) {
      map.set(key, value);
    },
    async delete(key) {
      map.delete(key);
    },
    async getOrCreate(key, make) {
      if (!map.has(key)) map.set(key, make());
      return map.get(key);
    },
  };
}

function indexedDbStore(name) {
  let opening = null;
  const open = () =>
    opening ||
    (opening = new Promise((resolve, reject) => {
      const req = indexedDB.open(name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("kv");
      req.onsuccess = () => {
        const db = req.result;
        db.onversionchange = () => db.close();
        resolve(db);
      };
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error("IndexedDB is blocked"));
    }));
  const run = async (mode, body) => {
    const db = await open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction("kv", mode);
      let result;
      body(tx.objectStore("kv"), (v) => {
        result = v;
      });
      tx.oncomplete = () => resolve(result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
    });
  };
  return {
    persistent: true,
    open,
    get: (key) =>
      run("readonly", (s, out) => {
        const r = s.get(key);
        r.onsuccess = () => out(r.result);
      }),
    set: (key, value) => run("readwrite", (s) => s.put(value, key)),
    delete: (key) => run("readwrite", (s) => s.delete(key)),
    // One readwrite transaction: two tabs racing get the same value.
    getOrCreate: (key, make) =>
      run("readwrite", (s, out) => {
        const r = s.get(key);
        r.onsuccess = () => {
          if (r.result !== undefined) {
            out(r.result);
          } else {
            const v = make();
            s.put(v, key);
            out(v);
          }
        };
      }),
  };
}

// Wraps a store so that any failure (private mode, quota, a value it cannot clone) degrades to
// memory instead of breaking the client.
function resilient(store) {
  const memory = memoryStore();
  let broken = false;
  const guard = (op) => async (...args) => {
    if (!broken) {
      try {
        return await store[op](...args);
      } catch (_) {
        broken = true;
      }
    }
    return memory[op](...args);
  };
  return {
    get persistent() {
      return !broken && store.persistent !== false;
    },
    get: guard("get"),
    set: guard("set"),
    delete: guard("delete"),
    getOrCreate: guard("getOrCreate"),
  };
}

async function resolveStore(storage) {
  if (storage === "memory") return memoryStore();
  if (storage && typeof storage === "object") {
    const custom = {
      persistent: storage.persistent !== false,
      get: (k) => storage.get(k),
      set: (k, v) => storage.set(k, v),
      delete: (k) => storage.delete(k),
      getOrCreate: storage.getOrCreate
        ? (k, make) => storage.getOrCreate(k, make)
        : async (k, make) => {
            const v = await storage.get(k);
            if (v !== undefined && v !== null) return v;
            const fresh = make();
            await storage.set(k, fresh);
            return fresh;
          },
    };
    return resilient(custom);
  }
  if (storage !== undefined && storage !== "indexeddb") {
    throw new TypeError(`perishable: unknown storage ${JSON.stringify(storage)}`);
  }
  if (typeof indexedDB === "undefined") return memoryStore();
  const idb = indexedDbStore("perishable");
  try {
    await idb.open();
  } catch (_) {
    return memoryStore();
  }
  return resilient(idb);
}

// ---------------------------------------------------------------------------------------------
// Fingerprint: browser characteristics (never pointer or key data), plus a random install id
// when storage persists, so two users with identical browsers do not share a fingerprint (the
// server caps sessions and rate-limits per fingerprint). Not secret: it is sent in a header.

async function deriveFingerprint(store) {
  const nav = globalThis.navigator || {};
  const scr = globalThis.screen || {};
  let timeZone = "";
  try {
    timeZone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  } catch (_) {
    // No Intl time zone.
  }
  let install = null;
  if (store.persistent) {
    try {
      install = await store.getOrCreate("install", () => randomId(16));
    } catch (_) {
      install = null;
    }
  }
  const traits = [
    "perishable-fp-1",
    nav.userAgent || "",
    nav.language || "",
    nav.languages ? Array.prototype.join.call(nav.languages, ",") : "",
    nav.platform || "",
    nav.hardwareConcurrency || 0,
    nav.deviceMemory || 0,
    nav.maxTouchPoints || 0,
    timeZone,
    scr.colorDepth || 0,
    install || "",
  ];
  return "pfp1." + b64url(await sha256(utf8(JSON.stringify(traits))));
}

// ---------------------------------------------------------------------------------------------
// Interaction samples, in the PROTOCOL entropy shape: `[t_ms, x, y]` pointer samples and key
// times (never key values), each a ring of the latest 512, t relative to when collecting began.

function createCollector() {
  let origin = null;
  const pointer = [];
  const keys = [];
  const attached = [];
  const round = (v) => Math.round(v * 10) / 10;
  const now = () => performance.now() - origin;
  const push = (ring, sample) => {
    ring.push(sample);
    if (ring.length > MAX_SAMPLES) ring.splice(0, ring.length - MAX_SAMPLES);
  };
  const onPointer = (e) => {
    if (typeof e.clientX === "number") push(pointer, [round(now()), round(e.clientX), round(e.clientY)]);
  };
  const onTouch = (e) => {
    const t = e.touches && e.touches[0];
    if (!t) return;
    const x = round(t.clientX);
    const y = round(t.clientY);
    const last = pointer[pointer.length - 1];
    if (last && last[1] === x && last[2] === y) return; // the same move as a pointer event
    push(pointer, [round(now()), x, y]);
  };
  const onKey = (e) => {
    if (!e.repeat) push(keys, round(now()));
  };
  const pointerEvents = typeof PointerEvent !== "undefined";
  const listeners = [
    [pointerEvents ? "pointermove" : "mousemove", onPointer],
    [pointerEvents ? "pointerdown" : "mousedown", onPointer],
    ["touchmove", onTouch],
    ["keydown", onKey],
  ];
  const opts = { capture: true, passive: true };
  return {
    start(target) {
      const t = target || globalThis.document || globalThis;
      if (!t || typeof t.addEventListener !== "function") return;
      if (attached.indexOf(t) !== -1) return;
      if (origin === null) origin = performance.now();
      for (const [type, fn] of listeners) t.addEventListener(type, fn, opts);
      attached.push(t);
    },
    stop() {
      while (attached.length) {
        const t = attached.pop();
        for (const [type, fn] of listeners) t.removeEventListener(type, fn, opts);
      }
    },
    snapshot() {
      return {
        pointer: pointer.slice(),
        keys: keys.slice(),
        elapsed_ms: origin === null ? 0 : Math.round(now()),
      };
    },
    clear() {
      pointer.length = 0;
      keys.length = 0;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// DPoP (RFC 9449): a non-extractable ECDSA P-256 key, ES256 proofs.

async function loadOrCreateKey(store, name) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) return null;
  const isPair = (p) => p && p.privateKey && p.publicKey && p.privateKey.type === "private";
  let pair = null;
  try {
    const stored = await store.get(name);
    if (isPair(stored)) pair = stored;
  } catch (_) {
    pair = null;
  }
  if (!pair) {
    let fresh;
    try {
      fresh = await subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, [
        "sign",
        "verify",
      ]);
    } catch (_) {
      return null;
    }
    try {
      const kept = await store.getOrCreate(name, () => fresh);
      pair = isPair(kept) ? kept : fresh;
    } catch (_) {
      pair = fresh;
    }
  }
  try {
    const j = await subtle.exportKey("jwk", pair.publicKey);
    const jwk = { kty: j.kty, crv: j.crv, x: j.x, y: j.y };
    const canonical = `{"crv":"${jwk.crv}","kty":"EC","x":"${jwk.x}","y":"${jwk.y}"}`;
    const jkt = b64url(await sha256(utf8(canonical)));
    return { pair, jwk, jkt };
  } catch (_) {
    return null;
  }
}

function jws(obj) {
  return b64url(utf8(JSON.stringify(obj)));
}

async function dpopProof(key, htm, htu, iat, token) {
  const payload = { jti: randomId(16), htm, htu, iat };
  if (token) payload.ath = b64url(await sha256(utf8(token)));
  const input = jws({ typ: "dpop+jwt", alg: "ES256", jwk: key.jwk }) + "." + jws(payload);
  const sig = await crypto.subtle.sign(
    { name: "ECDSA", hash: "SHA-256" },
    key.pair.privateKey,
    utf8(input),
  );
  return input + "." + b64url(sig);
}

// ---------------------------------------------------------------------------------------------
// Requests

const STANDARD_METHODS = ["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"];

// What fetch would send: standard methods upper-cased, others as given.
function normalizeMethod(m) {
  const up = String(m || "GET").toUpperCase();
  return STANDARD_METHODS.indexOf(up) !== -1 ? up : String(m);
}

function documentBase() {
  const loc = globalThis.location;
  if (globalThis.document && globalThis.document.baseURI) return globalThis.document.baseURI;
  return loc ? loc.href : undefined;
}

// Reads what fetch(input, init) would send into a re-sendable form (streams become bytes).
async function normalizeRequest(input, init) {
  let url;
  let method = "GET";
  let headers = new Headers();
  let body;
  let opts = {};
  if (typeof Request !== "undefined" && input instanceof Request) {
    url = input.url;
    method = input.method;
    headers = new Headers(input.headers);
    opts = {
      signal: input.signal,
      credentials: input.credentials,
      cache: input.cache,
      redirect: input.redirect,
      referrerPolicy: input.referrerPolicy,
      integrity: input.integrity,
      keepalive: input.keepalive,
    };
    if (input.mode && input.mode !== "navigate") opts.mode = input.mode;
    if (input.body && !(init && "body" in init)) body = await input.clone().arrayBuffer();
  } else {
    url = input instanceof URL ? input.href : String(input);
  }
  if (init) {
    const rest = Object.assign({}, init);
    delete rest.headers;
    delete rest.body;
    delete rest.method;
    delete rest.duplex;
    opts = Object.assign(opts, rest);
    if (init.method) method = init.method;
    if (init.headers) headers = new Headers(init.headers);
    if ("body" in init) body = init.body;
  }
  if (typeof ReadableStream !== "undefined" && body instanceof ReadableStream) {
    body = await new Response(body).arrayBuffer();
  }
  method = normalizeMethod(method);
  if (method === "GET" || method === "HEAD") body = undefined;
  return { url: new URL(url, documentBase()), method, headers, body, opts };
}

async function errorOf(response) {
  try {
    const type = response.headers.get("content-type") || "";
    if (type.indexOf("json") === -1) return null;
    const body = await response.clone().json();
    return body && body.error ? body.error : null;
  } catch (_) {
    return null;
  }
}

// A refused response as a PerishableError whose `response` can still be read.
async function refusal(response, what) {
  const text = await response.text().catch(() => "");
  let error = null;
  try {
    error = JSON.parse(text).error || null;
  } catch (_) {
    error = null;
  }
  const copy = new Response(text, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
  const message = error && error.message ? error.message : `HTTP ${response.status}`;
  return new PerishableError(`perishable: ${what} refused: ${message}`, {
    status: response.status,
    code: error && error.code,
    type: error && error.type,
    response: copy,
  });
}

// Server time offset (seconds) from a response's Date header, when the page can read it.
function offsetFromDate(response) {
  const date = response && response.headers && response.headers.get("date");
  if (!date) return null;
  const server = Date.parse(date);
  if (!Number.isFinite(server)) return null;
  return Math.round((server - Date.now()) / 1000);
}

// ---------------------------------------------------------------------------------------------
// The client

/**
 * Creates a client for the Perishable router mounted at `options.baseURL`.
 * See perishable.d.ts and docs/client.md for every option.
 */
export async function createClient(options) {
  const o = options || {};
  if (!o.baseURL) throw new TypeError("perishable: createClient needs { baseURL }");
  const base = new URL(String(o.baseURL), documentBase());
  base.search = "";
  base.hash = "";
  const baseURL = base.href.replace(/\/+$/, "");
  const basePath = new URL(baseURL + "/").pathname; // always ends with "/"
  const baseFetch = o.fetch || ((input, init) => globalThis.fetch(input, init));
  const refreshBefore = o.refreshBefore === undefined ? 60 : Number(o.refreshBefore);
  const dpopMode = o.dpop === undefined || o.dpop === true ? "auto" : o.dpop === false ? "off" : o.dpop;
  if (["auto", "off", "required"].indexOf(dpopMode) === -1) {
    throw new TypeError(`perishable: dpop must be "auto", "off" or "required"`);
  }
  const useWorker = o.worker !== false;
  const onSession = typeof o.onSession === "function" ? o.onSession : null;
  // Evidence for the mint gates (docs/gates.md): the signed-in user's ID token and a captcha
  // token, each a string or a function returning one (called at every mint: ID tokens expire,
  // captcha tokens are single use). Omitted from the mint when absent or empty.
  for (const name of ["idToken", "captcha"]) {
    const v = o[name];
    if (v !== undefined && v !== null && typeof v !== "string" && typeof v !== "function") {
      throw new TypeError(`perishable: ${name} must be a string or a function returning one`);
    }
  }
  const evidence = async (v) => {
    const value = typeof v === "function" ? await v() : v;
    return typeof value === "string" && value !== "" ? value : null;
  };

  const store = await resolveStore(o.storage);
  const collector = createCollector();
  if (o.collect !== false) collector.start(o.collectTarget);

  let fingerprint;
  if (typeof o.fingerprint === "function") fingerprint = String(await o.fingerprint());
  else if (typeof o.fingerprint === "string") fingerprint = o.fingerprint;
  else fingerprint = await deriveFingerprint(store);
  if (!/^[\x20-\x7e]{8,512}$/.test(fingerprint)) {
    throw new TypeError("perishable: the fingerprint must be 8 to 512 printable ASCII characters");
  }

  const keyName = "key " + baseURL;
  const sessionName = "session " + baseURL;
  const key = dpopMode === "off" ? null : await loadOrCreateKey(store, keyName);
  if (dpopMode === "required" && !key) {
    throw new PerishableError(
      "perishable: DPoP is required but WebCrypto ECDSA P-256 is not available (a secure context is needed)",
      { code: "dpop_unavailable" },
    );
  }

  // Seconds to add to the local clock to get the server's (DPoP iat, expiry).
  let offset = 0;
  const serverNow = () => Date.now() / 1000 + offset;
  const adoptOffset = (value) => {
    if (value !== null && value !== undefined && Number.isFinite(value)) {
      offset = Math.abs(value) >= 2 ? value : 0;
    }
  };

  // { session, lifetime } where lifetime is expires_in at issue.
  let current = null;
  let pending = null;

  const usable = (rec) =>
    rec &&
    rec.session &&
    typeof rec.session.token === "string" &&
    rec.fingerprint === fingerprint &&
    (rec.session.token_type !== "DPoP" || (key && rec.jkt === key.jkt));
  const remaining = (rec) => rec.session.expires_at - serverNow();
  const threshold = (rec) => Math.min(refreshBefore, (rec.lifetime || 0) / 2);

  const notify = () => {
    if (!onSession) return;
    try {
      onSession(publicSession());
    } catch (_) {
      // The callback's errors are its own.
    }
  };

  // A copy of `session` with `expires_in` as of now.
  const sessionView = (session) =>
    Object.assign({}, session, {
      expires_in: Math.max(0, Math.floor(session.expires_at - serverNow())),
    });
  const publicSession = () => (current ? sessionView(current.session) : null);

  async function loadStored() {
    let rec = null;
    try {
      rec = await store.get(sessionName);
    } catch (_) {
      rec = null;
    }
    if (!usable(rec)) return null;
    if (typeof rec.offset === "number") adoptOffset(rec.offset);
    return remaining(rec) > MIN_REFRESH_SECS ? rec : null;
  }

  async function adopt(session) {
    adoptOffset(session.expires_at - session.expires_in - Date.now() / 1000);
    const bound = session.token_type === "DPoP";
    current = {
      session: {
        token: session.token,
        token_type: session.token_type,
        session_id: session.session_id,
        expires_at: session.expires_at,
        expires_in: session.expires_in,
      },
      lifetime: session.expires_in,
      fingerprint,
      jkt: bound && key ? key.jkt : null,
      offset,
    };
    try {
      await store.set(sessionName, current);
    } catch (_) {
      // Kept in memory only.
    }
    notify();
    return current.session;
  }

  // Drops the current session (only if it is `token`, when given), and its stored copy unless
  // another client has stored a newer one since.
  async function forget(token) {
    if (!current || (token !== undefined && current.session.token !== token)) return;
    const dropped = current.session.token;
    current = null;
    try {
      const stored = await store.get(sessionName);
      if (stored && stored.session && stored.session.token === dropped) {
        await store.delete(sessionName);
      }
    } catch (_) {
      // Nothing stored.
    }
    notify();
  }

  async function authHeaders(rec, method, url) {
    const h = { "x-perishable-fingerprint": fingerprint };
    const { token, token_type } = rec.session;
    if (token_type === "DPoP") {
      h.authorization = "DPoP " + token;
      h.dpop = await dpopProof(key, method, url.origin + url.pathname, Math.floor(serverNow()), token);
    } else {
      h.authorization = "Bearer " + token;
    }
    return h;
  }

  async function mint() {
    const challengeRes = await baseFetch(baseURL + "/challenge", {
      method: "GET",
      headers: { accept: "application/json" },
    });
    if (!challengeRes.ok) throw await refusal(challengeRes, "GET /challenge");
    adoptOffset(offsetFromDate(challengeRes));
    const challenge = await challengeRes.json();
    let pow = null;
    if (challenge.difficulty > 0) {
      const deadline = (challenge.expires_at - offset) * 1000 - 1000;
      const nonce = await solvePow(challenge.challenge, challenge.difficulty, deadline, useWorker);
      pow = { challenge: challenge.challenge, nonce };
    }
    const body = { fingerprint, entropy: collector.snapshot() };
    if (pow) body.pow = pow;
    const idToken = await evidence(o.idToken);
    if (idToken) body.id_token = idToken;
    const captcha = await evidence(o.captcha);
    if (captcha) body.captcha = captcha;
    const headers = { "content-type": "application/json", accept: "application/json" };
    if (key) {
      const url = new URL(baseURL + "/session");
      headers.dpop = await dpopProof(key, "POST", url.origin + url.pathname, Math.floor(serverNow()));
    }
    const res = await baseFetch(baseURL + "/session", {
      method: "POST",
      headers,
      body: JSON.stringify(body),
    });
    if (!res.ok) throw await refusal(res, "POST /session");
    const session = await res.json();
    if (dpopMode === "required" && session.token_type !== "DPoP") {
      throw new PerishableError("perishable: the server minted an unbound session but DPoP is required", {
        code: "dpop_unavailable",
      });
    }
    return adopt(session);
  }

  async function refreshWith(rec) {
    const url = new URL(baseURL + "/session/refresh");
    const res = await baseFetch(url.href, {
      method: "POST",
      headers: Object.assign({ accept: "application/json" }, await authHeaders(rec, "POST", url)),
    });
    if (!res.ok) throw await refusal(res, "POST /session/refresh");
    return adopt(await res.json());
  }

  // One mint or refresh at a time; concurrent callers share it.
  function single(work) {
    if (!pending) {
      pending = (async () => {
        try {
          return await work();
        } finally {
          pending = null;
        }
      })();
    }
    return pending;
  }

  // Another tab, or another client on this page, may have refreshed already (which revoked the
  // token we hold): take the newer stored session.
  async function takeNewerStored() {
    const stored = await loadStored();
    if (
      stored &&
      (!current ||
        (stored.session.token !== current.session.token &&
          stored.session.expires_at >= current.session.expires_at))
    ) {
      current = stored;
      notify();
    }
  }

  async function renew() {
    await takeNewerStored();
    if (current && remaining(current) > threshold(current)) return current.session;
    if (current && remaining(current) > MIN_REFRESH_SECS) {
      try {
        return await refreshWith(current);
      } catch (e) {
        // Refused as expired, revoked or invalid: mint. Otherwise (rate limited, network) keep
        // the session while it lasts and try again on the next request.
        if (!(e instanceof PerishableError && e.status === 401) && remaining(current) > 1) {
          return current.session;
        }
      }
    }
    await forget();
    return mint();
  }

  function getSession() {
    if (current && remaining(current) > threshold(current)) return Promise.resolve(current.session);
    return single(renew);
  }

  // After a 401 with `failedToken`: the newer session if someone replaced it, else a new one.
  async function recover(failedToken) {
    if (pending) {
      const s = await pending.catch(() => null);
      if (s && s.token !== failedToken) return s;
    }
    if (current && current.session.token !== failedToken && remaining(current) > MIN_REFRESH_SECS) {
      return current.session;
    }
    await forget(failedToken);
    return single(async () => {
      const stored = await loadStored();
      if (stored && stored.session.token !== failedToken) {
        current = stored;
        notify();
        return stored.session;
      }
      return mint();
    });
  }

  // Requests to authenticate: under the base URL, except the router's public routes.
  function isOurs(url, method) {
    if (url.origin !== base.origin || url.pathname.indexOf(basePath) !== 0) return false;
    const route = url.pathname.slice(basePath.length - 1);
    if (route === "/health" || route === "/challenge" || route === "/client.js") return false;
    return !(route === "/session" && method === "POST");
  }

  async function send(req, session) {
    const headers = new Headers(req.headers);
    headers.delete("user-agent"); // Pages cannot set it in most browsers; where they can, the session is bound to the real one.
    const rec = { session };
    const auth = await authHeaders(rec, req.method, req.url);
    for (const name of Object.keys(auth)) headers.set(name, auth[name]);
    const init = Object.assign({}, req.opts, { method: req.method, headers });
    if (req.body !== undefined) init.body = req.body;
    return baseFetch(req.url.href, init);
  }

  async function perishableFetch(input, init) {
    const isRequest = typeof Request !== "undefined" && input instanceof Request;
    const target = new URL(isRequest ? input.url : String(input), documentBase());
    const method = normalizeMethod((init && init.method) || (isRequest ? input.method : "GET"));
    if (!isOurs(target, method)) return baseFetch(input, init);
    const req = await normalizeRequest(input, init);
    let session;
    try {
      session = await getSession();
    } catch (e) {
      if (e instanceof PerishableError && e.response) return e.response;
      throw e;
    }
    const response = await send(req, session);
    if (response.status !== 401 && response.status !== 400) return response;
    const error = await errorOf(response);
    const code = error && error.code;
    if (response.status === 401 && REMINT_CODES.indexOf(code) !== -1) {
      let fresh;
      try {
        fresh = await recover(session.token);
      } catch (e) {
        if (e instanceof PerishableError && e.response) return e.response;
        throw e;
      }
      if (response.body) response.body.cancel().catch(() => {});
      return send(req, fresh);
    }
    // RFC 9449 section 7.1: a bad proof on an authenticated request is a 401.
    if (response.status === 401 && code === "invalid_dpop_proof") {
      // Most likely a clock difference (iat): resynchronise from Date when readable, retry once.
      const before = offset;
      adoptOffset(offsetFromDate(response));
      if (offset !== before) {
        if (response.body) response.body.cancel().catch(() => {});
        return send(req, session);
      }
    }
    return response;
  }

  async function revoke() {
    const rec = current;
    if (!rec) return;
    const url = new URL(baseURL + "/session");
    try {
      const res = await baseFetch(url.href, {
        method: "DELETE",
        headers: await authHeaders(rec, "DELETE", url),
      });
      if (!res.ok && res.status !== 401) throw await refusal(res, "DELETE /session");
    } finally {
      await forget(rec.session.token);
    }
  }

  function refreshNow() {
    return single(async () => {
      if (current && remaining(current) > MIN_REFRESH_SECS) {
        try {
          return await refreshWith(current);
        } catch (e) {
          if (!(e instanceof PerishableError && e.status === 401)) throw e;
        }
      }
      await forget();
      return mint();
    });
  }

  // -------------------------------------------------------------------------------------------
  // Realtime: `GET <baseURL>/openai/realtime?model=M` as a WebSocket. A page cannot set headers
  // on a WebSocket, so the credentials go as subprotocols, next to `realtime`. The proxy closes
  // the connection when the token that opened it expires or is revoked (a refresh revokes it).

  const realtimeTarget = new URL(baseURL + "/openai/realtime");
  // The proof's htu: the URL with scheme http(s), without query (PROTOCOL, "Realtime").
  const realtimeHtu = realtimeTarget.origin + realtimeTarget.pathname;
  const realtimeScheme = base.protocol === "https:" ? "wss:" : "ws:";

  function realtimeURL(model) {
    if (typeof model !== "string" || model === "") {
      throw new TypeError("perishable: the Realtime helpers need { model }");
    }
    const url = new URL(realtimeTarget.href);
    url.protocol = realtimeScheme;
    url.searchParams.set("model", model);
    return url.href;
  }

  // Whether `url` (any of ws, wss, http, https) is the proxy's Realtime route.
  function isRealtimeURL(url) {
    return (
      ["ws:", "wss:", "http:", "https:"].indexOf(url.protocol) !== -1 &&
      url.host === realtimeTarget.host &&
      url.pathname === realtimeTarget.pathname
    );
  }

  const isCredential = (p) =>
    p.indexOf(TOKEN_PROTOCOL) === 0 ||
    p.indexOf(FINGERPRINT_PROTOCOL) === 0 ||
    p.indexOf(DPOP_PROTOCOL) === 0;

  // `realtime`, this session's credentials, then the caller's other subprotocols.
  function realtimeProtocolList(credentials, offered) {
    let list = [];
    if (typeof offered === "string") list = [offered];
    else if (offered !== undefined && offered !== null) list = Array.from(offered, String);
    const rest = list.filter((p) => p !== REALTIME_PROTOCOL && !isCredential(p));
    return [REALTIME_PROTOCOL].concat(credentials, rest);
  }

  // A live session with at least `minLifetime` seconds left (default: half its lifetime, so the
  // connection, which ends with the token, gets a useful share of it); refreshed first if not.
  async function realtimeSession(opts) {
    // A refused handshake tells the page nothing (no status), so there is no retry on a 401 as
    // `fetch` has: look for a session another tab refreshed (revoking ours) before opening.
    if (current && !pending) await takeNewerStored();
    let session = await getSession();
    const rec = current;
    if (rec && rec.session.token === session.token) {
      const lifetime = rec.lifetime || 0;
      const wanted = opts.minLifetime === undefined ? lifetime / 2 : Number(opts.minLifetime);
      if (!(wanted >= 0)) throw new TypeError("perishable: minLifetime must be a number of seconds");
      if (remaining(rec) < wanted) session = await refreshNow();
    }
    return session;
  }

  // The credential subprotocols for `session`, with a fresh proof (each is good for one handshake).
  async function realtimeCredentials(session) {
    const protocols = [
      TOKEN_PROTOCOL + session.token,
      FINGERPRINT_PROTOCOL + b64url(utf8(fingerprint)),
    ];
    if (session.token_type === "DPoP") {
      const iat = Math.floor(serverNow());
      protocols.push(DPOP_PROTOCOL + (await dpopProof(key, "GET", realtimeHtu, iat, session.token)));
    }
    return protocols;
  }

  async function realtimeProtocols(options) {
    const opts = options || {};
    const url = realtimeURL(opts.model);
    const session = await realtimeSession(opts);
    const protocols = realtimeProtocolList(await realtimeCredentials(session), opts.protocols);
    return { url, protocols, session: sessionView(session) };
  }

  async function realtimeWebSocket(options) {
    const opts = options || {};
    const Socket = opts.WebSocket || globalThis.WebSocket;
    if (typeof Socket !== "function") {
      throw new PerishableError("perishable: this environment has no WebSocket", {
        code: "websocket_unavailable",
      });
    }
    const { url, protocols } = await realtimeProtocols(opts);
    return new Socket(url, protocols);
  }

  // Runs `open` with `globalThis.WebSocket` wrapped, so that the one WebSocket it opens to the
  // Realtime route carries this session's credentials (in place of any `openai-insecure-api-key.`
  // subprotocol it offered) and the base URL's scheme (the SDK always asks for wss:). The wrapper
  // is in place only while `open` runs, synchronously, and is restored even when it throws.
  async function withRealtime(open, options) {
    if (typeof open !== "function") {
      throw new TypeError("perishable: withRealtime needs a function that opens the WebSocket");
    }
    const opts = options || {};
    const Original = globalThis.WebSocket;
    if (typeof Original !== "function") {
      throw new PerishableError("perishable: this environment has no WebSocket", {
        code: "websocket_unavailable",
      });
    }
    const session = await realtimeSession(opts);
    const credentials = await realtimeCredentials(session);
    let opened = 0;
    const adjust = (url, protocols) => {
      let target = null;
      try {
        target = new URL(String(url), documentBase());
      } catch (_) {
        target = null; // Not a URL: the real WebSocket throws its usual SyntaxError.
      }
      if (!target || !isRealtimeURL(target)) {
        return protocols === undefined ? [url] : [url, protocols];
      }
      if (opened++ > 0) {
        throw new PerishableError(
          "perishable: withRealtime opens one Realtime WebSocket per call (each needs fresh credentials)",
          { code: "realtime_one_socket" },
        );
      }
      target.protocol = realtimeScheme;
      return [target.href, realtimeProtocolList(credentials, protocols)];
    };
    class PerishableWebSocket extends Original {
      constructor(url, protocols) {
        super(...adjust(url, protocols));
      }
    }
    let result;
    globalThis.WebSocket = PerishableWebSocket;
    try {
      if (globalThis.WebSocket !== PerishableWebSocket) {
        throw new PerishableError("perishable: globalThis.WebSocket cannot be replaced here", {
          code: "websocket_unavailable",
        });
      }
      result = open(sessionView(session));
    } finally {
      if (globalThis.WebSocket === PerishableWebSocket) globalThis.WebSocket = Original;
    }
    if (!opened) {
      throw new PerishableError(
        `perishable: withRealtime's function opened no WebSocket to ${realtimeTarget.href} ` +
          `(open it synchronously, with the SDK's baseURL set to ${baseURL}/openai)`,
        { code: "realtime_not_opened" },
      );
    }
    return result;
  }

  function realtimeSDK(RealtimeWebSocket, props, client, options) {
    if (typeof RealtimeWebSocket !== "function") {
      return Promise.reject(
        new TypeError("perishable: realtimeSDK needs the SDK's OpenAIRealtimeWebSocket class"),
      );
    }
    if (!client) {
      return Promise.reject(
        new TypeError(`perishable: realtimeSDK needs an OpenAI client with baseURL ${baseURL}/openai`),
      );
    }
    // No secret key is in the page: the SDK's browser guard does not apply.
    const sdkProps = Object.assign({ dangerouslyAllowBrowser: true }, props);
    return withRealtime(() => new RealtimeWebSocket(sdkProps, client), options);
  }

  // A session stored by an earlier page load (same browser, key and fingerprint).
  const stored = await loadStored();
  if (stored) current = stored;

  return {
    /** The absolute base URL of the router, without a trailing slash. */
    baseURL,
    /** Whether requests carry DPoP proofs from a non-extractable key. */
    get dpop() {
      return !!key && (!current || current.session.token_type === "DPoP");
    },
    /** Whether the key and session persist across page loads (IndexedDB). */
    get persistent() {
      return !!store.persistent;
    },
    fetch: perishableFetch,
    session: publicSession,
    getSession,
    refresh: refreshNow,
    revoke,
    realtimeWebSocket,
    realtimeProtocols,
    withRealtime,
    realtimeSDK,
    fingerprint: async () => fingerprint,
    startCollecting: (target) => collector.start(target),
    stopCollecting: () => collector.stop(),
    entropy: () => collector.snapshot(),
    close() {
      collector.stop();
    },
  };
}
