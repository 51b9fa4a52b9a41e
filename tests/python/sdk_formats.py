#!/usr/bin/env python3
"""The official `openai` Python package against a Perishable proxy whose upstream spells its
answers in some unusual but valid way (see `tests/usage_formats.rs`).

Usage: python3 tests/python/sdk_formats.py http://127.0.0.1:PORT   (or set PROXY_URL)

It mints a session over HTTP (with `sdk_client.py`'s helpers), then, through `openai.OpenAI`:

1. a streamed chat completion that did not ask for usage: the proxy asked for it and must hide
   it, so every chunk has a choice (`chunk.choices[0]` must never raise) and none has `usage`;
2. the same, asking for usage itself (`stream_options.include_usage`): the usage-only chunk
   (no choices) arrives, unchanged;
3. a chat completion, not streamed;
4. a streamed text completion (`completions.create`), again without usage;
5. a streamed Responses call, whose events must end with `response.completed`;
6. an embeddings call.

Prints ONE JSON line with what it saw on stdout; on any failure prints a message on stderr and
exits non-zero. The prompt (used by every call) is set with the env var SDK_PROMPT.
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sdk_client import FINGERPRINT, TIMEOUT, USER_AGENT, Failure, mint  # noqa: E402

DEFAULT_PROMPT = "Hello in every format"


def streamed_chat(sdk, prompt, include_usage):
    """A streamed chat completion; returns what the stream carried."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        **extra,
    )
    chunks = 0
    parts = []
    finish_reason = None
    usage_chunks = 0
    usage_total = None
    usage_members = 0
    for chunk in stream:
        chunks += 1
        if getattr(chunk, "usage", None) is not None:
            usage_members += 1
            usage_total = chunk.usage.total_tokens
        if not chunk.choices:
            if not include_usage:
                raise Failure(f"a chunk without choices reached the client: {chunk!r}")
            usage_chunks += 1
            continue
        # What a typical client does; it raises IndexError on a usage-only chunk.
        choice = chunk.choices[0]
        if choice.delta is not None and choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish_reason = choice.finish_reason
    return {
        "chunks": chunks,
        "content": "".join(parts),
        "finish_reason": finish_reason,
        "usage_chunks": usage_chunks,
        "usage_members": usage_members,
        "usage_total": usage_total,
    }


def run(proxy):
    import openai
    from openai import OpenAI

    prompt = os.environ.get("SDK_PROMPT") or DEFAULT_PROMPT
    token = mint(proxy, FINGERPRINT)["token"]
    sdk = OpenAI(
        base_url=f"{proxy}/openai",
        api_key=token,
        max_retries=0,
        timeout=TIMEOUT,
        default_headers={
            "User-Agent": USER_AGENT,
            "X-Perishable-Fingerprint": FINGERPRINT,
        },
    )

    # 1, 2. Streamed chat, without and with usage.
    chat_hidden = streamed_chat(sdk, prompt, include_usage=False)
    chat_asked = streamed_chat(sdk, prompt, include_usage=True)

    # 3. Not streamed.
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt}],
    )
    chat_json = {
        "content": completion.choices[0].message.content,
        "usage_total": completion.usage.total_tokens if completion.usage else None,
    }

    # 4. A streamed text completion.
    parts = []
    chunks = 0
    usage_members = 0
    for chunk in sdk.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=prompt, stream=True
    ):
        chunks += 1
        if getattr(chunk, "usage", None) is not None:
            usage_members += 1
        parts.append(chunk.choices[0].text)
    text_stream = {"chunks": chunks, "text": "".join(parts), "usage_members": usage_members}

    # 5. A streamed Responses call.
    types = []
    deltas = []
    completed = None
    for event in sdk.responses.create(model="gpt-4o-mini", input=prompt, stream=True):
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            completed = event.response
    if completed is None:
        raise Failure(f"no response.completed event among {types}")
    responses = {
        "types": types,
        "text": "".join(deltas),
        "output_text": completed.output_text,
        "usage_total": completed.usage.total_tokens if completed.usage else None,
    }

    # 6. Embeddings (the SDK asks for base64 and decodes it).
    embedding = sdk.embeddings.create(model="text-embedding-3-small", input=prompt)
    embeddings = {
        "dims": len(embedding.data[0].embedding),
        "usage_total": embedding.usage.total_tokens,
    }

    return {
        "sdk_version": openai.__version__,
        "chat_hidden": chat_hidden,
        "chat_asked": chat_asked,
        "chat_json": chat_json,
        "text_stream": text_stream,
        "responses": responses,
        "embeddings": embeddings,
    }


def main():
    proxy = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PROXY_URL", "")
    proxy = proxy.rstrip("/")
    if not proxy:
        print("usage: sdk_formats.py PROXY_URL (or set PROXY_URL)", file=sys.stderr)
        return 2
    try:
        import openai  # noqa: F401
    except ImportError:
        print("sdk_formats.py: the openai package is not installed (pip install openai)", file=sys.stderr)
        return 3
    try:
        result = run(proxy)
    except Failure as failure:
        print(f"sdk_formats.py: {failure}", file=sys.stderr)
        return 1
    except Exception as error:  # an SDK error (IndexError on a leaked usage chunk, ...)
        traceback.print_exc()
        print(f"sdk_formats.py: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
