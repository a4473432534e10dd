"""The instant stub upstream speaks enough OpenAI for the openai-style parsers and the gateway."""

from __future__ import annotations

import json

import httpx
import pytest

from loragate.loadtest.stub import StubApp, answer_words


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=StubApp(tokens=5)), base_url="http://stub")


async def test_completion_and_chat_bodies() -> None:
    async with _client() as client:
        body = (await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3})).json()
        assert body["choices"][0]["text"] == " the cat sat"
        assert body["usage"]["completion_tokens"] == 3
        chat = (await client.post("/v1/chat/completions", json={"model": "m", "messages": []})).json()
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"]["content"].split() == answer_words(100, 5)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streaming_ends_with_done(path: str) -> None:
    async with _client() as client:
        response = await client.post(path, json={"model": "m", "prompt": "x", "messages": [], "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in chunks)  # only when asked for


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streaming_usage_chunk_when_asked(path: str) -> None:
    async with _client() as client:
        response = await client.post(path, json={"model": "m", "prompt": "x", "messages": [], "stream": True,
                                                 "max_tokens": 4, "stream_options": {"include_usage": True}})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    *words, usage = [json.loads(e) for e in events[:-1]]
    assert len(words) == 4 and all(len(c["choices"]) == 1 for c in words)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4  # OpenAI's shape


async def test_worker_routes() -> None:
    async with _client() as client:
        assert (await client.get("/health")).status_code == 200
        load = await client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
        assert load.status_code == 200
        ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert ids == ["tiny-llama", "a"]
        assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})).status_code == 200
        assert (await client.get("/nope")).status_code == 404
        assert (await client.post("/v1/completions", content=b"{bad")).status_code == 400
