"""The learned auto's live side: statistics kept from outcome records, and the shadows that explore.

:class:`AutoLearner` subscribes to the outcome log (every record added, every regrade by feedback)
and publishes the immutable :class:`~loragate.router.auto.AutoStats` the router's
:class:`~loragate.router.auto.AutoPolicy` reads. At startup it rebuilds them from the log's records of
the last ``window`` (20 half-lives, where a record's weight is below one millionth, or the retention),
so a restart loses nothing: the rebuild and the live updates apply one rule
(:func:`loragate.server.outcomes.observation`) and decay by time, not by arrival order, so they agree.

Exploring happens off the client's path: a graded auto request that ended well gets, at
``shadow_rate``, a shadow under another arm drawn by Thompson sampling, which the shadow scheduler runs
in an idle moment; its graded outcome is recorded with the same context and counts like any other.
Traffic that carries no grade (feedback comes later, from the client) gets no shadow — nothing would
grade it — and is explored on the client's path only at ``auto_explore_rate`` (default 0).

Each gateway process learns live from what it records. Where several write one log (``processes`` > 1,
or replicas on one PostgreSQL), each also rebuilds from the log every ``auto_refresh_s`` (:meth:`follow`),
so every process serves from every process's outcomes; the observations it records live during that
read are applied on top, so at most the few whose records were written during the read count twice
until the next refresh, which starts from the log again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loragate.errors import ConfigError, InvalidRequest
from loragate.router.auto import (
    DEFAULT_ARMS,
    AutoConfig,
    AutoStats,
    ContextView,
    Observation,
    check_features,
    explore,
    rebuild,
    views,
)
from loragate.router.grammar import parse_policy
from loragate.router.service import check_policy
from loragate.router.types import AutoChoice, PolicySpec, RouterConfig
from loragate.server.outcomes import OutcomeLog
from loragate.server.recorder import CompletionEvent
from loragate.server.settings import Settings

log = logging.getLogger("loragate")


def auto_config(settings: Settings, router: RouterConfig) -> AutoConfig | None:
    """The learned auto's configuration, validated (None: ``auto_arms`` is empty and auto is the default policy).

    The default policy is the first arm (a context with no data gets it); the others follow in the order
    given, which is the cost order the choice breaks ties by. Arms left at their default drop the ones that
    need routing when there is none; arms given explicitly must all run here (a ConfigError names the bad one).
    """
    if not settings.auto_arms:
        return None
    routing = settings.embedder != "none"
    # the default list, however it arrived (child processes get every setting through the environment)
    explicit = tuple(settings.auto_arms) != DEFAULT_ARMS
    default = parse_policy(settings.default_policy, source="default")
    arms: list[PolicySpec] = [default]
    for text in settings.auto_arms:
        try:
            spec = parse_policy(text, source="auto")
            check_policy(spec, router, routing=routing)
        except InvalidRequest as exc:
            if explicit or routing:
                raise ConfigError(f"auto_arms: {text!r}: {exc.message}", param="auto_arms") from None
            continue
        if spec.text() not in {a.text() for a in arms}:
            arms.append(spec)
    try:
        features = check_features(settings.auto_features)
    except InvalidRequest as exc:
        raise ConfigError(exc.message, param="auto_features") from None
    return AutoConfig(arms=tuple(arms), features=features, max_contexts=settings.auto_max_contexts,
                      half_life_s=settings.auto_half_life_s, margin=settings.auto_margin,
                      explore_rate=settings.auto_explore_rate,
                      shadow_rate=settings.auto_shadow_rate)


class AutoLearner:
    """Keeps the statistics current (an outcome-log observer) and picks the arms shadows explore."""

    def __init__(self, config: AutoConfig, *, retention_s: float = 30 * 86400.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.window_s = min(retention_s, 20 * config.half_life_s)
        self.rng = rng or random.Random()
        self.clock = clock
        self._stats = AutoStats()
        self._during: list[Observation] | None = None  # observed live while a rebuild reads the log

    @property
    def stats(self) -> AutoStats:
        return self._stats

    def observe(self, obs: Observation) -> None:
        self._stats = self._stats.observe(obs, self.config)
        if self._during is not None:
            self._during.append(obs)

    async def rebuild(self, outcomes: OutcomeLog) -> int:
        """The statistics from the log's records of the window (plus what was observed live meanwhile); returns
        how many observations the log held."""
        self._during = []
        try:
            observations = await outcomes.observations(self.clock() - self.window_s)
            stats = rebuild(observations, self.config)
            for obs in self._during:
                stats = stats.observe(obs, self.config)
            self._stats = stats
        finally:
            self._during = None
        return len(observations)

    async def follow(self, outcomes: OutcomeLog, interval_s: float) -> None:
        """Rebuild every ``interval_s`` (run as a task where other processes write the same log)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.rebuild(outcomes)
            except Exception as exc:  # the database is down: keep serving from the statistics at hand
                log.warning("rebuilding the learned auto's statistics failed (%s); retrying in %.0f s", exc,
                            interval_s)

    def exploration(self, event: CompletionEvent) -> tuple[PolicySpec, AutoChoice] | None:
        """The arm a shadow of this request explores (Thompson sampling over the others it could run), or None:
        not an auto request, not graded by the gateway, or not sampled at ``shadow_rate``."""
        call, decision = event.call, event.decision
        if call is None or decision is None or decision.auto is None or call.expected is None:
            return None
        if self.rng.random() >= self.config.shadow_rate:
            return None
        chosen = decision.auto
        others = [arm for arm in chosen.runnable if arm != chosen.arm]
        arm = explore(self._stats, chosen.context, others, self.clock(), self.config, self.rng)
        if arm is None:
            return None
        spec = next(a for a in self.config.arms if a.text() == arm)
        return spec, replace(chosen, arm=arm, reason="explore")

    def views(self) -> tuple[ContextView, ...]:
        return views(self._stats, self.clock(), self.config)

    def report(self) -> dict[str, Any]:
        """``GET /admin/auto``: the configuration and, per context, every arm's posterior and the current choice."""
        return {"object": "auto", "enabled": True, "arms": [a.text() for a in self.config.arms],
                "default": self.config.default.text(), "features": list(self.config.features),
                "max_contexts": self.config.max_contexts, "half_life_s": self.config.half_life_s,
                "margin": self.config.margin,
                "explore_rate": self.config.explore_rate, "shadow_rate": self.config.shadow_rate,
                "contexts": [view_json(v) for v in self.views()]}


def view_json(view: ContextView) -> dict[str, Any]:
    return {"context": view.context, "choice": view.choice, "reason": view.reason, "best_arm": view.best_arm,
            "served": round(view.served, 3),
            "served_success": None if view.served_success is None else round(view.served_success, 4),
            "regret": None if view.regret is None else round(view.regret, 4),
            "arms": [{"arm": a.arm, "observations": round(a.observations, 3), "served": round(a.served, 3),
                      "mean": round(a.mean, 4), "ci95": [round(a.ci95[0], 4), round(a.ci95[1], 4)]}
                     for a in view.arms]}


def format_auto(report: dict[str, Any]) -> str:
    """The report as the plain-text table `loragate auto` prints."""
    if not report.get("enabled"):
        return "the learned auto is off (auto_arms is empty): auto is the default policy " + str(report.get("default"))
    lines = [f"arms (default first): {', '.join(report['arms'])}; contexts: {', '.join(report['features'])} "
             f"(at most {report['max_contexts']}); half-life {report['half_life_s']:g} s"]
    if not report["contexts"]:
        lines.append("no graded auto outcomes yet: every context gets the default")
    for c in report["contexts"]:
        regret = "-" if c["regret"] is None else f"{c['regret']:+.1%}"
        rate = "-" if c["served_success"] is None else f"{c['served_success']:.1%}"
        lines.append("")
        lines.append(f"context {c['context']}: choice {c['choice']} ({c['reason']}); auto served {c['served']:g} "
                     f"graded, success {rate}, regret {regret} vs {c['best_arm']}")
        lines.append(f"    {'ARM':32} {'N':>8} {'SERVED':>8} {'MEAN':>7}  95% INTERVAL")
        for a in c["arms"]:
            mark = "*" if a["arm"] == c["choice"] else " "
            lines.append(f"  {mark} {a['arm']:32} {a['observations']:>8g} {a['served']:>8g} {a['mean']:>7.1%}  "
                         f"[{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]")
    return "\n".join(lines)
