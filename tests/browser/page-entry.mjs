// Bundled by run.mjs (esbuild, IIFE) and injected into the proxy's demo page, so it runs on the
// proxy's own origin. It uses the official `openai` SDK (its HTTP client, and its Realtime
// `OpenAIRealtimeWebSocket`) with the client module the proxy serves at /client.js (loaded with a
// dynamic import, left external by the bundler).
import OpenAI from "openai";
import { OpenAIRealtimeWebSocket } from "openai/realtime/websocket";

let client = null;
let sdkHeaders = null;

window.__perishableTest = {
  /** Creates a client on this page (it starts collecting interaction at once). */
  async setup() {
    const { createClient, VERSION } = await import("/client.js");
    client = await createClient({ baseURL: location.origin });
    return { version: VERSION, dpop: client.dpop, persistent: client.persistent };
  },

  /** The samples a mint would send now (counts only). */
  entropy() {
    const e = client.entropy();
    return { pointer: e.pointer.length, keys: e.keys.length, elapsed_ms: e.elapsed_ms };
  },

  /** Mints, then streams a chat completion through the official SDK, timing each chunk. */
  async streamChat(prompt) {
    const t0 = performance.now();
    const session = await client.getSession();
    const mintMs = performance.now() - t0;
    const openai = new OpenAI({
      baseURL: client.baseURL + "/openai",
      apiKey: "perishable",
      dangerouslyAllowBrowser: true,
      maxRetries: 0,
      fetch: (url, init) => {
        if (!sdkHeaders) sdkHeaders = [...new Headers(init && init.headers).keys()];
        return client.fetch(url, init);
      },
    });
    const stream = await openai.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: prompt }],
      stream: true,
    });
    const start = performance.now();
    const chunks = [];
    let content = "";
    let finish = null;
    for await (const chunk of stream) {
      const choice = chunk.choices && chunk.choices[0];
      const text = (choice && choice.delta && choice.delta.content) || "";
      chunks.push({ t: Math.round((performance.now() - start) * 10) / 10, n: text.length });
      content += text;
      if (choice && choice.finish_reason) finish = choice.finish_reason;
    }
    // The same session still works from here, with the key: the control for the replay test.
    const models = await openai.models.list();
    return {
      session: client.session(),
      minted_session: session,
      mint_ms: Math.round(mintMs),
      chunks,
      content,
      finish,
      models: models.data.map((m) => m.id),
      sdk_headers: sdkHeaders,
      fingerprint: await client.fingerprint(),
      user_agent: navigator.userAgent,
      dpop: client.dpop,
    };
  },

  /** Realtime through the helper's raw WebSocket; see `realtimeTalk`. */
  async realtimeRaw(model, prompt) {
    const t0 = performance.now();
    const socket = await client.realtimeWebSocket({ model });
    const out = await realtimeTalk(socket, (event) => socket.send(JSON.stringify(event)), prompt);
    return Object.assign(out, {
      open_ms: Math.round(performance.now() - t0),
      session: client.session(),
      dpop: client.dpop,
    });
  },

  /**
   * Realtime through the official SDK's OpenAIRealtimeWebSocket, given the same OpenAI client
   * the page uses for HTTP (placeholder key, the proxy's base URL).
   */
  async realtimeSDK(model, prompt) {
    const NativeWebSocket = globalThis.WebSocket;
    const openai = new OpenAI({
      baseURL: client.baseURL + "/openai",
      apiKey: "perishable",
      dangerouslyAllowBrowser: true,
      maxRetries: 0,
      fetch: (url, init) => client.fetch(url, init),
    });
    const rt = await client.realtimeSDK(OpenAIRealtimeWebSocket, { model }, openai);
    const restored = globalThis.WebSocket === NativeWebSocket;
    const sdkEvents = [];
    const sdkErrors = [];
    rt.on("error", (e) => sdkErrors.push(String((e && e.message) || e)));
    for (const type of ["session.created", "response.output_text.delta", "response.done"]) {
      rt.on(type, () => sdkEvents.push(type));
    }
    const out = await realtimeTalk(rt.socket, (event) => rt.send(event), prompt);
    return Object.assign(out, {
      sdk_url: String(rt.url),
      sdk_events: sdkEvents,
      sdk_errors: sdkErrors,
      websocket_restored: restored,
      is_native_websocket: rt.socket instanceof NativeWebSocket,
      session: client.session(),
    });
  },

  /**
   * A connection ends when its token is revoked: socket A is open when socket B's
   * `minLifetime` (more than any session has) makes the client refresh first, which revokes
   * A's token.
   */
  async realtimeRefresh(model) {
    const before = client.session().session_id;
    const a = await client.realtimeWebSocket({ model });
    const aOpened = await opens(a);
    const aClosed = new Promise((resolve) =>
      a.addEventListener("close", (e) => resolve({ code: e.code, reason: e.reason })),
    );
    const b = await client.realtimeWebSocket({ model, minLifetime: 1e9 });
    const bOpened = await opens(b);
    const after = client.session().session_id;
    const timeout = new Promise((resolve) => setTimeout(() => resolve({ timed_out: true }), 10000));
    const aClose = await Promise.race([aClosed, timeout]);
    b.close(1000, "done");
    return { before, after, a_opened: aOpened, b_opened: bOpened, a_close: aClose };
  },

  /** Handshakes the proxy must refuse: each is `{ opened, close_code, error }`. */
  async realtimeRefused(model) {
    const swap = (protocols, prefix, value) =>
      protocols
        .filter((p) => !p.startsWith(prefix))
        .concat(value === null ? [] : [prefix + value]);
    const b64url = (s) => btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    const out = {};

    // Another device's fingerprint, with this session's token and a fresh proof.
    let c = await client.realtimeProtocols({ model });
    out.wrong_fingerprint = await attempt(
      c.url,
      swap(c.protocols, "perishable-fingerprint.", b64url("someone-elses-device")),
    );
    // A key-bound session without its proof.
    c = await client.realtimeProtocols({ model });
    out.without_proof = await attempt(c.url, swap(c.protocols, "perishable-dpop.", null));
    // A proof used once already: it opens the first time, and is refused the second.
    c = await client.realtimeProtocols({ model });
    out.first_use = await attempt(c.url, c.protocols);
    out.replayed_proof = await attempt(c.url, c.protocols);
    // Without the token.
    c = await client.realtimeProtocols({ model });
    out.without_token = await attempt(c.url, swap(c.protocols, "openai-insecure-api-key.", null));

    // withRealtime refuses a function that opens no socket to the proxy, and restores the global.
    const NativeWebSocket = globalThis.WebSocket;
    try {
      await client.withRealtime(() => null);
      out.not_opened = { rejected: false };
    } catch (e) {
      out.not_opened = { rejected: true, code: e.code, name: e.name };
    }
    out.not_opened.restored = globalThis.WebSocket === NativeWebSocket;
    try {
      await client.withRealtime(() => {
        throw new Error("boom");
      });
      out.thrown = { rejected: false };
    } catch (e) {
      out.thrown = { rejected: true, message: e.message };
    }
    out.thrown.restored = globalThis.WebSocket === NativeWebSocket;
    return out;
  },
};

/**
 * Waits for `session.created` on `socket`, sends a user message and `response.create` with
 * `send`, collects the text deltas until `response.done`, then closes.
 */
function realtimeTalk(socket, send, prompt) {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const types = [];
    const deltas = [];
    let created = null;
    let opened = false;
    const timer = setTimeout(() => finish(new Error(`timed out; events: ${types.join(", ")}`)), 20000);
    function finish(error, done) {
      clearTimeout(timer);
      if (error) {
        try {
          socket.close();
        } catch (_) {
          // Already closed.
        }
        reject(error);
        return;
      }
      socket.addEventListener("close", (e) => {
        resolve({
          url: socket.url,
          protocol: socket.protocol,
          types,
          session_created: created,
          deltas,
          text: deltas.map((d) => d.delta).join(""),
          done,
          close_code: e.code,
        });
      });
      socket.close(1000, "done");
    }
    socket.addEventListener("open", () => {
      opened = true;
    });
    socket.addEventListener("close", (e) => {
      if (!opened) finish(new Error(`the Realtime socket closed before opening (${e.code})`));
    });
    socket.addEventListener("message", (message) => {
      const event = JSON.parse(message.data);
      types.push(event.type);
      if (event.type === "session.created") {
        created = event.session;
        send({
          type: "conversation.item.create",
          item: { type: "message", role: "user", content: [{ type: "input_text", text: prompt }] },
        });
        send({ type: "response.create" });
      } else if (event.type === "response.output_text.delta") {
        deltas.push({ t: Math.round((performance.now() - started) * 10) / 10, delta: event.delta });
      } else if (event.type === "response.done") {
        finish(null, event.response);
      } else if (event.type === "error") {
        finish(new Error(`Realtime error event: ${JSON.stringify(event.error)}`));
      }
    });
  });
}

/** Whether `socket` opens (true) or closes first (false). */
function opens(socket) {
  return new Promise((resolve) => {
    socket.addEventListener("open", () => resolve(true));
    socket.addEventListener("close", () => resolve(false));
  });
}

/** Opens a WebSocket with `protocols` and reports whether it opened, and how it closed. */
function attempt(url, protocols) {
  return new Promise((resolve) => {
    const socket = new WebSocket(url, protocols);
    const out = { opened: false, error: false, close_code: null, protocol: null };
    socket.addEventListener("open", () => {
      out.opened = true;
      out.protocol = socket.protocol;
      socket.close(1000, "enough");
    });
    socket.addEventListener("error", () => {
      out.error = true;
    });
    socket.addEventListener("close", (e) => {
      out.close_code = e.code;
      resolve(out);
    });
  });
}
