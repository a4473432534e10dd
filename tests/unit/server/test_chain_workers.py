"""A chain's generations through the real dispatcher and worker pool, on two stub workers (uvicorn, real HTTP):
one request's step candidates, reference passes and later steps share a worker while both are fit, and move
off one that is busier than the preference is worth or out of rotation.

The workers are the loadtest stub, wrapped so that an answer is two steps (the first ends at the ``.``
delimiter, the second at EOS), and the default ``affinity`` scheduling profile picks among them. A thin
wrapper around the real dispatcher notes where each job ran and can act between the two steps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx
import pytest

from loragate.loadtest.stub import Message, Receive, Scope, Send, StubApp, read_body
from loragate.workers.client import VLLMAdminClient
from loragate.workers.dispatch import Dispatched, Dispatcher, Job
from loragate.workers.launch import free_port
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.servers import serving
from tests.unit.server.fakes import MODEL, build, request
from tests.unit.workers.fakes import RecordingObserver

PROMPT = "Q: where was the spouse of Ann born? A:"  # no "." of its own: the answer's count the steps
HOPS = ("spouses", "birthplaces")
POLICY = f'chain;adapters="{" ".join(HOPS)}";base=?1'  # three candidates, two of them need a reference pass


class TwoSteps:
    """ASGI wrapper: the stub, except that a step generation (a body with ``stop``) ends at ``.`` while the
    answer so far has no ``.``, and at EOS after that, as vLLM reports each (``stop_reason``)."""

    def __init__(self, app: StubApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        payload = json.loads(body)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def stepped(message: Message) -> None:
            if message["type"] == "http.response.body" and "stop" in payload:
                data = json.loads(message["body"])
                choice = data["choices"][0]
                first = "." not in str(payload["prompt"])
                choice.update(text=choice["text"] + ("." if first else ""), finish_reason="stop",
                              stop_reason="." if first else None)
                message = {**message, "body": json.dumps(data).encode()}
            await send(message)

        await self.app(scope, replay, stepped)


@dataclass
class Ran:
    step: int
    model: str
    reference: bool  # the base model's reference pass over a candidate's step
    worker: str


@dataclass
class Watched:
    """The real dispatcher, noting where each job ran; ``between_steps`` runs once, before any job of step 2.

    The chain dispatches a step's generations, then its reference passes, then the next step's generations:
    a generation after a reference pass starts a new step.
    """

    dispatcher: Dispatcher
    between_steps: Callable[[], Awaitable[None]] | None = None
    ran: list[Ran] = field(default_factory=list)
    step: int = 1
    seen_reference: bool = False
    gate: asyncio.Future[None] | None = None  # between_steps, which every later job waits for

    async def dispatch(self, job: Job) -> Dispatched:
        reference = "prompt_logprobs" in job.body
        if not reference and self.seen_reference:
            self.step, self.seen_reference = self.step + 1, False
            if self.between_steps is not None and self.gate is None:
                self.gate = asyncio.ensure_future(self.between_steps())
        self.seen_reference |= reference
        step = self.step
        if self.gate is not None:
            await self.gate  # the step's candidates start together: none may run before the change
        reply = await self.dispatcher.dispatch(job)
        assert reply.attempt.worker is not None
        self.ran.append(Ran(step, str(job.body["model"]), reference, reply.attempt.worker))
        return reply

    def workers(self, step: int | None = None) -> set[str]:
        return {r.worker for r in self.ran if step is None or r.step == step}


@dataclass
class Workers:
    urls: tuple[str, str]
    first: ExitStack  # closing it stops the first worker


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Two stub workers; the first can be stopped on its own (to take it down between steps)."""
    with ExitStack() as first, ExitStack() as second:
        one = first.enter_context(serving(TwoSteps(StubApp(tokens=3)), free_port()))
        two = second.enter_context(serving(TwoSteps(StubApp(tokens=3)), free_port()))
        yield Workers((one, two), first)


@dataclass
class Fleet:
    pool: WorkerPool
    watched: Watched

    async def chain(self) -> None:
        """One chain request through the request path; its answer is two steps whichever worker ran them."""
        stages = build(self.watched, adapters=HOPS)  # type: ignore[arg-type]
        response = await stages.service.complete(request({"model": MODEL, "prompt": PROMPT, "max_tokens": 32},
                                                         policy=POLICY))
        assert response.status == 200
        body = json.loads(response.content)
        assert body["choices"][0]["text"] == " the cat sat. the cat sat"
        assert (body["chain"]["generations"], body["chain"]["reference_passes"]) == (6, 4)


@asynccontextmanager
async def fleet(urls: tuple[str, str], **weights: float) -> AsyncIterator[Fleet]:
    """The real pool (the default ``affinity`` profile; no probe loops: health changes only when a test
    probes) and the real dispatcher, watched."""
    async with httpx.AsyncClient(timeout=5) as http, aiohttp.ClientSession() as upstream:
        pool = WorkerPool(list(urls), VLLMAdminClient(http), RecordingObserver(), PoolConfig(scorer_weights=weights))
        yield Fleet(pool, Watched(Dispatcher(pool, upstream)))


async def test_every_job_of_a_chain_runs_on_one_worker_while_both_are_fit(workers: Workers) -> None:
    async with fleet(workers.urls) as f:
        await f.chain()
        assert len(f.watched.ran) == 10 and f.watched.workers() == {workers.urls[0]}
        assert {r.model for r in f.watched.ran} == {*HOPS, MODEL}
        await f.chain()  # another request is another group: here it starts on the same (tie-break) worker
        assert f.watched.workers() == {workers.urls[0]}


async def test_without_the_preference_the_same_chain_spreads_over_both_workers(workers: Workers) -> None:
    async with fleet(workers.urls, **{"session-affinity": 0.0}) as f:
        await f.chain()
        assert f.watched.workers(1) == set(workers.urls)  # the load scorer alone sends step 1's candidates apart


async def test_a_group_worker_busier_than_the_preference_is_worth_loses_the_jobs_only_it_preferred(
        workers: Workers) -> None:
    first, second = workers.urls
    async with fleet(workers.urls) as f, AsyncExitStack() as busy:

        async def six_more_requests_on_the_first() -> None:
            for _ in range(6):  # 6 > the 4 requests the preference is worth
                await busy.enter_async_context(f.pool.lease(None, None, exclude=[second]))

        f.watched.between_steps = six_more_requests_on_the_first
        await f.chain()
        assert f.watched.workers(1) == {first}
        step2 = [r for r in f.watched.ran if r.step == 2]
        # the adapters are loaded on the first worker (lora-affinity outweighs 6 requests), the base model is
        # everywhere: its generation and both reference passes go to the idle worker
        assert {(r.model, r.reference, r.worker) for r in step2} == {
            ("spouses", False, first), ("birthplaces", False, first), (MODEL, False, second),
            (MODEL, True, second)}
        assert sum(r.reference for r in step2) == 2


async def test_a_group_worker_out_of_rotation_is_not_used_and_the_group_moves(workers: Workers) -> None:
    first, second = workers.urls
    async with fleet(workers.urls) as f:

        async def stop_the_first() -> None:
            await asyncio.to_thread(workers.first.close)
            await f.pool.probe_once()  # a refused probe takes it out of rotation
            assert [v.healthy for v in f.pool.views()] == [False, True]

        f.watched.between_steps = stop_the_first
        await f.chain()  # the answer is whole: nothing was sent to the stopped worker
        assert f.watched.workers(1) == {first} and f.watched.workers(2) == {second}
