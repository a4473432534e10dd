"""Benchmark reports: each benchmark writes its own section; docs/BENCHMARKS.md is assembled from them.

Sections live in ``docs/bench/<name>.md`` so benchmarks can be re-run one at a time without losing
the others' numbers; every section records the machine it ran on and when.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SECTIONS = DOCS / "bench"
REPORT = DOCS / "BENCHMARKS.md"


def machine() -> str:
    """One line describing the machine: CPU model, cores, memory, Python."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
                     .split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = "unknown memory"
    return f"{cpu}, {os.cpu_count()} cores, {mem}, Python {platform.python_version()}, {platform.system()}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, title: str, body: str, out_dir: Path | None = None) -> Path:
    """Store one benchmark's markdown section and rebuild docs/BENCHMARKS.md.

    With ``out_dir`` (smoke tests, trial runs) the section goes there and docs/ is left alone.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = f"## {title}\n\n_Run {stamp} at commit {_commit()} on: {machine()}._\n\n"
    target = out_dir or SECTIONS
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.md"
    path.write_text(header + body.strip() + "\n")
    if out_dir is None:
        assemble()
    return path


def assemble() -> None:
    parts = [
        "# Benchmarks\n",
        "Written by `make bench` (each script can also be run alone: `python -m bench.<name>`).",
        "Every figure is a ratio or comparison measured side by side in one run on the machine named in",
        "its section; absolute numbers vary between runs on these shared machines, ratios much less.\n",
    ]
    parts += [p.read_text() for p in sorted(SECTIONS.glob("*.md"))]
    REPORT.write_text("\n".join(parts))


def plot_path(name: str) -> Path:
    """Where a benchmark's PNG goes (committed next to the report)."""
    SECTIONS.mkdir(parents=True, exist_ok=True)
    return SECTIONS / f"{name}.png"
