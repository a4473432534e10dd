"""The chain executor over a scripted dispatcher: steps, delimiters, EOS, budgets, ties, failures, 400s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from loragate.errors import InvalidRequest, LoragateError, NotFound, UpstreamError
from loragate.router.grammar import parse_policy
from loragate.router.types import CHAIN_CONTRAST, CHAIN_TOPIC
from loragate.server.calls import shadow_call
from loragate.workers.dispatch import Attempt, Dispatched, Job
from tests.unit.server.fakes import MODEL, WORKER, build, failed, request

PROMPT = "Q: Who is the spouse of Ann, and where was that spouse born?\nA:"
HOPS = ("spouses", "birthplaces")


def completion(text: str, logprobs: list[float], *, finish: str = "stop", stop_reason: object = None,
               prompt_tokens: int = 12) -> bytes:
    """A vLLM /v1/completions body for one step (``stop_reason``: the stop string, None at EOS)."""
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason,
                                    "logprobs": {"token_logprobs": logprobs, "tokens": ["t"] * len(logprobs)}}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(logprobs),
                                 "total_tokens": prompt_tokens + len(logprobs)}}).encode()


Script = Callable[[str, str], bytes | BaseException]  # (model the job runs, answer so far) -> reply
REFERENCE = -2.0  # every token's log-probability in the base model's reference passes (unless scripted)


def contrastive(mean: float) -> float:
    """The default score of a step whose tokens average ``mean``, against the fake base model's REFERENCE."""
    return round((1 + CHAIN_CONTRAST) * mean - CHAIN_CONTRAST * REFERENCE, 6)


def reference(logprob: float = REFERENCE, *, prompt_tokens: int = 1000) -> bytes:
    """A vLLM prefill-only body (``prompt_logprobs=0``): one ``{token_id: {"logprob"}}`` per prompt token."""
    rows = [None] + [{"7": {"logprob": logprob, "rank": 1, "decoded_token": "t"}}] * (prompt_tokens - 1)
    return json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": rows}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                                 "total_tokens": prompt_tokens + 1}}).encode()


@dataclass
class ScriptedDispatcher:
    """Answers each job from ``script`` by the job's model and the answer so far; records jobs and concurrency."""

    script: Script
    references: Callable[[str], bytes | BaseException] = lambda text: reference()  # (prompt + answer + step) ->
    jobs: list[Job] = field(default_factory=list)  # the step generations
    reference_jobs: list[Job] = field(default_factory=list)  # the base model's reference passes
    running: int = 0
    most_running: int = 0

    async def dispatch(self, job: Job) -> Dispatched:
        if "prompt_logprobs" in job.body:
            self.reference_jobs.append(job)
            await asyncio.sleep(0)
            answer = self.references(str(job.body["prompt"]) if "prompt" in job.body
                                     else PROMPT + job.body["messages"][-1]["content"])
            if isinstance(answer, BaseException):
                raise answer
            return Dispatched(Attempt(WORKER, 0.0), "application/json", content=answer, upstream_s=0.001)
        self.jobs.append(job)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        chat = "messages" in job.body
        try:
            await asyncio.sleep(0)  # let the step's other candidates start
            answer = job.body["messages"][-1]["content"] if chat else str(job.body["prompt"])[len(PROMPT):]
            reply = self.script(str(job.body["model"]), answer)
        finally:
            self.running -= 1
        if isinstance(reply, BaseException):
            raise reply
        return Dispatched(Attempt(WORKER, 0.001), "application/json", content=as_chat(reply) if chat else reply,
                          upstream_s=0.01)


def as_chat(content: bytes) -> bytes:
    """The same step as vLLM's /v1/chat/completions answers it (message content, logprobs.content)."""
    data = json.loads(content)
    choice = data["choices"][0]
    logprobs = [{"token": "t", "logprob": v} for v in choice["logprobs"]["token_logprobs"]]
    data["choices"] = [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                        "logprobs": {"content": logprobs}, "finish_reason": choice["finish_reason"],
                        "stop_reason": choice["stop_reason"]}]
    return json.dumps(data).encode()


def two_hops(model: str, answer: str) -> bytes | BaseException:
    """Step 1 is the spouses adapter's, step 2 the birthplaces adapter's; then both end (EOS)."""
    steps: dict[tuple[str, str], bytes] = {
        ("spouses", ""): completion(" Ann is married to Bob.", [-0.1] * 6, stop_reason="."),
        ("birthplaces", ""): completion(" Ann was born in Oslo.", [-1.5] * 6, stop_reason="."),
        ("spouses", " Ann is married to Bob."): completion(" Bob is married to Ann.", [-1.2] * 6, stop_reason="."),
        ("birthplaces", " Ann is married to Bob."): completion(" Bob was born in Rome.", [-0.2] * 6,
                                                               stop_reason="."),
    }
    return steps.get((model, answer), completion("", []))


def chain_request(policy: str = f'chain;adapters="{" ".join(HOPS)}"', *, expected: str | None = None,
                  **body: Any) -> Any:
    return request({"model": MODEL, "prompt": PROMPT, "max_tokens": 64, **body}, policy=policy, expected=expected)


def build_chain(script: Script) -> Any:
    dispatcher = ScriptedDispatcher(script)
    return build(dispatcher, adapters=HOPS), dispatcher  # type: ignore[arg-type]


async def test_each_step_is_generated_under_every_candidate_and_the_likelier_one_is_kept() -> None:
    stages, dispatcher = build_chain(two_hops)
    response = await stages.service.complete(chain_request(expected="Rome"))
    assert response.status == 200 and response.stream is None
    body = json.loads(response.content)
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["text"] == " Ann is married to Bob. Bob was born in Rome." and choice["finish_reason"] == "stop"
    # every generated token: 2 steps x 2 candidates x 6, and one per reference pass
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 28, "total_tokens": 40}
    assert body["chain"]["answer_tokens"] == 12 and body["chain"]["generated_tokens"] == 28
    assert body["chain"]["generations"] == 6  # 2 steps + the EOS round
    assert body["chain"]["reference_passes"] == 4 == len(dispatcher.reference_jobs)  # the EOS round has no text
    assert [s["adapter"] for s in body["chain"]["steps"]] == ["spouses", "birthplaces"]
    # contrastive: (1 + c) * mean(own) - c * mean(base) with the base's -2.0 per token
    assert body["chain"]["steps"][0]["candidates"] == [{"adapter": "spouses", "score": contrastive(-0.1)},
                                                       {"adapter": "birthplaces", "score": contrastive(-1.5)}]
    assert response.headers["x-adapter-policy-applied"] == "chain"
    assert response.headers["x-adapters"] == '"spouses";step=1, "birthplaces";step=2'
    assert dispatcher.most_running == 2  # a step's candidates run in parallel
    (event,) = stages.events
    assert event.status == 200 and [s.adapter for s in event.steps] == ["spouses", "birthplaces"]
    (row,) = stages.outcomes.records
    assert row.policy_applied == "chain" and row.adapters == (("spouses", 1.0), ("birthplaces", 1.0))
    assert row.result == "success" and row.method is None


async def test_a_step_is_a_completion_of_the_answer_so_far_stopped_at_the_delimiters_with_logprobs() -> None:
    stages, dispatcher = build_chain(two_hops)
    await stages.service.complete(chain_request(temperature=0))
    first, second = dispatcher.jobs[0], dispatcher.jobs[2]
    assert first.body["prompt"] == PROMPT and second.body["prompt"] == PROMPT + " Ann is married to Bob."
    assert first.body["stop"] == [".", "\n"] and first.body["include_stop_str_in_output"] is True
    assert first.body["logprobs"] == 1 and first.body["temperature"] == 0 and not first.stream
    assert {j.body["model"] for j in dispatcher.jobs[:2]} == set(HOPS)
    assert {j.adapter for j in dispatcher.jobs[:2]} == set(HOPS) and all(j.adapter_path for j in dispatcher.jobs)
    assert second.body["max_tokens"] == 64 - 6  # the whole answer's budget, less what is chosen


async def test_a_newline_delimiter_continues_and_delim_line_only_stops_at_newlines() -> None:
    def lines(model: str, answer: str) -> bytes:
        if answer == "":
            return completion(" one. two\n", [-0.5] * 4, stop_reason="\n")
        if answer == " one. two\n":
            return completion(" three", [-0.5] * 2)  # EOS without a delimiter: the answer is complete
        raise AssertionError(answer)

    stages, dispatcher = build_chain(lines)
    response = await stages.service.complete(chain_request('chain;adapters="spouses";delim=line'))
    body = json.loads(response.content)
    assert body["choices"][0]["text"] == " one. two\n three" and body["choices"][0]["finish_reason"] == "stop"
    assert dispatcher.jobs[0].body["stop"] == ["\n"] and len(body["chain"]["steps"]) == 2


async def test_eos_inside_a_step_ends_the_answer() -> None:
    stages, dispatcher = build_chain(lambda model, answer: completion(" Bob", [-0.3, -0.3]))
    response = await stages.service.complete(chain_request())
    body = json.loads(response.content)
    assert body["choices"][0] == {"index": 0, "text": " Bob", "logprobs": None, "finish_reason": "stop"}
    assert len(dispatcher.jobs) == 2 and response.headers["x-adapters"] == '"spouses";step=1'


async def test_max_tokens_bounds_the_whole_answer() -> None:
    def long(model: str, answer: str) -> bytes:
        if answer == "":
            return completion(" a b c d e f.", [-0.1] * 6, stop_reason=".")
        return completion(" g h i j", [-0.1] * 4, finish="length")

    stages, dispatcher = build_chain(long)
    response = await stages.service.complete(chain_request(max_tokens=10))
    body = json.loads(response.content)
    assert [j.body["max_tokens"] for j in dispatcher.jobs] == [10, 10, 4, 4]
    assert body["choices"][0]["finish_reason"] == "length" and body["chain"]["answer_tokens"] == 10
    assert body["usage"]["completion_tokens"] == 6 + 6 + 4 + 4 + 4  # every candidate's tokens, 4 reference passes


async def test_max_steps_ends_the_chain_at_a_delimiter_as_length() -> None:
    stages, dispatcher = build_chain(lambda model, answer: completion(" more.", [-0.1], stop_reason="."))
    response = await stages.service.complete(chain_request('chain;adapters="spouses birthplaces";max_steps=3'))
    body = json.loads(response.content)
    assert body["choices"][0]["text"] == " more. more. more." and body["choices"][0]["finish_reason"] == "length"
    assert len(dispatcher.jobs) == 6


async def test_a_tie_goes_to_the_first_candidate_in_order() -> None:
    stages, _ = build_chain(lambda model, answer: completion(f" {model}", [-0.5, -0.5]))
    response = await stages.service.complete(chain_request('chain;adapters="birthplaces spouses"'))
    assert json.loads(response.content)["choices"][0]["text"] == " birthplaces"
    assert response.headers["x-adapters"] == '"birthplaces";step=1'


async def test_the_score_is_the_mean_not_the_sum_of_token_logprobs() -> None:
    def lengths(model: str, answer: str) -> bytes:  # the longer step has the lower sum but the higher mean
        return completion(" long one", [-0.2] * 5) if model == "birthplaces" else completion(" x", [-0.5])

    stages, _ = build_chain(lengths)
    response = await stages.service.complete(chain_request())
    assert json.loads(response.content)["choices"][0]["text"] == " long one"


async def test_score_min_ranks_a_step_by_its_least_likely_token() -> None:
    """Template words both adapters are sure of, and one fact: the mean prefers the adapter that is surer of the
    template; min prefers the one that is not guessing the fact."""
    def template(model: str, answer: str) -> bytes:
        if model == "spouses":  # knows the fact, slightly less sure of the template words
            return completion(" the spouse of a is b.", [-0.1] * 6 + [-0.2])  # mean -0.114, min -0.2
        return completion(" the spouse of a is a.", [-0.0001] * 6 + [-0.5])  # guesses: mean -0.071, min -0.5
    stages, _ = build_chain(template)
    by_mean = json.loads((await stages.service.complete(chain_request('chain;adapters="birthplaces spouses";'
                                                                      "max_steps=1"))).content)
    by_min = json.loads((await stages.service.complete(chain_request('chain;adapters="birthplaces spouses";'
                                                                     "max_steps=1;score=min"))).content)
    assert by_mean["choices"][0]["text"] == " the spouse of a is a."
    assert by_mean["chain"]["score"] == "contrastive" and by_mean["chain"]["contrast"] == CHAIN_CONTRAST
    assert by_min["choices"][0]["text"] == " the spouse of a is b." and by_min["chain"]["score"] == "min"


def test_every_score_the_grammar_accepts_has_a_function() -> None:
    from loragate.router.types import CHAIN_SCORES
    from loragate.server.chain import STEP_SCORES

    assert set(STEP_SCORES) == set(CHAIN_SCORES)


async def test_the_base_model_competes_with_base() -> None:
    stages, _ = build_chain(lambda model, answer: completion(" base", [-0.01]) if model == MODEL
                            else completion(" lora", [-1.0]))
    response = await stages.service.complete(chain_request('chain;adapters="spouses";base=?1'))
    assert json.loads(response.content)["choices"][0]["text"] == " base"
    assert response.headers["x-adapters"] == f'"{MODEL}";step=1'


async def test_without_routing_or_a_list_the_first_k_registered_adapters_compete() -> None:
    stages, dispatcher = build_chain(lambda model, answer: completion(" x", [-0.1]))
    await stages.service.complete(chain_request("chain;k=1"))
    assert [j.body["model"] for j in dispatcher.jobs] == ["birthplaces"]  # by name


async def test_a_failing_candidate_fails_the_request_with_a_clear_502_and_no_answer() -> None:
    def breaks(model: str, answer: str) -> bytes | BaseException:
        if answer and model == "birthplaces":
            return failed(UpstreamError("worker stream broke: reset"))
        return two_hops(model, answer)

    stages, _ = build_chain(breaks)
    with pytest.raises(UpstreamError) as caught:
        await stages.service.complete(chain_request(expected="Rome"))
    assert caught.value.status == 502
    assert "chain step 2" in caught.value.message and "'birthplaces'" in caught.value.message
    (event,) = stages.events
    assert event.status == 502 and event.attempt.worker == WORKER and event.output is None
    assert [s.adapter for s in event.steps] == ["spouses"]  # what was decided before the failure
    (row,) = stages.outcomes.records
    assert row.status == 502 and row.result == "unknown"


async def test_an_unreadable_worker_body_is_a_502() -> None:
    stages, _ = build_chain(lambda model, answer: b'{"choices": []}')
    with pytest.raises(UpstreamError) as caught:
        await stages.service.complete(chain_request())
    assert caught.value.status == 502 and "chain step 1" in caught.value.message


@pytest.mark.parametrize("policy", [
    "chain;k=0", "chain;k=5", "chain;k=1.5", "chain;choose=vote", "chain;max_steps=0", "chain;max_steps=33",
    "chain;base=1", 'chain;adapters="spouses spouses"', 'chain;adapters="a b c d e"', 'chain;adapters=""',
    "chain;delim=word", "chain;temperature=0.1", "chain;score=sum", "chain;contrast=2", "chain;contrast=-0.1",
])
async def test_bad_chain_parameters_are_400s_before_anything_runs(policy: str) -> None:
    stages, dispatcher = build_chain(two_hops)
    with pytest.raises(InvalidRequest) as caught:
        await stages.service.complete(chain_request(policy))
    assert caught.value.status == 400 and caught.value.code == "invalid_policy"
    assert dispatcher.jobs == [] and stages.events[0].decision is None


async def test_an_unregistered_candidate_is_a_404() -> None:
    stages, dispatcher = build_chain(two_hops)
    with pytest.raises(NotFound):
        await stages.service.complete(chain_request('chain;adapters="spouses ghost"'))
    assert dispatcher.jobs == []


@pytest.mark.parametrize(("route", "body", "what"), [
    ("completions", {"stop": ["!"]}, "stop strings"),
    ("completions", {"n": 2}, "n > 1"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"prompt": ["a", "b"]}, "not one string"),
    ("chat.completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I"}]},
     "ends with an assistant message"),
])
async def test_what_a_chain_cannot_honour_is_a_400_naming_the_limitation(
        route: str, body: dict[str, Any], what: str) -> None:
    stages, dispatcher = build_chain(two_hops)
    call = request({"model": MODEL, "prompt": PROMPT, **body}, policy="chain", route=route)
    with pytest.raises(LoragateError) as caught:
        await stages.service.complete(call)
    assert caught.value.status == 400 and caught.value.code == "chain_unsupported" and what in caught.value.message
    assert dispatcher.jobs == [] and [e.status for e in stages.events] == [400]


async def test_a_chain_shadow_runs_through_the_same_executor() -> None:
    stages, _ = build_chain(two_hops)
    call = await stages.service.calls.parse(chain_request("base", expected="Rome", stream=True))
    shadow = shadow_call(call, parse_policy(f'chain;adapters="{" ".join(HOPS)}"', source="shadow"))
    response = await stages.service.run(shadow)  # unstreamed, as every shadow runs
    assert json.loads(response.content)["choices"][0]["text"].endswith("Rome.")
    (row,) = stages.outcomes.records
    assert row.kind == "shadow" and row.policy_applied == "chain" and row.result == "success"


def sure_of_both(model: str, answer: str) -> bytes:
    """Both adapters near-certain of different steps (one copies the question's name, one knows the fact)."""
    if answer:
        return completion("", [])
    text = " the spouse of Ann is Ann." if model == "spouses" else " the spouse of Ann is Bob."
    return completion(text, [-0.001] * 7, stop_reason=".")


def base_knows_copies(prompt: str) -> bytes:
    """The base model finds the copy likely and the fact unlikely."""
    return reference(-0.01 if prompt.endswith("is Ann.") else -3.0)


async def test_contrastive_prefers_the_sure_step_the_base_model_would_not_have_written() -> None:
    stages, dispatcher = build_chain(sure_of_both)
    dispatcher.references = base_knows_copies
    by_contrast = json.loads((await stages.service.complete(chain_request())).content)
    by_mean = json.loads((await stages.service.complete(chain_request(
        f'chain;adapters="{" ".join(HOPS)}";score=mean'))).content)
    assert by_contrast["choices"][0]["text"] == " the spouse of Ann is Bob."  # the fact, from birthplaces
    assert by_mean["choices"][0]["text"] == " the spouse of Ann is Ann."  # a tie on the mean: the first candidate
    first = dispatcher.reference_jobs[0]
    assert first.adapter is None and first.body["model"] == MODEL  # scored under the base model
    assert first.body["prompt"] in {PROMPT + " the spouse of Ann is Ann.", PROMPT + " the spouse of Ann is Bob."}
    assert first.body["max_tokens"] == 1 and first.body["prompt_logprobs"] == 0 and "stop" not in first.body


async def test_contrastive_keeps_the_candidates_own_confidence_first() -> None:
    """A step the candidate is unsure of does not win merely because the base model finds it unlikely."""
    def unsure(model: str, answer: str) -> bytes:
        if answer:
            return completion("", [])
        return completion(" nulolas.", [-0.6, -0.0]) if model == "spouses" else completion(" oslo.", [-0.0, -0.0])

    stages, dispatcher = build_chain(unsure)
    dispatcher.references = lambda prompt: reference(-20.0 if prompt.endswith("nulolas.") else -0.1)
    body = json.loads((await stages.service.complete(chain_request())).content)
    assert body["choices"][0]["text"] == " oslo."


async def test_contrast_zero_is_the_mean_and_the_base_candidate_needs_no_reference_pass() -> None:
    stages, dispatcher = build_chain(sure_of_both)
    dispatcher.references = base_knows_copies
    body = json.loads((await stages.service.complete(chain_request(
        f'chain;adapters="{" ".join(HOPS)}";contrast=0.0'))).content)
    assert body["choices"][0]["text"] == " the spouse of Ann is Ann."
    stages, dispatcher = build_chain(lambda model, answer: completion("" if answer else " x.", [] if answer else
                                                                      [-0.1, -0.1], stop_reason="."))
    await stages.service.complete(chain_request('chain;adapters="spouses";base=?1'))
    assert len(dispatcher.reference_jobs) == 1  # the adapter's step only: the base's own logprobs are its reference


async def test_a_failing_reference_pass_fails_the_request_naming_it() -> None:
    stages, dispatcher = build_chain(two_hops)
    dispatcher.references = lambda prompt: failed(UpstreamError("worker stream broke: reset"))
    with pytest.raises(UpstreamError) as caught:
        await stages.service.complete(chain_request())
    assert caught.value.status == 502 and "chain step 1" in caught.value.message
    assert "reference pass under the base model" in caught.value.message
    dispatcher.references = lambda prompt: b'{"choices": [{"text": ""}], "usage": {"prompt_tokens": 3}}'
    with pytest.raises(UpstreamError) as caught:
        await stages.service.complete(chain_request())
    assert caught.value.code == "bad_upstream_body" and "prompt_logprobs" in caught.value.message


async def sse(response: Any) -> list[Any]:
    """The data events of a streamed response, in order (``[DONE]`` as the string)."""
    raw = b"".join([chunk async for chunk in response.stream])
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def test_a_streamed_chain_sends_each_step_as_it_is_decided() -> None:
    stages, _ = build_chain(two_hops)
    response = await stages.service.complete(chain_request(expected="Rome", stream=True,
                                                           stream_options={"include_usage": True}))
    assert response.status == 200 and response.media_type == "text/event-stream"
    assert response.headers["x-adapter-policy-applied"] == "chain"
    events = await sse(response)
    steps, finish, usage, done = events[:2], events[2], events[3], events[4]
    assert [e["choices"][0]["text"] for e in steps] == [" Ann is married to Bob.", " Bob was born in Rome."]
    assert [e["chain"] for e in steps] == [{"step": 1, "adapter": "spouses"}, {"step": 2, "adapter": "birthplaces"}]
    assert all(e["object"] == "text_completion" and e["choices"][0]["finish_reason"] is None for e in steps)
    assert finish["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 28 and done == "[DONE]"
    (event,) = stages.events
    assert event.status == 200 and [s.adapter for s in event.steps] == ["spouses", "birthplaces"]
    (row,) = stages.outcomes.records
    assert row.result == "success" and row.adapters == (("spouses", 1.0), ("birthplaces", 1.0))


async def test_a_step_failing_mid_stream_ends_it_with_an_error_event() -> None:
    def breaks(model: str, answer: str) -> bytes | BaseException:
        return failed(UpstreamError("worker down")) if answer else two_hops(model, answer)

    stages, _ = build_chain(breaks)
    events = await sse(await stages.service.complete(chain_request(stream=True)))
    assert events[0]["chain"]["step"] == 1 and "chain step 2" in events[1]["error"]["message"]
    assert events[-1] == "[DONE]"
    (event,) = stages.events
    assert event.status == 502 and [s.adapter for s in event.steps] == ["spouses"]


async def test_a_client_gone_mid_step_stops_the_chain_and_cancels_its_generations() -> None:
    started, cancelled = asyncio.Event(), []

    class Hangs(ScriptedDispatcher):
        async def dispatch(self, job: Job) -> Dispatched:
            if job.body.get("prompt", "").endswith("Bob.") and "prompt_logprobs" not in job.body:
                started.set()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cancelled.append(job.body["model"])
                    raise
            return await super().dispatch(job)

    dispatcher = Hangs(two_hops)
    stages = build(dispatcher, adapters=HOPS)  # type: ignore[arg-type]
    response = await stages.service.complete(chain_request(stream=True))
    chunks = response.stream.__aiter__()

    async def read() -> None:
        async for _ in chunks:
            pass

    reader = asyncio.ensure_future(read())
    await asyncio.wait_for(started.wait(), 5)
    reader.cancel()  # what the server does when the client disconnects
    await asyncio.gather(reader, return_exceptions=True)
    await response.stream.aclose()
    assert sorted(cancelled) == sorted(HOPS)  # both of step 2's generations, not left running
    (event,) = stages.events
    assert event.status == 499 and [s.adapter for s in event.steps] == ["spouses"]


async def test_a_chat_chain_continues_the_assistant_message_step_by_step() -> None:
    stages, dispatcher = build_chain(two_hops)
    messages = [{"role": "user", "content": "Where was Ann's spouse born?"}]
    response = await stages.service.complete(request({"model": MODEL, "messages": messages, "max_tokens": 64},
                                                     policy=f'chain;adapters="{" ".join(HOPS)}"',
                                                     route="chat.completions", expected="Rome"))
    body = json.loads(response.content)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": " Ann is married to Bob. Bob was born in Rome."}
    second = dispatcher.jobs[2].body
    assert second["messages"] == [*messages, {"role": "assistant", "content": " Ann is married to Bob."}]
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert second["logprobs"] is True and "prompt" not in second
    assert dispatcher.reference_jobs[0].body["messages"][-1]["role"] == "assistant"
    (row,) = stages.outcomes.records
    assert row.result == "success"


async def test_a_streamed_chat_chain_sends_deltas() -> None:
    stages, _ = build_chain(two_hops)
    response = await stages.service.complete(request(
        {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 64, "stream": True},
        policy=f'chain;adapters="{" ".join(HOPS)}"', route="chat.completions"))
    events = await sse(response)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": " Ann is married to Bob."}
    assert events[1]["choices"][0]["delta"] == {"content": " Bob was born in Rome."}
    assert events[2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


@dataclass
class KeywordRouter:
    """Ranks the candidates by whether the text so far ends with a keyword of theirs (a stand-in for the index)."""

    seen: list[str] = field(default_factory=list)

    async def nearest(self, text: str, among: Any) -> tuple[tuple[str, float], ...]:
        self.seen.append(text)
        wanted = "birthplaces" if text.endswith("Bob.") else "spouses"
        return tuple(sorted(((n, 0.9 if n == wanted else 0.1) for n in among), key=lambda p: -p[1]))


async def test_choose_route_generates_only_the_routed_candidate_at_each_step() -> None:
    stages, dispatcher = build_chain(two_hops)
    router = KeywordRouter()
    stages.service.executors._executors["chain"].router = router
    response = await stages.service.complete(chain_request(f'chain;adapters="{" ".join(HOPS)}";choose=route'))
    body = json.loads(response.content)
    assert body["choices"][0]["text"] == " Ann is married to Bob. Bob was born in Rome."
    assert [j.body["model"] for j in dispatcher.jobs] == ["spouses", "birthplaces", "spouses"]  # one per step
    assert router.seen[:2] == [PROMPT, PROMPT + " Ann is married to Bob."]  # the text so far
    assert dispatcher.reference_jobs == [] and body["chain"]["generations"] == 3
    assert body["chain"]["steps"][0]["candidates"] == [{"adapter": "spouses", "score": 0.9}]


@dataclass
class DescriptorFit:
    """A stand-in for the router's fit: how well each step reads as its own candidate's domain."""

    fits: dict[tuple[str, str], float]
    asked: list[tuple[list[str], list[str]]] = field(default_factory=list)

    async def nearest(self, text: str, among: Any) -> tuple[tuple[str, float], ...]:
        return ()

    async def fit(self, texts: Any, adapters: Any) -> list[float]:
        self.asked.append((list(texts), list(adapters)))
        return [self.fits.get((t, a), 0.0) for t, a in zip(texts, adapters, strict=True)]


async def test_topic_weighs_each_step_by_its_fit_to_its_own_candidates_descriptors() -> None:
    """Equally sure candidates the base model scores alike: the step that reads as its own adapter's domain wins
    (the birthplaces adapter answering a marriage question with a copied name does not read as birthplaces)."""
    def alike(model: str, answer: str) -> bytes:
        if answer:
            return completion("", [])
        text = " Ann was born in Oslo." if model == "birthplaces" else " Ann is married to Ann."
        return completion(text, [-0.01] * 6, stop_reason=".")

    stages, _ = build_chain(alike)
    router = DescriptorFit({(" Ann was born in Oslo.", "birthplaces"): 0.8,
                            (" Ann is married to Ann.", "spouses"): 0.2})
    stages.service.executors._executors["chain"].router = router
    with_topic = json.loads((await stages.service.complete(chain_request())).content)
    without = json.loads((await stages.service.complete(chain_request(
        f'chain;adapters="{" ".join(HOPS)}";topic=0'))).content)
    assert with_topic["choices"][0]["text"] == " Ann was born in Oslo."
    assert without["choices"][0]["text"] == " Ann is married to Ann."  # a tie: the first candidate
    assert router.asked[0] == ([" Ann is married to Ann.", " Ann was born in Oslo."], list(HOPS))
    assert len(router.asked) == 1  # topic=0 asks nothing; the EOS round has no text to fit
    steps = with_topic["chain"]["steps"][0]["candidates"]
    assert steps[1]["score"] - steps[0]["score"] == pytest.approx(CHAIN_TOPIC * (0.8 - 0.2), abs=1e-5)


async def test_without_routing_topic_adds_nothing() -> None:
    stages, _ = build_chain(two_hops)  # the fake gateway has no embedder: Router.fit answers 0.0
    body = json.loads((await stages.service.complete(chain_request())).content)
    assert [s["adapter"] for s in body["chain"]["steps"]] == ["spouses", "birthplaces"]
    assert body["chain"]["steps"][0]["candidates"][0]["score"] == contrastive(-0.1)
