"""Client for vLLM's runtime LoRA admin API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

vLLM answers a successful load with plain text, "already loaded" with a 400 JSON error and a bad
path with 404; this module turns those into ``True``/exceptions so the pool never parses bodies.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Protocol

import httpx

from loragate.errors import UpstreamError, WorkerRejected
from loragate.workers.stats import EngineStats, parse_vllm_metrics
from loragate.workers.transport import transport_error


def error_message(response: httpx.Response) -> str:
    """The human message inside a vLLM/OpenAI error response, or the raw text."""
    return body_message(response.content)


def body_message(raw: bytes) -> str:
    """The human message inside a vLLM/OpenAI error body (``{"error": {"message"}}`` or
    ``{"message"}``), or the start of the raw text."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return text.strip()[:500]


class Probe(enum.Enum):
    """What one health probe saw. The pool treats the two failures differently (see ``WorkerPool``)."""

    OK = "ok"
    DOWN = "down"  # refused, reset, or answered but not 200: the worker cannot serve
    SLOW = "slow"  # no answer in time: a hung worker, or a gateway too busy to read a healthy one's answer


class WorkerAdmin(Protocol):
    """What the pool needs from a worker's API; tests pass fakes that inject faults."""

    async def load_adapter(self, base_url: str, name: str, path: str) -> bool: ...

    async def unload_adapter(self, base_url: str, name: str) -> bool: ...

    async def resolve_adapter(self, base_url: str, name: str) -> bool: ...

    async def list_adapters(self, base_url: str) -> dict[str, str]: ...

    async def probe(self, base_url: str, timeout_s: float = 2.0) -> Probe: ...

    async def engine_stats(self, base_url: str, timeout_s: float = 2.0) -> EngineStats: ...


class VLLMAdminClient:
    """LoRA admin calls against one pooled ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, load_timeout: float = 120.0) -> None:
        self._http = http
        self._load_timeout = load_timeout

    async def _send(self, method: str, base_url: str, path: str, *, doing: str = "", timeout_s: float | None = None,
                    payload: object = None) -> httpx.Response:
        """One admin call; a transport failure becomes the error the transport table names for it."""
        try:
            return await self._http.request(method, base_url + path, json=payload,
                                            timeout=self._load_timeout if timeout_s is None else timeout_s)
        except httpx.HTTPError as exc:
            raise transport_error(exc, base_url, doing or f"on {method} {path}") from exc

    async def load_adapter(self, base_url: str, name: str, path: str) -> bool:
        """Load ``name`` from ``path``; False when the worker already had it loaded."""
        response = await self._send("POST", base_url, "/v1/load_lora_adapter",
                                    payload={"lora_name": name, "lora_path": path})
        if response.status_code == 200:
            return True
        message = error_message(response)
        if response.status_code == 400 and "already" in message.lower():
            return False
        raise WorkerRejected(f"worker {base_url} could not load adapter {name!r}: {message}",
                             status=502, code="adapter_load_failed")

    async def unload_adapter(self, base_url: str, name: str) -> bool:
        """Unload ``name``; False when the worker did not have it."""
        response = await self._send("POST", base_url, "/v1/unload_lora_adapter", payload={"lora_name": name})
        if response.status_code == 200:
            return True
        if response.status_code in (400, 404):
            return False
        raise WorkerRejected(f"worker {base_url} could not unload {name!r}: {error_message(response)}",
                             status=502, code="adapter_unload_failed")

    async def list_adapters(self, base_url: str) -> dict[str, str]:
        """The adapters the worker serves now: name -> the directory it loaded them from.

        vLLM lists each LoRA in ``/v1/models`` with ``parent`` set to the base model and ``root`` set
        to its path; the base model has no parent.
        """
        response = await self._send("GET", base_url, "/v1/models")
        if response.status_code != 200:
            raise UpstreamError(f"worker {base_url} answered {response.status_code} to GET /v1/models")
        return {str(m["id"]): str(m.get("root") or "") for m in response.json().get("data", []) if m.get("parent")}

    async def probe(self, base_url: str, timeout_s: float = 2.0) -> Probe:
        """``GET /health``: OK on 200 within ``timeout_s``, SLOW without an answer in time, else DOWN.

        The timeout bounds how long a hung (not dead) worker stays in rotation: the probe interval
        plus this timeout must stay under the failover target (2 s).
        """
        try:
            response = await self._http.get(f"{base_url}/health", timeout=timeout_s)
        except httpx.HTTPError as exc:
            return Probe.SLOW if isinstance(exc, httpx.TimeoutException) else Probe.DOWN
        return Probe.OK if response.status_code == 200 else Probe.DOWN

    async def engine_stats(self, base_url: str, timeout_s: float = 2.0) -> EngineStats:
        """Scrape the worker's Prometheus ``/metrics`` into an :class:`EngineStats` snapshot."""
        response = await self._send("GET", base_url, "/metrics", doing="scraping metrics", timeout_s=timeout_s)
        if response.status_code != 200:
            raise UpstreamError(f"worker {base_url} metrics answered {response.status_code}")
        return parse_vllm_metrics(response.text, time.monotonic())

    async def resolve_adapter(self, base_url: str, name: str) -> bool:
        """Make a worker load ``name`` through its LoRA resolver plugin (no shared filesystem).

        vLLM only consults resolvers when a request names an adapter it has not loaded, and has no
        admin call for it, so this sends the cheapest such request: one prompt token (id 0, valid
        in every vocabulary), one output token. Load errors surface here, before the client's
        request, exactly as with ``load_lora_adapter``: 404 (no resolver found it) or 400 (found
        but failed to load, e.g. a tampered file the plugin refused).
        """
        payload = {"model": name, "prompt": [0], "max_tokens": 1, "temperature": 0}
        response = await self._send("POST", base_url, "/v1/completions", doing=f"resolving {name!r}", payload=payload)
        if response.status_code == 200:
            return True
        raise WorkerRejected(f"worker {base_url} could not resolve adapter {name!r}: {error_message(response)}",
                             status=502, code="adapter_load_failed")
