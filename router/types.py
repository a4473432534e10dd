"""Immutable values that flow one way along the request path (server -> router -> workers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from loragate.adapters.types import AdapterRecord

ParamValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A parsed ``X-Adapter-Policy``: the policy name and its parameters, plus where it came from."""

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "default"  # header | body | model | default

    def text(self) -> str:
        """The policy in header syntax (for logs, metrics and response headers)."""
        from loragate.router.grammar import serialize  # local: grammar imports this module

        text: str = serialize(self)
        return text


@dataclass(frozen=True, slots=True)
class AdapterWeight:
    """One adapter of a decision and its weight in a merge (1.0 for a single adapter)."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RoutingQuery:
    """Everything a policy may read: the prompt text, the asked policy and a registry snapshot."""

    prompt: str
    policy: PolicySpec
    adapters: Mapping[str, AdapterRecord]
    candidates: tuple[tuple[str, float], ...] = ()  # nearest adapters, best first (searching policies)
    compositional: bool | None = None  # the router's detector on those candidates (None: not searched)


CHAIN_DELIMITERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sentence": (".", "\n"),  # a sentence end or a line end closes a step (the default)
    "line": ("\n",),
})
"""Step delimiters a ``chain`` policy may name (``delim=``): each is a ``stop`` string of a step's generation."""


CHAIN_CONTRAST = 0.005
"""``chain;contrast=``'s default: chosen on half of the kit's people, reported on the other (docs/bench/chain.md)."""


CHAIN_TOPIC = 0.1
"""``chain;topic=``'s default, chosen like the contrast (docs/bench/chain_scores.md)."""


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """A decision to run as a chain: the answer is generated step by step, one adapter per step.

    ``candidates`` are adapter names in tie-break order; ``base`` adds the base model after them.
    Nothing is merged: each step runs under one candidate.
    """

    candidates: tuple[str, ...]
    base: bool = False
    choose: str = "likelihood"  # likelihood | route
    max_steps: int = 8
    delimiters: tuple[str, ...] = CHAIN_DELIMITERS["sentence"]
    score: str = "contrastive"  # how a step's token log-probabilities become its score: a name in CHAIN_SCORES
    contrast: float = CHAIN_CONTRAST  # score=contrastive: the weight of "less likely under the base model"
    topic: float = CHAIN_TOPIC  # the weight of a step's similarity to its candidate's own descriptors


#: Step scores ``chain;score=...`` accepts, the default first (the step loop maps each name to its function).
CHAIN_SCORES = ("contrastive", "mean", "min")


@dataclass(frozen=True, slots=True)
class StepChoice:
    """One chain step as decided: the winner (None: the base model), its score, tokens, and every candidate's score."""

    adapter: str | None
    score: float
    tokens: int
    text: str
    scores: tuple[tuple[str | None, float], ...] = ()
    decide_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AutoChoice:
    """What the learned ``auto`` chose for a request: the arm (a policy in header syntax), the request's
    context, why (``default``: no evidence yet; ``exploit``; ``explore``), and the arms it could have run."""

    context: str
    arm: str
    reason: str
    runnable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """What to run: no adapter (base), one adapter, a weighted set to merge, or a chain (``chain``).

    A chained decision names its candidates in ``chain`` and no ``adapters`` (so nothing resolves or
    merges it as a whole); once the chain ran, ``adapters`` lists the adapter chosen at each step.
    """

    policy_asked: str
    policy_applied: str
    adapters: tuple[AdapterWeight, ...] = ()
    candidates: tuple[tuple[str, float], ...] = ()
    method: str | None = None
    merge_params: Mapping[str, ParamValue] = field(default_factory=lambda: MappingProxyType({}))  # method's, as asked
    compositional: bool | None = None
    fallback: bool = False  # a searching policy found nothing good enough and answered with the base
    embed_s: float = 0.0
    search_s: float = 0.0
    tier: str = ""  # the embedder whose search decided ("static"/"minilm" in a cascade; "" when nothing searched)
    decide_s: float = 0.0  # the whole decision: resolving the policy, embedding, searching, deciding
    chain: ChainPlan | None = None
    auto: AutoChoice | None = None  # set when the learned auto chose the policy that made this decision

    @property
    def is_base(self) -> bool:
        return not self.adapters

    @property
    def executor(self) -> str:
        """How the request path runs it: ``single`` (resolve + one dispatch) or ``chain`` (a step loop)."""
        return "single" if self.chain is None else "chain"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Defaults for policy parameters a request leaves out (from the gateway's settings)."""

    min_score: float = 0.3
    k: int = 2
    method: str = "cat"
    weights: str = "softmax"
    temperature: float = 0.05
    weight_step: float = 0.05
    max_k: int = 8
    candidates: int = 5
    max_words: int = 128  # routing reads a prompt's last this-many words (tail_words)
