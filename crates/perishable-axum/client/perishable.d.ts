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
