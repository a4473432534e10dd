"""Client for vLLM's runtime LoRA admin API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

vLLM answers a successful load with plain text, "already loaded" with a 400 JSON error and a bad
path with 404; this module turns those into ``True``/exceptions so the pool never parses bodies.
"""

from __future__ import annotations

import httpx

from loragate.errors import UpstreamError, UpstreamTimeout, WorkerRejected


def error_message(response: httpx.Response) -> str:
    """The human message inside a vLLM/OpenAI error body, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return response.text.strip()[:500]


class VLLMAdminClient:
    """LoRA admin calls against one pooled ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, load_timeout: float = 120.0) -> None:
        self._http = http
        self._load_timeout = load_timeout

    async def _post(self, url: str, payload: dict[str, str]) -> httpx.Response:
        try:
            return await self._http.post(url, json=payload, timeout=self._load_timeout)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"worker {url} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"worker {url} unreachable: {exc!r}") from exc

    async def load_adapter(self, base_url: str, name: str, path: str) -> bool:
        """Load ``name`` from ``path``; False when the worker already had it loaded."""
        response = await self._post(f"{base_url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if response.status_code == 200:
            return True
        message = error_message(response)
        if response.status_code == 400 and "already" in message.lower():
            return False
        raise WorkerRejected(f"worker {base_url} could not load adapter {name!r}: {message}",
                             status=502, code="adapter_load_failed")

    async def unload_adapter(self, base_url: str, name: str) -> bool:
        """Unload ``name``; False when the worker did not have it."""
        response = await self._post(f"{base_url}/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200:
            return True
        if response.status_code in (400, 404):
            return False
        raise WorkerRejected(f"worker {base_url} could not unload {name!r}: {error_message(response)}",
                             status=502, code="adapter_unload_failed")

    async def healthy(self, base_url: str) -> bool:
        try:
            return (await self._http.get(f"{base_url}/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False
