"""`loragate adapters add|ls|show|rm` against the running gateway."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from loragate.server.cli import app
from tests.integration.conftest import TOKEN, Stack


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
