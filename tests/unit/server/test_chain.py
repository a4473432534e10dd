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


@dataclass
class ScriptedDispatcher:
    """Answers each job from ``script`` by the job's model and the answer so far; records jobs and concurrency."""

    script: Script
    jobs: list[Job] = field(default_factory=list)
    running: int = 0
    most_running: int = 0

    async def dispatch(self, job: Job) -> Dispatched:
        self.jobs.append(job)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0)  # let the step's other candidates start
            reply = self.script(str(job.body["model"]), str(job.body["prompt"])[len(PROMPT):])
        finally:
            self.running -= 1
        if isinstance(reply, BaseException):
            raise reply
        return Dispatched(Attempt(WORKER, 0.001), "application/json", content=reply, upstream_s=0.01)


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
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}  # chosen tokens
    assert body["chain"]["generated_tokens"] == 24 and body["chain"]["generations"] == 6  # 2 steps + the EOS round
    assert [s["adapter"] for s in body["chain"]["steps"]] == ["spouses", "birthplaces"]
    assert body["chain"]["steps"][0]["candidates"] == [{"adapter": "spouses", "score": -0.1},
                                                       {"adapter": "birthplaces", "score": -1.5}]
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
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 10


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
    assert by_mean["chain"]["score"] == "mean_token_logprob"
    assert by_min["choices"][0]["text"] == " the spouse of a is b." and by_min["chain"]["score"] == "min_token_logprob"


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
    "chain;delim=word", "chain;temperature=0.1", "chain;score=sum",
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
    ("completions", {"stream": True}, "streaming"),
    ("chat.completions", {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"),
    ("completions", {"stop": ["!"]}, "stop strings"),
    ("completions", {"n": 2}, "n > 1"),
])
async def test_what_this_slice_cannot_chain_is_a_400_naming_the_limitation(
        route: str, body: dict[str, Any], what: str) -> None:
    stages, dispatcher = build_chain(two_hops)
    call = request({"model": MODEL, "prompt": PROMPT, **body}, policy="chain", route=route)
    with pytest.raises(LoragateError) as caught:
        await stages.service.complete(call)
    assert caught.value.status == 400 and caught.value.code == "chain_unsupported" and what in caught.value.message
    assert dispatcher.jobs == [] and [e.status for e in stages.events] == [400]


async def test_choose_route_parses_but_is_refused_until_it_is_built() -> None:
    stages, _ = build_chain(two_hops)
    with pytest.raises(InvalidRequest) as caught:
        await stages.service.complete(chain_request("chain;choose=route"))
    assert caught.value.code == "chain_unsupported" and "choose=route" in caught.value.message
    assert stages.dispatcher.jobs == []


async def test_a_chain_shadow_runs_through_the_same_executor() -> None:
    stages, _ = build_chain(two_hops)
    call = await stages.service.calls.parse(chain_request("base", expected="Rome", stream=True))
    shadow = shadow_call(call, parse_policy(f'chain;adapters="{" ".join(HOPS)}"', source="shadow"))
    response = await stages.service.run(shadow)  # unstreamed, as every shadow runs
    assert json.loads(response.content)["choices"][0]["text"].endswith("Rome.")
    (row,) = stages.outcomes.records
    assert row.kind == "shadow" and row.policy_applied == "chain" and row.result == "success"
