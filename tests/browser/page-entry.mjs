// Bundled by run.mjs (esbuild, IIFE) and injected into the proxy's demo page, so it runs on the
// proxy's own origin. It uses the official `openai` SDK with the client module the proxy serves
// at /client.js (loaded with a dynamic import, left external by the bundler).
import OpenAI from "openai";

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
};
