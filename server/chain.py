"""Chain: compose adapters step by step — the adapter is chosen again at every step of the answer.

A request-level choice (``select``) or one merged weight set (``average``) cannot hold two logically
disjoint pieces of knowledge (a two-hop question whose hops sit in different adapters). The gateway
controls decoding, so it can switch adapters *between* the steps of a step-by-step answer, where
each step needs one adapter's knowledge. This executor is that decode loop around resolve + dispatch:

    for each step (at most ``max_steps``, within the request's ``max_tokens``):
        generate the step under every candidate in parallel: a completion of prompt + answer so far,
        ``stop`` = the step delimiters (``.`` and newline by default), ``include_stop_str_in_output``,
        ``logprobs=1``
        keep the candidate with the best mean token log-likelihood (ties: candidate order); append it
    until a step ends without a delimiter (EOS), the token budget is spent, or ``max_steps`` is reached.

Score (``score=``): the *mean* token log-probability of the step by default (length-normalised, so
that a short step is not preferred merely for being short), or ``min``, its least likely token (a
sentence of template words both adapters are sure of is decided by its one fact). A step of no tokens
scores -inf and only wins when every candidate produced nothing, which ends the answer without adding
a step.

This slice answers non-streamed ``/v1/completions`` with ``choose=likelihood``; streaming, chat and
``choose=route`` are refused with a 400 that says so. The answer is an ordinary OpenAI completion
body: ``usage`` counts the prompt and the *chosen* tokens, and the extension field ``chain`` lists
every step (winner, its score and tokens, every candidate's score) and ``generated_tokens``, every
token generated for the answer, discarded candidates included. A candidate that fails fails the whole
request (no half-written answer), with the step and candidate named in the error.

Candidates of one step are separate dispatches: the worker pool has no "same worker as" preference
yet, so they share a worker (and vLLM's batching and prefix cache) only when the scheduling profile
puts them there (with one worker, or the affinity profile on workers holding every candidate).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loragate.adapters.resolve import Resolver, Servable
from loragate.errors import InvalidRequest, LoragateError, UpstreamError
from loragate.router.types import AdapterWeight, ChainPlan, RoutingDecision, StepChoice
from loragate.server.calls import CompletionCall
from loragate.server.executors import Dispatches, Ended, ProxiedResponse, worker_job
from loragate.server.headers import decision_headers
from loragate.server.recorder import NO_ATTEMPT, status_of
from loragate.workers.dispatch import Attempt, DispatchFailed

DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
REFUSED_FIELDS = {  # body fields a chain cannot honour yet, and why
    "stop": "client stop strings (the step delimiters are the chain's stop)",
    "echo": "echo",
    "logprobs": "logprobs (the chain's own logprobs score the steps)",
    "suffix": "suffix",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One thing a step may run under: an adapter (``servable``) or the base model (``adapter`` None)."""

    adapter: str | None
    servable: Servable | None


@dataclass(frozen=True, slots=True)
class Generated:
    """One candidate's continuation of one step."""

    adapter: str | None
    text: str
    tokens: int
    score: float
    finish_reason: str | None
    at_delimiter: bool
    prompt_tokens: int
    attempt: Attempt
    upstream_s: float


class _CandidateFailed(Exception):
    def __init__(self, adapter: str | None, error: LoragateError, attempt: Attempt) -> None:
        super().__init__(error.message)
        self.adapter = adapter
        self.error = error
        self.attempt = attempt


class ChainFailed(Exception):
    """A step could not be decided: ``error`` (naming the step and candidate) is what the client gets."""

    def __init__(self, error: LoragateError, attempt: Attempt, steps: tuple[StepChoice, ...]) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempt = attempt
        self.steps = steps


def mean_logprob(values: Sequence[float]) -> float:
    """The step's score: mean token log-probability; -inf for a step of no tokens."""
    return sum(values) / len(values) if values else -math.inf


def min_logprob(values: Sequence[float]) -> float:
    """The step's least likely token: a step is only as sure as its weakest token (the one fact in a
    sentence of template words decides); -inf for a step of no tokens."""
    return min(values) if values else -math.inf


#: ``chain;score=<name>``: how a step's token log-probabilities become the score candidates compete on.
STEP_SCORES = {"mean": mean_logprob, "min": min_logprob}


def best(generated: Sequence[Generated]) -> Generated:
    """The highest score; the first candidate in order among equals."""
    winner = generated[0]
    for g in generated[1:]:
        if g.score > winner.score:
            winner = g
    return winner


def _unsupported(what: str) -> InvalidRequest:
    return InvalidRequest(f"the chain policy does not support {what} yet (planned for its next slice); "
                          f"use another policy for that request", param="X-Adapter-Policy", code="chain_unsupported")


def _budget(body: Mapping[str, Any]) -> int:
    value = body.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {value!r}", param="max_tokens")
    return value


def check_call(call: CompletionCall, plan: ChainPlan) -> tuple[str, int]:
    """The prompt and token budget of a call a chain can run; a 400 naming the limitation otherwise."""
    if call.route != "completions":
        raise _unsupported("/v1/chat/completions (send the conversation as a /v1/completions prompt)")
    if call.stream:
        raise _unsupported("streaming (send stream=false)")
    if plan.choose != "likelihood":
        raise _unsupported(f"choose={plan.choose} (choose=likelihood works)")
    for key, what in REFUSED_FIELDS.items():
        if call.body.get(key) not in (None, False):
            raise _unsupported(what)
    for key in ("n", "best_of"):
        if call.body.get(key) not in (None, 1):
            raise _unsupported(f"{key} > 1")
    prompt = call.body.get("prompt")
    if not isinstance(prompt, str):
        raise _unsupported("a prompt that is not one string")
    return prompt, _budget(call.body)


def _ends_at_delimiter(choice: Mapping[str, Any], text: str, delimiters: Sequence[str]) -> bool:
    """Whether the step stopped at a delimiter (not at EOS): vLLM's ``stop_reason`` says which stop string
    ended it (None for EOS); without that field, the text's end tells."""
    if choice.get("finish_reason") != "stop":
        return False
    if "stop_reason" in choice:
        return choice["stop_reason"] in delimiters
    return any(text.endswith(d) for d in delimiters)


def read_step(adapter: str | None, content: bytes, delimiters: Sequence[str], attempt: Attempt,
              upstream_s: float, score: str = "mean") -> Generated:
    """A worker's completion of one step, scored; an unreadable body is the worker's failure (502)."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        text = choice["text"]
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
        logprobs = choice.get("logprobs") or {}
        values = [float(v) for v in logprobs.get("token_logprobs") or [] if v is not None]
        usage = data.get("usage") or {}
        tokens = int(usage.get("completion_tokens", len(values)))
        prompt_tokens = int(usage.get("prompt_tokens", 0))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamError(f"the worker's completion could not be read: {exc!r}", code="bad_upstream_body") from exc
    return Generated(adapter, text, tokens, STEP_SCORES[score](values), choice.get("finish_reason"),
                     _ends_at_delimiter(choice, text, delimiters), prompt_tokens, attempt, upstream_s)


@dataclass(frozen=True, slots=True)
class ChainRun:
    answer: str
    finish_reason: str
    steps: tuple[StepChoice, ...]
    prompt_tokens: int
    chosen_tokens: int
    generated_tokens: int
    generations: int
    attempt: Attempt
    upstream_s: float


class ChainExecutor:
    """Runs chained decisions (``decision.chain``); built once at startup beside the single-shot executor."""

    def __init__(self, model: str, resolver: Resolver, dispatcher: Dispatches) -> None:
        self.model = model
        self.resolver = resolver
        self.dispatcher = dispatcher

    async def execute(self, call: CompletionCall, decision: RoutingDecision, ended: Ended) -> ProxiedResponse:
        plan = decision.chain
        assert plan is not None, "the chain executor runs chained decisions only"
        try:
            prompt, budget = check_call(call, plan)
            candidates = await self._candidates(plan)
            run = await self._run(call, plan, prompt, budget, candidates)
        except ChainFailed as failed:
            ended(decision, None, failed.attempt, failed.error.status, steps=failed.steps)
            raise failed.error from failed.error.__cause__
        except BaseException as exc:
            ended(decision, None, NO_ATTEMPT, status_of(exc))
            raise
        ran = replace(decision, adapters=tuple(AdapterWeight(s.adapter or self.model) for s in run.steps))
        ended(ran, None, run.attempt, 200, run.upstream_s, run.answer if call.expected is not None else None,
              run.steps)
        body = self._body(call, plan, run)
        return ProxiedResponse(200, decision_headers(call, ran, None), "application/json",
                               content=json.dumps(body).encode())

    async def _candidates(self, plan: ChainPlan) -> list[Candidate]:
        """Every candidate resolved once (files materialised) before the first step: one adapter each."""
        found = [Candidate(name, await self.resolver.resolve(RoutingDecision("chain", "chain",
                                                                             (AdapterWeight(name),))))
                 for name in plan.candidates]
        return [*found, Candidate(None, None)] if plan.base else found

    async def _run(self, call: CompletionCall, plan: ChainPlan, prompt: str, budget: int,
                   candidates: Sequence[Candidate]) -> ChainRun:
        answer, steps = "", list[StepChoice]()
        chosen = generated = generations = prompt_tokens = 0
        upstream_s = load_s = 0.0
        worker: str | None = None
        finish = "length"  # max_steps spent at a delimiter, or the token budget spent
        template = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options")}
        for index in range(1, plan.max_steps + 1):
            if chosen >= budget:
                break
            body = {**template, "prompt": prompt + answer, "max_tokens": budget - chosen, "stop": list(plan.delimiters),
                    "include_stop_str_in_output": True, "logprobs": 1, "n": 1}
            started = time.perf_counter()
            try:
                outputs = await self._step(call, body, candidates, plan)
            except _CandidateFailed as failed:
                label = failed.adapter or f"{self.model} (base)"
                error = type(failed.error)(f"chain step {index}: candidate {label!r} failed, so no answer is "
                                           f"returned: {failed.error.message}", param=failed.error.param,
                                           code=failed.error.code, status=failed.error.status)
                raise ChainFailed(error, failed.attempt, tuple(steps)) from failed.error
            took = time.perf_counter() - started
            winner = best(outputs)
            if index == 1:
                prompt_tokens = winner.prompt_tokens
            generated += sum(g.tokens for g in outputs)
            generations += len(outputs)
            upstream_s += took
            load_s += sum(g.attempt.load_s for g in outputs)
            if not winner.text and not winner.at_delimiter and winner.finish_reason == "stop":
                finish = "stop"  # every candidate ended the answer at once (EOS): no step to add
                break
            steps.append(StepChoice(winner.adapter, winner.score, winner.tokens, winner.text,
                                    tuple((g.adapter, g.score) for g in outputs), took))
            answer += winner.text
            chosen += winner.tokens
            worker = winner.attempt.worker
            if winner.finish_reason == "length":
                break
            if not winner.at_delimiter:
                finish = "stop"  # EOS: the answer is complete
                break
        return ChainRun(answer, finish, tuple(steps), prompt_tokens, chosen, generated, generations,
                        Attempt(worker, load_s), upstream_s)

    async def _step(self, call: CompletionCall, body: Mapping[str, Any], candidates: Sequence[Candidate],
                    plan: ChainPlan) -> list[Generated]:
        """Every candidate's continuation, in parallel; the first failure cancels the rest."""
        tasks = [asyncio.create_task(self._generate(call, body, c, plan)) for c in candidates]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _generate(self, call: CompletionCall, body: Mapping[str, Any], candidate: Candidate,
                        plan: ChainPlan) -> Generated:
        job = worker_job(call, self.model, candidate.servable, body, stream=False)
        try:
            reply = await self.dispatcher.dispatch(job)
            return read_step(candidate.adapter, reply.content, plan.delimiters, reply.attempt,
                             reply.upstream_s or 0.0, score=plan.score)
        except DispatchFailed as failed:
            raise _CandidateFailed(candidate.adapter, failed.error, failed.attempt) from failed.error
        except UpstreamError as error:
            raise _CandidateFailed(candidate.adapter, error, NO_ATTEMPT) from error

    def _body(self, call: CompletionCall, plan: ChainPlan, run: ChainRun) -> dict[str, Any]:
        """An ordinary OpenAI completion, plus the ``chain`` extension field (documented in the module)."""
        return {
            "id": f"cmpl-{call.outcome_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.body.get("model", self.model),
            "choices": [{"index": 0, "text": run.answer, "logprobs": None, "finish_reason": run.finish_reason}],
            "usage": {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.chosen_tokens,
                      "total_tokens": run.prompt_tokens + run.chosen_tokens},
            "chain": {
                "score": f"{plan.score}_token_logprob",
                "delimiters": list(plan.delimiters),
                "generated_tokens": run.generated_tokens,  # every candidate's tokens, the discarded ones included
                "generations": run.generations,
                "steps": [{"step": i, "adapter": s.adapter or self.model, "score": _finite(s.score),
                           "tokens": s.tokens,
                           "candidates": [{"adapter": a or self.model, "score": _finite(v)} for a, v in s.scores]}
                          for i, s in enumerate(run.steps, start=1)],
            },
        }


def _finite(value: float) -> float | None:
    """JSON has no -inf: a step of no tokens has the score null."""
    return round(value, 6) if math.isfinite(value) else None
