#!/usr/bin/env python3
"""The official `openai` Python package's Realtime client through a Perishable proxy.

Usage: python3 tests/python/sdk_realtime.py http://127.0.0.1:PORT

Mints a session (as sdk_client.py does), then opens `client.realtime.connect(model=...)` on
`{proxy}/openai` with the session token as the API key and the fingerprint as a default
header: updates the session, adds a user message, asks for a response and reads its text
deltas up to `response.done`. Then asks for a response over the budget and reads the `error`
event the proxy answers with. Prints ONE JSON line with the results.

Needs `openai[realtime]` (the `websockets` package). SDK_PROMPT sets the message.
"""

import asyncio
import json
import os
import sys

from sdk_client import USER_AGENT, Failure, mint

from openai import AsyncOpenAI

FINGERPRINT = "sdk-realtime-device-0001"
MODEL = "gpt-realtime"


async def run(proxy):
    session = mint(proxy, FINGERPRINT)
    client = AsyncOpenAI(
        api_key=session["token"],
        base_url=f"{proxy}/openai",
        default_headers={"X-Perishable-Fingerprint": FINGERPRINT, "User-Agent": USER_AGENT},
    )
    prompt = os.environ.get("SDK_PROMPT", "Hello over the Realtime API")
    result = {"deltas": 0, "text": ""}
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.session.update(
            session={"type": "realtime", "output_modalities": ["text"]}
        )
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prompt}],
            }
        )
        await connection.response.create()
        async for event in connection:
            if event.type == "session.created":
                result["session_model"] = event.session.model
            elif event.type == "response.output_text.delta":
                result["deltas"] += 1
                result["text"] += event.delta
            elif event.type == "response.done":
                result["status"] = event.response.status
                result["total_tokens"] = event.response.usage.total_tokens
                break
            elif event.type == "error":
                raise Failure(f"unexpected error event: {event}")
        # A response the budget cannot cover: an error event, nothing forwarded.
        await connection.response.create(response={"max_output_tokens": 1_000_000})
        async for event in connection:
            if event.type == "error":
                result["refusal_code"] = event.error.code
                result["refusal_type"] = event.error.type
                break
            if event.type.startswith("response."):
                raise Failure(f"the over-budget response went through: {event.type}")
    return result


def main():
    proxy = (sys.argv[1] if len(sys.argv) > 1 else os.environ["PROXY_URL"]).rstrip("/")
    try:
        result = asyncio.run(run(proxy))
    except Failure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
