#!/usr/bin/env python3
"""End-to-end client for a Perishable proxy, using the official `openai` Python package.

Usage: python3 tests/python/sdk_client.py http://127.0.0.1:PORT   (or set PROXY_URL)

It does what a real client does, over HTTP (see PROTOCOL.md):

1. GET {proxy}/challenge and solve the proof of work (standard library only);
2. POST {proxy}/session with a fingerprint, a human-like pointer trace and the solution;
3. talk to {proxy}/openai through `openai.OpenAI` with the session token as its API key:
   a streaming chat completion, an embeddings call, models.list(), a request with the wrong
   fingerprint (must raise AuthenticationError, code fingerprint_mismatch) and a disallowed
   path (must raise PermissionDeniedError, code path_not_allowed).

Prints ONE JSON line with the results on stdout; on any failure prints a message on stderr
and exits non-zero. The prompt can be set with the env var SDK_PROMPT.
"""

import hashlib
import json
import math
import os
import random
import sys
import urllib.error
import urllib.request

USER_AGENT = "perishable-sdk-test/1.0"
FINGERPRINT = "sdk-e2e-device-" + "%016x" % random.getrandbits(64)
WRONG_FINGERPRINT = "sdk-e2e-someone-else-0000"
DEFAULT_PROMPT = "Hello from the official OpenAI Python SDK"
TIMEOUT = 30


class Failure(Exception):
    """A check that did not hold."""


def http_json(method, url, body=None):
    """Sends a JSON request with the test User-Agent; returns the decoded JSON response."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("User-Agent", USER_AGENT)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")
        raise Failure(f"{method} {url} answered {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise Failure(f"{method} {url} failed: {error.reason}") from None


def leading_zero_bits(digest):
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        bits += 8 - byte.bit_length()
        break
    return bits


def solve_pow(challenge, difficulty):
    """The first decimal nonce such that SHA-256(challenge + nonce) has `difficulty` zero bits."""
    prefix = challenge.encode("utf-8")
    nonce = 0
    while True:
        digest = hashlib.sha256(prefix + str(nonce).encode("ascii")).digest()
        if leading_zero_bits(digest) >= difficulty:
            return str(nonce)
        nonce += 1


def human_entropy():
    """80 jittered samples along a Lissajous curve, 8 to 38 ms apart."""
    rng = random.Random()
    t = 0.0
    pointer = []
    for i in range(80):
        t += rng.uniform(8.0, 38.0)
        a = i / 15.0
        x = 300.0 + 120.0 * math.cos(a) + rng.uniform(-4.0, 4.0)
        y = 200.0 + 80.0 * math.sin(1.3 * a) + rng.uniform(-4.0, 4.0)
        pointer.append([round(t), round(x), round(y)])
    return {"pointer": pointer, "keys": [], "elapsed_ms": round(t)}


def mint(proxy, fingerprint):
    """GET /challenge, solve it, POST /session; returns the session object."""
    challenge = http_json("GET", f"{proxy}/challenge")
    difficulty = int(challenge.get("difficulty", 0))
    body = {"fingerprint": fingerprint, "entropy": human_entropy()}
    if difficulty > 0:
        if challenge.get("algorithm", "SHA-256") != "SHA-256":
            raise Failure(f"unexpected proof-of-work algorithm: {challenge!r}")
        nonce = solve_pow(challenge["challenge"], difficulty)
        body["pow"] = {"challenge": challenge["challenge"], "nonce": nonce}
    session = http_json("POST", f"{proxy}/session", body)
    if not isinstance(session.get("token"), str) or not session["token"]:
        raise Failure(f"POST /session returned no token: {session!r}")
    if session.get("token_type") != "Bearer":
        raise Failure(f"unexpected token_type: {session!r}")
    return session


def error_code(error):
    """The PROTOCOL `code` of an openai.APIStatusError."""
    code = getattr(error, "code", None)
    if code:
        return str(code)
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return ""


def run(proxy):
    import openai
    from openai import OpenAI

    prompt = os.environ.get("SDK_PROMPT") or DEFAULT_PROMPT
    session = mint(proxy, FINGERPRINT)
    token = session["token"]

    def client(fingerprint):
        return OpenAI(
            base_url=f"{proxy}/openai",
            api_key=token,
            max_retries=0,
            timeout=TIMEOUT,
            default_headers={
                "User-Agent": USER_AGENT,
                "X-Perishable-Fingerprint": fingerprint,
            },
        )

    sdk = client(FINGERPRINT)

    # (a) A streaming chat completion.
    chunks = 0
    parts = []
    finish_reason = None
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
    )
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish_reason = choice.finish_reason
    content = "".join(parts)
    if chunks < 2:
        raise Failure(f"the stream had {chunks} chunk(s), expected several")

    # (b) Embeddings (the SDK asks for base64 and decodes it).
    embedding = sdk.embeddings.create(model="text-embedding-3-small", input="perishable tokens")
    vector = list(embedding.data[0].embedding)
    if not all(isinstance(v, float) for v in vector):
        raise Failure(f"embedding is not a list of floats: {vector!r}")
    norm = math.sqrt(sum(v * v for v in vector))

    # (c) The models list.
    models = sorted(model.id for model in sdk.models.list())

    # (d) The same token with another fingerprint is refused.
    try:
        client(WRONG_FINGERPRINT).models.list()
    except openai.AuthenticationError as error:
        auth_error_code = error_code(error)
        auth_status = error.status_code
    else:
        raise Failure("a request with the wrong fingerprint was not refused")

    # (e) A path outside the allow-list is refused.
    try:
        sdk.files.list()
    except openai.PermissionDeniedError as error:
        path_error_code = error_code(error)
        path_status = error.status_code
    else:
        raise Failure("GET /openai/files was not refused")

    return {
        "sdk_version": openai.__version__,
        "user_agent": USER_AGENT,
        "session_token": token,
        "prompt": prompt,
        "chunks": chunks,
        "content": content,
        "finish_reason": finish_reason,
        "embedding_dims": len(vector),
        "embedding_norm": norm,
        "models": models,
        "auth_error_status": auth_status,
        "auth_error_code": auth_error_code,
        "path_error_status": path_status,
        "path_error_code": path_error_code,
    }


def main():
    proxy = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PROXY_URL", "")
    proxy = proxy.rstrip("/")
    if not proxy:
        print("usage: sdk_client.py PROXY_URL (or set PROXY_URL)", file=sys.stderr)
        return 2
    try:
        import openai  # noqa: F401
    except ImportError:
        print("sdk_client.py: the openai package is not installed (pip install openai)", file=sys.stderr)
        return 3
    try:
        result = run(proxy)
    except Failure as failure:
        print(f"sdk_client.py: {failure}", file=sys.stderr)
        return 1
    except Exception as error:  # an SDK error we did not expect: report it plainly
        print(f"sdk_client.py: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
