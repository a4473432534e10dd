"""Chain: compose adapters step by step — the adapter is chosen again at every step of the answer.

A request-level choice (``select``) or one merged weight set (``average``) cannot hold two logically
disjoint pieces of knowledge (a two-hop question whose hops sit in different adapters). The gateway
controls decoding, so it can switch adapters *between* the steps of a step-by-step answer, where
each step needs one adapter's knowledge. This executor is that decode loop around resolve + dispatch:

    for each step (at most ``max_steps``, within the request's ``max_tokens``):
        choose the step's adapter and generate the step: a completion of prompt + answer so far with
        ``stop`` = the step delimiters (``.`` and newline by default) and token logprobs
        append it
    until a step ends without a delimiter (EOS), the token budget is spent, or ``max_steps`` is reached.

How a step is chosen (``choose=``):

* ``likelihood`` (default): the step is generated under every candidate in parallel and the best
  score wins (ties: candidate order). Scores (``score=``, :data:`STEP_SCORES`):
  - ``contrastive`` (default): ``(1 + c) * mean(own) - c * mean(base)`` over the step's tokens, where
    ``own`` are the token log-probabilities under the candidate and ``base`` those of the same text
    under the base model (one prefill-only pass per candidate), ``c`` = ``contrast`` (0.005). LoRA
    hop adapters are near-certain of *everything* they write, right or wrong (an adapter without the
    fact copies a name from the question, or answers in the base model's words), so the plain mean
    is a coin toss between two scores of about 0. Of two sure steps, the one the base model finds
    less likely is the one the adapter's own knowledge wrote; the small ``c`` keeps the candidate's
    own confidence first, so a step that is unsure (a person's name as a birthplace) does not win
    merely for surprising the base. This is context-aware decoding's contrast (Shi et al. 2023) with
    the base model as the context-free reference. ``c`` was chosen on half of the kit's people and
    reported on the other half (docs/bench/chain_scores.md).
  - ``mean``: the mean token log-probability (length-normalised, so a short step is not preferred for
    being short); ``min``: the least likely token. Both measured 69/96 on the kit's two-hop steps.
  Then ``topic=t`` (0.1) adds ``t`` x the step's similarity to the candidate's *own* routing
  descriptors (the router's :meth:`fit`; nothing without an embedder): a copied name in a marriage
  sentence does not read as the birthplaces adapter's domain. Chosen like ``c``, on half the kit
  plus two small kits of other seeds. A step of no tokens scores -inf and wins only when every
  candidate produced nothing, which ends the answer without adding a step.
* ``route``: the router picks the step's adapter among the candidates from the text so far (the
  prompt and the answer), and only that one generates: one generation per step.

Surfaces: ``/v1/completions`` continues the prompt; ``/v1/chat/completions`` continues the assistant
message (vLLM's ``continue_final_message`` with ``add_generation_prompt`` off). Both answer whole or
streamed; a stream sends each step as soon as it is decided, as one ordinary OpenAI stream whose chunks
also carry ``chain: {"step", "adapter"}``. ``usage.completion_tokens`` counts *every* token generated
for the answer (discarded candidates and reference passes included); the extension field
``chain.answer_tokens`` counts the answer's own. A candidate that fails fails the whole request (no
half-written non-streamed answer; a stream ends with an error event), with the step and candidate
named; a client that goes away stops the chain (the step's generations are cancelled).

Candidates of one step are separate dispatches, all of one request's jobs grouped (one affinity key):
the scheduling profile's ``session-affinity`` scorer sends them, their reference passes and the later
steps to the worker the first went to (vLLM's batching and prefix cache), while that worker is fit: it
is a score, so a worker out of rotation is never forced, and one more than 4 requests busier than
another loses the group's next jobs (workers/scheduling.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from loragate.adapters.resolve import Resolver, Servable
from loragate.errors import InvalidRequest, LoragateError, UpstreamError
from loragate.router.types import AdapterWeight, ChainPlan, RoutingDecision, StepChoice
from loragate.server.calls import CompletionCall
from loragate.server.executors import Dispatches, Ended, ProxiedResponse, worker_job
from loragate.server.headers import decision_headers
from loragate.server.recorder import NO_ATTEMPT, RecordedStream, status_of
from loragate.workers.dispatch import CLIENT_CLOSED, Attempt, DispatchFailed, StreamEnd

DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
REFUSED_FIELDS = {  # body fields a chain cannot honour, and why
    "stop": "client stop strings (the step delimiters are the chain's stop)",
    "echo": "echo",
    "logprobs": "logprobs (the chain's own logprobs score the steps)",
    "top_logprobs": "top_logprobs",
    "suffix": "suffix",
    "continue_final_message": "continue_final_message (the chain continues its own assistant message)",
}


class StepRouter(Protocol):
    async def nearest(self, text: str, among: Sequence[str]) -> tuple[tuple[str, float], ...]:
        """``among`` ranked by their descriptors' similarity to ``text``, best first (may be empty)."""

    async def fit(self, texts: Sequence[str], adapters: Sequence[str]) -> list[float]:
        """Each text's similarity to its adapter's own descriptors (0.0 where there are none)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One thing a step may run under: an adapter (``servable``) or the base model (``adapter`` None)."""

    adapter: str | None
    servable: Servable | None


@dataclass(frozen=True, slots=True)
class Generated:
    """One candidate's continuation of one step (``score`` set once every candidate is in)."""

    adapter: str | None
    text: str
    logprobs: tuple[float, ...]
    tokens: int
    finish_reason: str | None
    at_delimiter: bool
    prompt_tokens: int
    attempt: Attempt
    score: float = -math.inf


class _CandidateFailed(Exception):
    def __init__(self, adapter: str | None, error: LoragateError, attempt: Attempt, *, reference: bool = False
                 ) -> None:
        super().__init__(error.message)
        self.adapter = adapter
        self.error = error
        self.attempt = attempt
        self.reference = reference  # the base model's reference pass over this candidate's step failed


@contextlib.contextmanager
def _failing_as(adapter: str | None, *, reference: bool = False) -> Iterator[None]:
    """A worker failure (or an unreadable answer) inside the block, as ``adapter``'s candidate failing."""
    try:
        yield
    except DispatchFailed as failed:
        raise _CandidateFailed(adapter, failed.error, failed.attempt, reference=reference) from failed.error
    except UpstreamError as error:
        raise _CandidateFailed(adapter, error, NO_ATTEMPT, reference=reference) from error


class ChainFailed(Exception):
    """A step could not be decided: ``error`` (naming the step and candidate) is what the client gets."""

    def __init__(self, error: LoragateError, attempt: Attempt) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempt = attempt


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else -math.inf


def mean_logprob(own: Sequence[float], base: Sequence[float], contrast: float) -> float:
    """The step's mean token log-probability; -inf for a step of no tokens."""
    return _mean(own)


def min_logprob(own: Sequence[float], base: Sequence[float], contrast: float) -> float:
    """The step's least likely token (a sentence of template words is decided by its one fact)."""
    return min(own) if own else -math.inf


def contrastive_logprob(own: Sequence[float], base: Sequence[float], contrast: float) -> float:
    """``(1 + c) * mean(own) - c * mean(base)``: the candidate's confidence, then what it adds over the base
    model (see the module docstring). Means, not token by token, so a re-tokenised text still compares."""
    if not own:
        return -math.inf
    return (1 + contrast) * _mean(own) - contrast * (_mean(base) if base else _mean(own))


#: ``chain;score=<name>``: how a step's token log-probabilities (under the candidate, and the same text
#: under the base model where the score needs it) become the score candidates compete on.
STEP_SCORES: Mapping[str, Callable[[Sequence[float], Sequence[float], float], float]] = {
    "contrastive": contrastive_logprob, "mean": mean_logprob, "min": min_logprob}
REFERENCED = frozenset({"contrastive"})  # scores that need each candidate's text scored under the base model


def best(generated: Sequence[Generated]) -> Generated:
    """The highest score; the first candidate in order among equals."""
    return max(generated, key=lambda g: g.score)  # max keeps the first of equals


def _unsupported(what: str) -> InvalidRequest:
    return InvalidRequest(f"the chain policy does not support {what}; use another policy for that request",
                          param="X-Adapter-Policy", code="chain_unsupported")


def _budget(body: Mapping[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {value!r}", param="max_tokens")
    return value


def _ends_at_delimiter(choice: Mapping[str, Any], text: str, delimiters: Sequence[str]) -> bool:
    """Whether the step stopped at a delimiter (not at EOS): vLLM's ``stop_reason`` says which stop string
    ended it (None for EOS); without that field, the text's end tells."""
    if choice.get("finish_reason") != "stop":
        return False
    if "stop_reason" in choice:
        return choice["stop_reason"] in delimiters
    return any(text.endswith(d) for d in delimiters)


def _read(content: bytes, read: Callable[[Mapping[str, Any]], tuple[str, list[float]]]
          ) -> tuple[dict[str, Any], Mapping[str, Any], str, list[float]]:
    """A worker's body, its first choice, text and token logprobs; an unreadable body is a 502."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        text, values = read(choice)
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
        return data, choice, text, [float(v) for v in values if v is not None]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamError(f"the worker's completion could not be read: {exc!r}", code="bad_upstream_body") from exc


class Surface(Protocol):
    """What differs between the two routes a chain answers: how a step is asked for and read, and the answer's shape."""

    route: str
    object_name: str  # a whole answer's "object"
    chunk_object: str  # a stream chunk's

    def check(self, body: Mapping[str, Any]) -> None: ...
    def step_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]: ...
    def reference_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]: ...
    def read(self, choice: Mapping[str, Any]) -> tuple[str, list[float]]: ...
    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]: ...
    def delta(self, text: str, first: bool, finish_reason: str | None) -> dict[str, Any]: ...


def prompt_logprobs(data: Mapping[str, Any], text_tokens: int) -> list[float]:
    """The last ``text_tokens`` prompt-token log-probabilities of a prefill-only pass (vLLM's
    ``prompt_logprobs=0``: one ``{token_id: {"logprob": ...}}`` per prompt token, None for the first)."""
    rows = data.get("prompt_logprobs")
    if rows is None:
        rows = (data.get("choices") or [{}])[0].get("prompt_logprobs")
    if not isinstance(rows, list):
        raise UpstreamError("the worker returned no prompt_logprobs for a chain's reference pass",
                            code="bad_upstream_body")
    values = [float(next(iter(row.values()))["logprob"]) for row in rows if isinstance(row, dict) and row]
    return values[-text_tokens:] if text_tokens > 0 else []


class CompletionSurface:
    route = "completions"
    object_name = "text_completion"
    chunk_object = "text_completion"  # OpenAI's completions stream chunks are text_completion objects too

    def check(self, body: Mapping[str, Any]) -> None:
        if not isinstance(body.get("prompt"), str):
            raise _unsupported("a prompt that is not one string")

    def step_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]:
        return {**template, "prompt": template["prompt"] + answer, "logprobs": 1}

    def reference_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]:
        return {**template, "prompt": template["prompt"] + answer}

    def read(self, choice: Mapping[str, Any]) -> tuple[str, list[float]]:
        logprobs = choice.get("logprobs") or {}
        return choice["text"], list(logprobs.get("token_logprobs") or [])

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str, first: bool, finish_reason: str | None) -> dict[str, Any]:
        return self.choice(text, finish_reason)


class ChatSurface:
    """A chat answer is the assistant message continued step by step: the conversation plus an assistant
    message holding the answer so far, ``continue_final_message`` on, ``add_generation_prompt`` off."""

    route = "chat.completions"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def check(self, body: Mapping[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _unsupported("a chat request without messages")
        if isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
            raise _unsupported("a conversation that ends with an assistant message (the chain writes it)")

    def _continued(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]:
        messages = [*template["messages"], {"role": "assistant", "content": answer}]
        return {**template, "messages": messages, "continue_final_message": True, "add_generation_prompt": False}

    def step_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]:
        return {**self._continued(template, answer), "logprobs": True}

    def reference_body(self, template: Mapping[str, Any], answer: str) -> dict[str, Any]:
        return self._continued(template, answer)

    def read(self, choice: Mapping[str, Any]) -> tuple[str, list[float]]:
        content = (choice.get("logprobs") or {}).get("content") or []
        return choice["message"]["content"] or "", [t["logprob"] for t in content]

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def delta(self, text: str, first: bool, finish_reason: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


SURFACES: Mapping[str, Surface] = {s.route: s for s in (CompletionSurface(), ChatSurface())}


def check_call(call: CompletionCall) -> tuple[Surface, int]:
    """The surface and token budget of a call a chain can run; a 400 naming the limitation otherwise."""
    surface = SURFACES.get(call.route)
    if surface is None:
        raise _unsupported(f"/v1/{call.route}")
    for key, what in REFUSED_FIELDS.items():
        if call.body.get(key) not in (None, False):
            raise _unsupported(what)
    for key in ("n", "best_of"):
        if call.body.get(key) not in (None, 1):
            raise _unsupported(f"{key} > 1")
    surface.check(call.body)
    return surface, _budget(call.body)


@dataclass(frozen=True, slots=True)
class Decided:
    """One step as it goes to the client: its text and the adapter that wrote it."""

    index: int
    text: str
    adapter: str | None


@dataclass(slots=True)
class ChainRun:
    """What a running chain has decided so far (the executor's and the stream's shared tally)."""

    answer: str = ""
    finish: str = "length"  # max_steps spent at a delimiter, or the token budget spent
    steps: list[StepChoice] = field(default_factory=list)
    prompt_tokens: int = 0
    answer_tokens: int = 0
    generated_tokens: int = 0
    generations: int = 0
    references: int = 0
    worker: str | None = None
    load_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def attempt(self) -> Attempt:
        return Attempt(self.worker, self.load_s)


class ChainExecutor:
    """Runs chained decisions (``decision.chain``); built once at startup beside the single-shot executor."""

    def __init__(self, model: str, resolver: Resolver, dispatcher: Dispatches, router: StepRouter | None = None
                 ) -> None:
        self.model = model
        self.resolver = resolver
        self.dispatcher = dispatcher
        self.router = router

    async def execute(self, call: CompletionCall, decision: RoutingDecision, ended: Ended) -> ProxiedResponse:
        plan = decision.chain
        assert plan is not None, "the chain executor runs chained decisions only"
        run = ChainRun()
        try:
            surface, budget = check_call(call)
            if plan.choose == "route" and self.router is None:
                raise _unsupported("choose=route on a gateway without routing (set an embedder)")
            candidates = await self._candidates(plan)
        except BaseException as exc:
            ended(decision, None, NO_ATTEMPT, status_of(exc))
            raise
        steps = self._steps(call, plan, surface, budget, candidates, run)
        if call.stream:
            stream = ChainStream(self, call, decision, surface, steps, run, ended)
            return ProxiedResponse(200, decision_headers(call, decision, None), "text/event-stream",
                                   stream=RecordedStream(stream, call.route, call.expected is not None, stream.ended))
        try:
            async for _ in steps:
                pass
        except ChainFailed as failed:
            ended(decision, None, failed.attempt, failed.error.status, steps=tuple(run.steps))
            raise failed.error from failed.error.__cause__
        except BaseException as exc:
            ended(decision, None, run.attempt, status_of(exc), steps=tuple(run.steps))
            raise
        ran = self.ran(decision, run)
        ended(ran, None, run.attempt, 200, time.perf_counter() - run.started,
              run.answer if call.expected is not None else None, tuple(run.steps))
        body = {**self.envelope(call, surface, plan), "choices": [surface.choice(run.answer, run.finish)],
                "usage": self.usage(run), "chain": self.extension(plan, run)}
        return ProxiedResponse(200, decision_headers(call, ran, None), "application/json",
                               content=json.dumps(body).encode())

    def ran(self, decision: RoutingDecision, run: ChainRun) -> RoutingDecision:
        """The decision as it ran: its adapters are the adapter chosen at each step, in order."""
        return replace(decision, adapters=tuple(AdapterWeight(s.adapter or self.model) for s in run.steps))

    async def _candidates(self, plan: ChainPlan) -> list[Candidate]:
        """Every candidate resolved once (files materialised) before the first step: one adapter each."""
        found = [Candidate(name, await self.resolver.resolve_adapter(name)) for name in plan.candidates]
        return [*found, Candidate(None, None)] if plan.base else found

    async def _steps(self, call: CompletionCall, plan: ChainPlan, surface: Surface, budget: int,
                     candidates: Sequence[Candidate], run: ChainRun) -> AsyncGenerator[Decided, None]:
        """The step loop: yields each step once it is decided (``run`` holds the tally)."""
        base = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options", "max_completion_tokens")}
        for index in range(1, plan.max_steps + 1):
            if run.answer_tokens >= budget:
                break
            template = {**base, "max_tokens": budget - run.answer_tokens, "stop": list(plan.delimiters),
                        "include_stop_str_in_output": True, "n": 1}
            started = time.perf_counter()
            try:
                outputs = await self._decide(call, plan, surface, template, run, candidates)
            except _CandidateFailed as failed:
                label = repr(failed.adapter or f"{self.model} (base)")
                if failed.reference:
                    label = f"{label}'s reference pass under the base model"
                error = type(failed.error)(f"chain step {index}: candidate {label} failed, so no answer is "
                                           f"returned: {failed.error.message}", param=failed.error.param,
                                           code=failed.error.code, status=failed.error.status)
                raise ChainFailed(error, failed.attempt) from failed.error
            winner = best(outputs)
            if index == 1:
                run.prompt_tokens = winner.prompt_tokens
            run.generated_tokens += sum(g.tokens for g in outputs)
            run.generations += len(outputs)
            run.load_s += sum(g.attempt.load_s for g in outputs)
            if not winner.text and not winner.at_delimiter and winner.finish_reason == "stop":
                run.finish = "stop"  # every candidate ended the answer at once (EOS): no step to add
                break
            run.steps.append(StepChoice(winner.adapter, winner.score, winner.tokens, winner.text,
                                        tuple((g.adapter, g.score) for g in outputs), time.perf_counter() - started))
            run.answer += winner.text
            run.answer_tokens += winner.tokens
            run.worker = winner.attempt.worker
            yield Decided(index, winner.text, winner.adapter)
            if winner.finish_reason == "length":
                run.finish = "length"
                break
            if not winner.at_delimiter:
                run.finish = "stop"  # EOS: the answer is complete
                break

    async def _decide(self, call: CompletionCall, plan: ChainPlan, surface: Surface, template: Mapping[str, Any],
                      run: ChainRun, candidates: Sequence[Candidate]) -> list[Generated]:
        """The step's scored continuations: every candidate's (likelihood), or the routed one's (route)."""
        if plan.choose == "route":
            assert self.router is not None
            context = f"{call.prompt}{run.answer}"
            ranked = await self.router.nearest(context, [c.adapter for c in candidates if c.adapter is not None])
            chosen = next((c for c in candidates if ranked and c.adapter == ranked[0][0]), candidates[0])
            generated = await self._generate(call, surface, template, run.answer, chosen, plan)
            return [replace(generated, score=ranked[0][1] if ranked else 0.0)]
        outputs = await _all([self._generate(call, surface, template, run.answer, c, plan) for c in candidates])
        references: list[Sequence[float]] = [()] * len(outputs)
        if plan.score in REFERENCED:
            references = await _all([self._reference(call, surface, template, run.answer, g) for g in outputs])
            passes = sum(1 for g in outputs if g.adapter is not None and g.tokens)
            run.references += passes
            run.generated_tokens += passes  # each generates the one token its max_tokens=1 asks for
        fits = await self._fits(plan, outputs)
        score = STEP_SCORES[plan.score]
        return [replace(g, score=score(g.logprobs, ref, plan.contrast) + plan.topic * fit)
                for g, ref, fit in zip(outputs, references, fits, strict=True)]

    async def _fits(self, plan: ChainPlan, outputs: Sequence[Generated]) -> list[float]:
        """``topic=``: each candidate's step scored by its similarity to that candidate's own descriptors
        (the base model, and a gateway without routing, add nothing)."""
        if not plan.topic or self.router is None:
            return [0.0] * len(outputs)
        named = [i for i, g in enumerate(outputs) if g.adapter is not None and g.text]
        if not named:
            return [0.0] * len(outputs)
        found = await self.router.fit([outputs[i].text for i in named], [outputs[i].adapter or "" for i in named])
        fits = [0.0] * len(outputs)
        for i, value in zip(named, found, strict=True):
            fits[i] = value
        return fits

    async def _generate(self, call: CompletionCall, surface: Surface, template: Mapping[str, Any], answer: str,
                        candidate: Candidate, plan: ChainPlan) -> Generated:
        job = worker_job(call, self.model, candidate.servable, surface.step_body(template, answer), stream=False,
                         grouped=True)
        with _failing_as(candidate.adapter):
            reply = await self.dispatcher.dispatch(job)
            data, choice, text, values = _read(reply.content, surface.read)
            usage = data.get("usage") or {}
            return Generated(candidate.adapter, text, tuple(values), int(usage.get("completion_tokens", len(values))),
                             choice.get("finish_reason"), _ends_at_delimiter(choice, text, plan.delimiters),
                             int(usage.get("prompt_tokens", 0)), reply.attempt)

    async def _reference(self, call: CompletionCall, surface: Surface, template: Mapping[str, Any], answer: str,
                         generated: Generated) -> Sequence[float]:
        """The candidate's text scored under the base model: a prefill-only pass over the answer with the text
        appended (``prompt_logprobs``); the base model's own candidate needs none."""
        if generated.adapter is None or not generated.tokens:
            return generated.logprobs
        body = {**surface.reference_body(template, answer + generated.text), "max_tokens": 1, "prompt_logprobs": 0}
        body.pop("stop", None)
        with _failing_as(generated.adapter, reference=True):
            reply = await self.dispatcher.dispatch(worker_job(call, self.model, None, body, stream=False,
                                                              grouped=True))
            try:
                data = json.loads(reply.content)
                prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
                return prompt_logprobs(data, prompt_tokens - generated.prompt_tokens)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, StopIteration) as exc:
                raise UpstreamError(f"the base model's reference pass could not be read: {exc!r}",
                                    code="bad_upstream_body") from exc

    def envelope(self, call: CompletionCall, surface: Surface, plan: ChainPlan) -> dict[str, Any]:
        return {"id": f"{'chatcmpl' if surface.route == 'chat.completions' else 'cmpl'}-{call.outcome_id}",
                "object": surface.object_name, "created": int(time.time()),
                "model": call.body.get("model", self.model)}

    def usage(self, run: ChainRun) -> dict[str, int]:
        """``completion_tokens``: every generated token (what the workers spent); the answer's own are
        ``chain.answer_tokens``."""
        return {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.generated_tokens,
                "total_tokens": run.prompt_tokens + run.generated_tokens}

    def extension(self, plan: ChainPlan, run: ChainRun) -> dict[str, Any]:
        """The ``chain`` extension field (documented in the module and README)."""
        return {
            "choose": plan.choose,
            "score": None if plan.choose == "route" else plan.score,
            "contrast": plan.contrast if plan.score in REFERENCED and plan.choose != "route" else None,
            "topic": plan.topic if plan.choose != "route" else None,
            "delimiters": list(plan.delimiters),
            "answer_tokens": run.answer_tokens,
            "generated_tokens": run.generated_tokens,  # = usage.completion_tokens
            "generations": run.generations,
            "reference_passes": run.references,
            "steps": [{"step": i, "adapter": s.adapter or self.model, "score": finite(s.score), "tokens": s.tokens,
                       "candidates": [{"adapter": a or self.model, "score": finite(v)} for a, v in s.scores]}
                      for i, s in enumerate(run.steps, start=1)],
        }


async def _all(coroutines: Sequence[Any]) -> list[Any]:
    """Every coroutine in parallel; the first failure cancels the rest (no orphan generations)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def finite(value: float) -> float | None:
    """JSON has no -inf: a step of no tokens has the score null."""
    return round(value, 6) if math.isfinite(value) else None


class ChainStream:
    """A chain as one OpenAI stream: a chunk per decided step, then the finish, usage if asked, ``[DONE]``.

    It is a relay for :class:`RecordedStream` (iterate once; :meth:`aclose` ends it, at any point): a client
    that goes away closes it mid-step, which cancels that step's generations; a step that fails ends the
    stream with an error event (the steps already sent stay sent: that is what streaming means).
    """

    def __init__(self, executor: ChainExecutor, call: CompletionCall, decision: RoutingDecision, surface: Surface,
                 steps: AsyncGenerator[Decided, None], run: ChainRun, ended: Ended) -> None:
        self._executor = executor
        self._call = call
        self._decision = decision
        self._surface = surface
        self._steps = steps
        self._run = run
        self._ended = ended
        self._status = CLIENT_CLOSED
        self._end: StreamEnd | None = None
        self._attempt = NO_ATTEMPT

    def _event(self, payload: Mapping[str, Any]) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    def _chunk(self, text: str, first: bool, finish: str | None, step: Decided | None) -> bytes:
        plan = self._decision.chain
        assert plan is not None
        envelope = {**self._executor.envelope(self._call, self._surface, plan), "object": self._surface.chunk_object}
        body: dict[str, Any] = {**envelope, "choices": [self._surface.delta(text, first, finish)]}
        if step is not None:
            body["chain"] = {"step": step.index, "adapter": step.adapter or self._executor.model}
        return self._event(body)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            first = True
            async for step in self._steps:
                yield self._chunk(step.text, first, None, step)
                first = False
            yield self._chunk("", first, self._run.finish, None)
            if (self._call.body.get("stream_options") or {}).get("include_usage"):
                plan = self._decision.chain
                assert plan is not None
                yield self._event({**self._executor.envelope(self._call, self._surface, plan), "choices": [],
                                   "usage": self._executor.usage(self._run),
                                   "chain": self._executor.extension(plan, self._run)})
            self._status = 200
        except (ChainFailed, LoragateError) as failed:
            error = failed.error if isinstance(failed, ChainFailed) else failed
            self._status = error.status
            if isinstance(failed, ChainFailed):
                self._attempt = failed.attempt
            yield f"data: {json.dumps(error.body())}\n\n".encode()
        except BaseException:
            await self.aclose()
            raise
        yield b"data: [DONE]\n\n"
        await self.aclose()

    async def aclose(self) -> StreamEnd:
        if self._end is None:
            self._end = StreamEnd(self._status, time.perf_counter() - self._run.started)
            with contextlib.suppress(RuntimeError):  # still running in the task being cancelled: it ends there
                await self._steps.aclose()  # a client gone mid-step: the step's generations are cancelled
        return self._end

    def ended(self, end: StreamEnd, output: str | None) -> None:
        """``RecordedStream``'s end: the request is recorded once, with the steps decided."""
        decision = self._executor.ran(self._decision, self._run) if end.status == 200 else self._decision
        attempt = self._run.attempt if self._attempt is NO_ATTEMPT else self._attempt
        self._ended(decision, None, attempt, end.status, end.upstream_s, output, tuple(self._run.steps))
