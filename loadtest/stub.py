"""A minimal OpenAI-compatible upstream that answers instantly, to isolate what a gateway costs.

Why a raw ASGI callable instead of FastAPI: every microsecond the stub spends is counted against
"direct" and hides the gateway's own overhead, so there is no routing table, no validation and no
dependency injection here: one dict lookup on the path, one ``json.loads`` of the body, one
pre-rendered answer. It serves the routes a loragate worker needs (``/health``, ``/v1/models``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) so the gateway can use it as a worker, and
``/v1/completions`` / ``/v1/chat/completions``, non-streamed or streamed (SSE chunks + ``[DONE]``).

Run it as ``python -m loragate.loadtest.stub --port P`` (or ``loragate stub``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STUB_WORDS = ("the", "cat", "sat", "on", "a", "red", "chair", "and", "then", "went", "home", "to", "sleep",
              "all", "day", "long")
"""Words the stub answers with (all in the tiny model's vocabulary, so answers look alike everywhere)."""

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def answer_words(max_tokens: int, tokens: int) -> list[str]:
    """The words of one answer: ``min(max_tokens, tokens)`` of them, cycling through :data:`STUB_WORDS`."""
    count = max(1, min(max_tokens, tokens))
    return [STUB_WORDS[i % len(STUB_WORDS)] for i in range(count)]


def completion_body(route: str, model: str, words: list[str]) -> dict[str, Any]:
    """A full (non-streamed) OpenAI response body that the openai SDK parses."""
    text = " " + " ".join(words)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "length"} if route == "chat"
                              else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
    return {"id": "cmpl-stub", "object": "chat.completion" if route == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(words)}


def with_prompt_logprobs(body: dict[str, Any], route: str, payload: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``prompt_logprobs``: one ``{token_id: {"logprob", ...}}`` per prompt word (None for the first),
    at the top level for chat and in the choice for completions; ``usage.prompt_tokens`` counts them."""
    text = " ".join(str(m.get("content", "")) for m in payload.get("messages") or []) if route == "chat" \
        else str(payload.get("prompt", ""))
    rows: list[Any] = [None] + [{"0": {"logprob": -1.0, "rank": 1, "decoded_token": w}} for w in text.split()]
    target = body if route == "chat" else body["choices"][0]
    target["prompt_logprobs"] = rows
    body["usage"] = {**body["usage"], "prompt_tokens": len(rows),
                     "total_tokens": len(rows) + body["usage"]["completion_tokens"]}
    return body


def _usage(words: list[str]) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}


def stream_chunks(route: str, model: str, words: list[str], usage: bool = False) -> list[bytes]:
    """SSE events of a streamed answer, one word per event, then (``usage``, as OpenAI's
    ``stream_options.include_usage`` asks) a chunk with no choices and the usage, then ``data: [DONE]``."""
    created = int(time.time())
    obj = "chat.completion.chunk" if route == "chat" else "text_completion"
    events = []
    for i, word in enumerate(words):
        last = i == len(words) - 1
        if route == "chat":
            delta: dict[str, Any] = {"content": " " + word} if i else {"role": "assistant", "content": " " + word}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": "length" if last else None}
        else:
            choice = {"index": 0, "text": " " + word, "logprobs": None, "finish_reason": "length" if last else None}
        chunk: dict[str, Any] = {"id": "cmpl-stub", "object": obj, "created": created, "model": model,
                                 "choices": [choice]}
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    if usage:
        chunk = {"id": "cmpl-stub", "object": obj, "created": created, "model": model, "choices": [],
                 "usage": _usage(words)}
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class StubApp:
    """The ASGI application; ``tokens`` caps answer length, ``token_delay_s`` paces streamed words,
    ``whole_delay_s`` delays a non-streamed answer."""

    def __init__(self, model: str = "tiny-llama", tokens: int = 16, token_delay_s: float = 0.0,
                 whole_delay_s: float = 0.0) -> None:
        self.model = model
        self.tokens = tokens
        self.token_delay_s = token_delay_s
        self.whole_delay_s = whole_delay_s  # how long a non-streamed answer takes (a slow worker, for tests)
        self.adapters: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET":
            if path == "/health":
                await _send(send, 200, b"{}", _JSON)
            elif path == "/v1/models":
                ids = [self.model, *sorted(self.adapters)]
                await _json(send, 200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
            else:
                await _json(send, 404, _error(f"no route {path}"))
            return
        body = await read_body(receive)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            await _json(send, 400, _error("body is not JSON"))
            return
        if not isinstance(payload, dict):
            payload = {}
        if path in ("/v1/completions", "/v1/chat/completions"):
            await self._complete(send, "chat" if path.endswith("chat/completions") else "text", payload)
        elif path == "/v1/load_lora_adapter":
            # vLLM answers a load with plain text; the gateway's client relies on the status only.
            self.adapters.add(str(payload.get("lora_name", "")))
            await _send(send, 200, b"Success: LoRA adapter added successfully.", [(b"content-type", b"text/plain")])
        elif path == "/v1/unload_lora_adapter":
            self.adapters.discard(str(payload.get("lora_name", "")))
            await _send(send, 200, b"Success: LoRA adapter removed successfully.", [(b"content-type", b"text/plain")])
        else:
            await _json(send, 404, _error(f"no route {path}"))

    async def _complete(self, send: Send, route: str, payload: dict[str, Any]) -> None:
        max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens") or self.tokens
        words = answer_words(int(max_tokens), self.tokens)
        model = str(payload.get("model") or self.model)
        if not payload.get("stream"):
            if self.whole_delay_s:
                await asyncio.sleep(self.whole_delay_s)
            body = completion_body(route, model, words)
            if payload.get("prompt_logprobs") is not None:  # a prefill-only scoring pass (chain's reference)
                body = with_prompt_logprobs(body, route, payload)
            await _json(send, 200, body)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        for event in stream_chunks(route, model, words, usage):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


async def read_body(receive: Receive) -> bytes:
    """An ASGI request's whole body (every ``http.request`` message until ``more_body`` is false)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await _send(send, status, json.dumps(payload, separators=(",", ":")).encode(), _JSON)


def serve(port: int, host: str = "127.0.0.1", model: str = "tiny-llama", tokens: int = 16,
          token_delay_ms: float = 0.0) -> None:
    """Run the stub under uvicorn (uvloop + httptools when installed, access log off: speed first)."""
    import uvicorn

    uvicorn.run(StubApp(model, tokens, token_delay_ms / 1000), host=host, port=port, log_level="warning",
                access_log=False, lifespan="on")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An instant OpenAI-compatible upstream (completions, chat, "
                                     "streaming, LoRA admin) for measuring gateway overhead.")
    parser.add_argument("--port", type=int, default=8100, help="port (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    parser.add_argument("--model", default="tiny-llama", help="base model name it reports (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16, help="words per answer, at most max_tokens "
                        "(default: %(default)s)")
    parser.add_argument("--token-delay-ms", type=float, default=0.0,
                        help="pause before each streamed word, to mimic decoding (default: %(default)s)")
    args = parser.parse_args(argv)
    serve(args.port, args.host, args.model, args.tokens, args.token_delay_ms)


if __name__ == "__main__":
    main()
