"""What a load test sends: prompts from a JSONL file, or generated ones (graded by :mod:`loragate.grading`).

A workload is a tuple of :class:`WorkItem`; the load generator cycles through it, so a short file
still drives a long run. Items may carry their own adapter policy (sent as ``X-Adapter-Policy``)
and an expected answer; graded runs report success by policy, which is how a routing policy's
quality is compared with its cost on the same traffic.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WORD_TEXT = """
the a and of to in on for with from is are was what who where when how why which my your his her
their cat dog bird horse fish tree flower sun moon star sky rain snow river lake sea mountain road car
train boat book paper letter song music game school teacher student question answer idea problem
mother father sister brother friend family city town country world water food bread milk tea coffee
apple rice cake red blue green black white big small long short hot cold fast slow happy sad old new
"""
GENERATED_WORDS = tuple(_WORD_TEXT.split())
"""Words for generated prompts (a subset of the tiny test model's vocabulary, so they tokenize 1:1)."""


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the line."""


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One prompt to send; ``policy`` overrides the run's policy, ``expected`` enables grading."""

    prompt: str
    policy: str | None = None
    expected: tuple[str, ...] = ()
    model: str | None = None


def _strings(value: Any, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise WorkloadError(f"{where}: {field!r} must be a string or a non-empty list of strings")


def parse_item(record: Any, where: str = "item") -> WorkItem:
    """A :class:`WorkItem` from one decoded JSON object (``prompt`` required; ``policy``, ``expected``, ``model``)."""
    if not isinstance(record, dict):
        raise WorkloadError(f"{where}: expected a JSON object with a 'prompt'")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkloadError(f"{where}: 'prompt' must be a non-empty string")
    unknown = set(record) - {"prompt", "policy", "expected", "model", "id", "tags"}
    if unknown:
        raise WorkloadError(f"{where}: unknown field(s) {sorted(unknown)}; "
                            "known: prompt, policy, expected, model (id, tags are ignored)")
    policy = record.get("policy")
    if policy is not None and (not isinstance(policy, str) or not policy.strip()):
        raise WorkloadError(f"{where}: 'policy' must be a non-empty string in X-Adapter-Policy syntax")
    model = record.get("model")
    if model is not None and not isinstance(model, str):
        raise WorkloadError(f"{where}: 'model' must be a string")
    return WorkItem(prompt=prompt, policy=policy, expected=_strings(record.get("expected"), where, "expected"),
                    model=model)


def parse_jsonl(text: str, source: str = "<workload>") -> tuple[WorkItem, ...]:
    """Items from JSONL text; blank lines and ``#`` comments are skipped, errors name the line."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON ({exc.msg})") from exc
        items.append(parse_item(record, where))
    if not items:
        raise WorkloadError(f"{source}: no prompts")
    return tuple(items)


def load_jsonl(path: Path) -> tuple[WorkItem, ...]:
    """Items from a JSONL file (see :func:`parse_jsonl`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkloadError(f"cannot read workload {path}: {exc}") from exc
    return parse_jsonl(text, str(path))


def generated(count: int, words: int = 12, seed: int = 0) -> tuple[WorkItem, ...]:
    """``count`` distinct-looking prompts of ``words`` words each, reproducible from ``seed``.

    Distinct prompts matter for ``select``: the gateway caches prompt embeddings, and a workload of
    one repeated prompt would measure the cache, not routing.
    """
    if count < 1 or words < 1:
        raise WorkloadError("generated workloads need count >= 1 and words >= 1")
    rng = random.Random(seed)
    return tuple(WorkItem(prompt=" ".join(rng.choice(GENERATED_WORDS) for _ in range(words)))
                 for _ in range(count))
