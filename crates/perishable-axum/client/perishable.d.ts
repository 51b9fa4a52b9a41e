// Types for perishable.js, the Perishable browser client (served at `GET /client.js`).
// See docs/client.md.

/** The module's version. */
export const VERSION: string;

/** The session object of `POST /session` and `POST /session/refresh` (wire protocol, version 1). */
export interface Session {
  /** The session token (a JWT). Useless without the fingerprint, and without the key when DPoP-bound. */
  token: string;
  /** `"DPoP"` for a key-bound session, `"Bearer"` otherwise. */
  token_type: "DPoP" | "Bearer" | string;
  /** The token's `jti`. */
  session_id: string;
  /** Unix seconds (server clock). */
  expires_at: number;
  /** Seconds left (recomputed whenever `session()` is called). */
  expires_in: number;
}

/** The PROTOCOL `entropy` object: raw interaction samples. */
export interface Entropy {
  /** `[t_ms, x, y]`, at most 512, oldest dropped first. */
  pointer: Array<[number, number, number]>;
  /** Key-press times in ms (never key values), at most 512. */
  keys: number[];
  /** Milliseconds since collecting started. */
  elapsed_ms: number;
}

/**
 * A key-value store for the key pair, the session and the install id. Values are structured
 * clones that include `CryptoKey` objects, so only a store built on IndexedDB keeps the key
 * across page loads without making it extractable.
 */
export interface PerishableStorage {
  get(key: string): Promise<unknown>;
  set(key: string, value: unknown): Promise<void>;
  delete(key: string): Promise<void>;
  /** Optional: an atomic get-or-insert (the built-in IndexedDB store uses one transaction). */
  getOrCreate?(key: string, make: () => unknown): Promise<unknown>;
  /** Set to false if values do not survive a page load. Default true. */
  persistent?: boolean;
}

export interface ClientOptions {
  /**
   * Where the Perishable router is mounted: `"https://api.example.com/ai"`, or a path such as
   * `"/ai"` resolved against the page. Requests through `fetch` are authenticated only when
   * they go to this origin and path (or below it); anything else passes through untouched.
   */
  baseURL: string | URL;
  /**
   * The device fingerprint (8 to 512 printable ASCII characters), or a function returning it.
   * Default: derived from browser characteristics and a random install id kept in storage.
   */
  fingerprint?: string | (() => string | Promise<string>);
  /**
   * `"indexeddb"` (default; falls back to memory when IndexedDB cannot be opened), `"memory"`
   * (nothing survives the page), or your own store.
   */
  storage?: "indexeddb" | "memory" | PerishableStorage;
  /**
   * `"auto"` / `true` (default): bind sessions to a non-extractable WebCrypto key when the
   * browser can, else use Bearer sessions. `"required"`: fail instead of falling back.
   * `"off"` / `false`: Bearer sessions only.
   */
  dpop?: "auto" | "required" | "off" | boolean;
  /** Start collecting interaction samples at once (default true). */
  collect?: boolean;
  /** Where to listen for pointer, touch and key events (default `document`). */
  collectTarget?: EventTarget;
  /** Refresh when fewer seconds than this are left (default 60; at most half the session's lifetime). */
  refreshBefore?: number;
  /** Solve the proof of work in a Web Worker (default true; falls back to the main thread). */
  worker?: boolean;
  /** The fetch used underneath (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Called with the new session (or null) whenever it is minted, refreshed, adopted or dropped. */
  onSession?: (session: Session | null) => void;
  /**
   * The signed-in user's OpenID Connect ID token, for the `oidc` mint gate (docs/gates.md): a
   * string, or a function returning one, called at every mint (e.g. `() => user.getIdToken()`
   * with Firebase Auth). Sent as `id_token`; omitted when empty.
   */
  idToken?: string | (() => string | null | Promise<string | null>);
  /**
   * A captcha token (Turnstile, hCaptcha, reCAPTCHA), for the `captcha` mint gate: a function
   * returning a fresh token at every mint (tokens are single use). Sent as `captcha`.
   */
  captcha?: string | (() => string | null | Promise<string | null>);
}

/** When a Realtime helper refreshes the session before opening a connection. */
export interface RealtimeSessionOptions {
  /**
   * Refresh first when the session has fewer seconds left than this (default: half its lifetime).
   * The proxy closes a Realtime connection when the token that opened it expires or is revoked,
   * and a refresh revokes the old token: the connection lasts at most what the session has left.
   */
  minLifetime?: number;
}

/** Options of `realtimeWebSocket` and `realtimeProtocols`. */
export interface RealtimeOptions extends RealtimeSessionOptions {
  /** The model, sent as `?model=` (checked against the proxy's `upstream.allowed_models`). */
  model: string;
  /** More subprotocols to offer after `realtime` and the credentials (e.g. `"openai-beta.realtime-v1"`). */
  protocols?: string | string[];
  /** The WebSocket constructor (default `globalThis.WebSocket`); only `realtimeWebSocket` uses it. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
}

/** What a Realtime handshake needs: for a WebSocket library other than the browser's. */
export interface RealtimeConnection {
  /** `ws(s)://.../openai/realtime?model=M`: the base URL with scheme ws or wss. */
  url: string;
  /**
   * `realtime`, `openai-insecure-api-key.<token>`, `perishable-fingerprint.<base64url>`,
   * `perishable-dpop.<proof>` (key-bound sessions), then `options.protocols`. The proof is good
   * for one handshake, within a minute.
   */
  protocols: string[];
  /** The session the credentials are of. */
  session: Session;
}

export interface PerishableClient {
  /** The absolute base URL, without a trailing slash. Use `baseURL + "/openai"` for SDKs. */
  readonly baseURL: string;
  /** Whether requests carry DPoP proofs from a non-extractable key. */
  readonly dpop: boolean;
  /** Whether the key and session survive a page load. */
  readonly persistent: boolean;
  /**
   * A drop-in `fetch`: for requests under `baseURL` it mints or refreshes the session as needed,
   * adds `Authorization`, `X-Perishable-Fingerprint` and a fresh `DPoP` proof, and after a 401
   * `token_expired`, `session_revoked` or `invalid_token` replaces the session and retries once.
   * When no session can be minted it resolves with the server's refusal (for example
   * `400 insufficient_entropy`), so SDKs raise their usual errors.
   */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;
  /** The current session, or null (never mints). */
  session(): Session | null;
  /** The current session, minted or refreshed first when needed. Rejects with PerishableError. */
  getSession(): Promise<Session>;
  /** Refreshes now (mints when there is no live session). */
  refresh(): Promise<Session>;
  /** Revokes the session on the server (`DELETE /session`) and forgets it. */
  revoke(): Promise<void>;
  /**
   * Opens `GET <baseURL>/openai/realtime?model=M` as a WebSocket (scheme ws or wss, as the base
   * URL's) with the session's credentials as subprotocols and a fresh DPoP proof when the session
   * is key-bound; mints or refreshes first when needed. Resolves with the socket as
   * `new WebSocket` returns it (connecting). A refused handshake shows as an `error` event, then
   * `close` (1006), without `open`. The proxy answers with the `realtime` subprotocol.
   */
  realtimeWebSocket(options: RealtimeOptions): Promise<WebSocket>;
  /** The URL and subprotocols of one Realtime handshake, for another WebSocket library. */
  realtimeProtocols(options: RealtimeOptions): Promise<RealtimeConnection>;
  /**
   * Runs `open`, which must synchronously open one WebSocket to `<baseURL>/openai/realtime`
   * (usually through an SDK), with `globalThis.WebSocket` wrapped for the duration of that call
   * only (restored even when `open` throws). The wrapper gives that one socket the session's
   * credentials, in place of any `openai-insecure-api-key.` subprotocol offered, and the base
   * URL's scheme; other sockets pass through untouched. Resolves with what `open` returned;
   * rejects with `PerishableError` code `realtime_not_opened` when no such socket was opened, or
   * `realtime_one_socket` when a second was.
   */
  withRealtime<T>(open: (session: Session) => T, options?: RealtimeSessionOptions): Promise<Awaited<T>>;
  /**
   * The official SDK's `OpenAIRealtimeWebSocket` (`openai/realtime/websocket`), unchanged:
   * `withRealtime(() => new RealtimeWebSocket({ dangerouslyAllowBrowser: true, ...props }, client))`.
   * `client` is an `OpenAI` client whose `baseURL` is `baseURL + "/openai"`; its `apiKey` (a
   * placeholder such as `"perishable"`) is replaced by the session token on the socket.
   */
  realtimeSDK<T, P extends { model: string }, C>(
    RealtimeWebSocket: new (props: P & { dangerouslyAllowBrowser?: boolean }, client?: C) => T,
    props: P,
    client: C,
    options?: RealtimeSessionOptions,
  ): Promise<T>;
  /** The fingerprint this client sends. */
  fingerprint(): Promise<string>;
  /** Starts collecting interaction samples on `target` (default `document`). */
  startCollecting(target?: EventTarget): void;
  /** Stops collecting (the samples so far are kept). */
  stopCollecting(): void;
  /** A copy of the samples a mint would send now. */
  entropy(): Entropy;
  /** Stops collecting; the client stays usable. */
  close(): void;
}

/** Creates a client; resolves once the fingerprint, the key and any stored session are loaded. */
export function createClient(options: ClientOptions): Promise<PerishableClient>;

/** An error from Perishable; `status`, `code` and `type` are the server's when it answered. */
export class PerishableError extends Error {
  constructor(
    message: string,
    details?: { status?: number; code?: string | null; type?: string | null; response?: Response | null; cause?: unknown },
  );
  readonly name: "PerishableError";
  /** HTTP status, or 0 when the server was not reached. */
  readonly status: number;
  /** The PROTOCOL error code (`insufficient_entropy`, `pow_invalid`, `origin_not_allowed`, ...), or null. */
  readonly code: string | null;
  /** The PROTOCOL error type (`invalid_request_error`, ...), or null. */
  readonly type: string | null;
  /** The server's refusal as an unread Response, or null. */
  readonly response: Response | null;
}
