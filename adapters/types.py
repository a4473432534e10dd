"""Immutable values describing registered adapters; shared read-only with router and workers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Descriptors:
    """What routing reads about an adapter: a description and example prompts."""

    description: str = ""
    examples: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """A registered adapter as stored in the registry. ``path`` points into the content-addressed store."""

    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    sha256: str
    path: Path
    size_bytes: int
    created_at: float
    descriptors: Descriptors = field(default_factory=Descriptors)
    modules_to_save: tuple[str, ...] = ()

    def public(self) -> dict[str, object]:
        """The JSON shape the admin API and CLI show."""
        return {
            "name": self.name,
            "base_model": self.base_model,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save),
            "sha256": self.sha256,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "description": self.descriptors.description,
            "examples": list(self.descriptors.examples),
        }
