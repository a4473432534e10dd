"""Registry: real SQLite files and a real store on disk; every rejected registration leaves nothing."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loragate.adapters.registry import AdapterRegistry, RegistryLimits
from loragate.adapters.types import Descriptors
from loragate.errors import Conflict, Forbidden, InvalidRequest, LoragateError, NotFound, PayloadTooLarge
from tests.lora_files import write_lora


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    root.mkdir()
    return root


def open_registry(tmp_path: Path, roots: Path, **overrides: object) -> AdapterRegistry:
    limits = dict(base_models=frozenset({"tiny-llama"}), max_rank=16, max_bytes=10 << 20, import_roots=(roots,))
    limits.update(overrides)
    return AdapterRegistry.open(tmp_path / "data", RegistryLimits(**limits))  # type: ignore[arg-type]


def stored_state(registry: AdapterRegistry) -> tuple[int, list[str], list[str]]:
    """(rows, store entries, staging leftovers) as found on disk."""
    db = sqlite3.connect(registry.store.root.parent / "registry.sqlite3")
    rows = db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]
    db.close()
    entries = sorted(p.name for p in registry.store.root.iterdir() if p.name != "tmp")
    staging = sorted(p.name for p in registry.store.staging.iterdir())
    return rows, entries, staging


async def test_register_copies_into_content_addressed_store(tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    source = write_lora(roots / "a")
    record = await registry.add_from_path("alpha", source, Descriptors("facts", ("who?",)))
    assert record.path == registry.store.root / record.sha256
    assert record.rank == 8 and record.alpha == 16 and record.target_modules == ("q_proj", "v_proj")
    # editing the source afterwards cannot change the registered adapter
    original = (record.path / "adapter_model.safetensors").read_bytes()
    (source / "adapter_model.safetensors").write_bytes(b"garbage")
    assert (record.path / "adapter_model.safetensors").read_bytes() == original
    # durable: a new process sees the row
    registry.close()
    reopened = open_registry(tmp_path, roots)
    assert reopened.get("alpha").sha256 == record.sha256
    assert reopened.get("alpha").descriptors.examples == ("who?",)
    assert reopened.store.root.joinpath(record.sha256, "adapter_config.json").is_file()


async def test_same_content_two_names_share_files_and_delete_keeps_the_other(tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    source = write_lora(roots / "a")
    first = await registry.add_from_path("one", source, Descriptors())
    second = await registry.add_from_path("two", source, Descriptors())
    assert first.path == second.path
    await registry.remove("one")
    assert second.path.is_dir()
    await registry.remove("two")
    assert stored_state(registry) == (0, [], [])
    with pytest.raises(NotFound):
        await registry.remove("two")


def _bad_dirs(roots: Path, outside: Path) -> dict[str, tuple[Path, type[LoragateError], int, str]]:
    cases: dict[str, tuple[Path, type[LoragateError], int, str]] = {}
    d = write_lora(roots / "no-config")
    (d / "adapter_config.json").unlink()
    cases["missing config"] = (d, LoragateError, 422, "adapter_config.json is missing")
    d = write_lora(roots / "no-weights")
    (d / "adapter_model.safetensors").unlink()
    cases["missing weights"] = (d, LoragateError, 422, "adapter_model.safetensors is missing")
    cases["not a lora"] = (write_lora(roots / "ia3", config_overrides={"peft_type": "IA3"}), LoragateError, 422,
                           "not a LoRA")
    cases["wrong base"] = (write_lora(roots / "wrong-base", base="llama-7b"), LoragateError, 422,
                           "trained for base model 'llama-7b'")
    cases["rank too high"] = (write_lora(roots / "r64", rank=64), LoragateError, 422,
                              "rank 64 is above the workers' max LoRA rank 16")
    d = write_lora(roots / "bad-header")
    (d / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    cases["unreadable header"] = (d, LoragateError, 422, "unreadable safetensors header")
    d = write_lora(roots / "bad-shape", config_overrides={"r": 4})
    cases["shape vs rank"] = (d, LoragateError, 422, "do not match rank r=4")
    cases["outside roots"] = (write_lora(outside / "elsewhere"), Forbidden, 403, "outside the import roots")
    (roots / "link").symlink_to(write_lora(outside / "target"), target_is_directory=True)
    cases["dir symlink leaves roots"] = (roots / "link", Forbidden, 403, "symlink that leaves")
    d = write_lora(roots / "file-link")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to(write_lora(outside / "t2") / "adapter_model.safetensors")
    cases["file symlink leaves roots"] = (d, Forbidden, 403, "symlink that leaves")
    cases["too large"] = (write_lora(roots / "big", layers=40, hidden=2048), PayloadTooLarge, 413, "above the limit")
    return cases


@pytest.mark.parametrize("case", [
    "missing config", "missing weights", "not a lora", "wrong base", "rank too high", "unreadable header",
    "shape vs rank", "outside roots", "dir symlink leaves roots", "file symlink leaves roots", "too large",
])
async def test_each_rejection_has_its_status_and_leaves_nothing(case: str, tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    outside = tmp_path / "outside"
    outside.mkdir()
    path, error_type, status, fragment = _bad_dirs(roots, outside)[case]
    with pytest.raises(error_type, match=fragment) as caught:
        await registry.add_from_path("bad", path, Descriptors())
    assert caught.value.status == status
    assert stored_state(registry) == (0, [], [])
    assert "bad" not in registry.snapshot()


async def test_duplicate_name_is_409_and_keeps_the_first(tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    first = await registry.add_from_path("dup", write_lora(roots / "a", seed=1), Descriptors())
    with pytest.raises(Conflict, match="already registered") as caught:
        await registry.add_from_path("dup", write_lora(roots / "b", seed=2), Descriptors())
    assert caught.value.status == 409
    assert stored_state(registry) == (1, [first.sha256], [])


@pytest.mark.parametrize("name", ["Upper", "-lead", "", "a" * 65, "white space", "slash/x"])
async def test_invalid_names_are_400(name: str, tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    with pytest.raises(InvalidRequest, match="invalid adapter name"):
        await registry.add_from_path(name, write_lora(roots / "a"), Descriptors())
    assert stored_state(registry) == (0, [], [])


def test_crash_between_store_and_commit_leaves_nothing_after_restart(tmp_path: Path, roots: Path) -> None:
    """A process killed after the files are in the store but before the row commits."""
    write_lora(roots / "a")
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from loragate.adapters.registry import AdapterRegistry, RegistryLimits
        from loragate.adapters.types import Descriptors
        reg = AdapterRegistry.open(Path({str(tmp_path / "data")!r}), RegistryLimits(
            base_models=frozenset({{"tiny-llama"}}), max_rank=16, max_bytes=1 << 30,
            import_roots=(Path({str(roots)!r}),)))
        reg._insert = lambda record: os._exit(9)   # die exactly between rename and commit
        asyncio.run(reg.add_from_path("crashy", Path({str(roots / "a")!r}), Descriptors()))
    """)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()
    store = tmp_path / "data" / "adapters"
    assert [p.name for p in store.iterdir() if p.name != "tmp"], "the crash should have left a store entry"
    registry = open_registry(tmp_path, roots)
    assert stored_state(registry) == (0, [], [])


async def test_patch_descriptors_is_durable(tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    await registry.add_from_path("a", write_lora(roots / "a"), Descriptors("old", ()))
    updated = await registry.update_descriptors("a", Descriptors("new", ("q1", "q2")))
    assert updated.descriptors == Descriptors("new", ("q1", "q2"))
    registry.close()
    assert open_registry(tmp_path, roots).get("a").descriptors.description == "new"


async def test_a_second_process_notices_registrations(tmp_path: Path, roots: Path) -> None:
    first = open_registry(tmp_path, roots)
    second = open_registry(tmp_path, roots)
    assert await second.changed_elsewhere() is False
    await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))
    assert await second.changed_elsewhere() is True
    assert await second.changed_elsewhere() is True  # until it re-reads
    assert "a" not in second.snapshot()
    await second.refresh()
    assert second.get("a").descriptors.description == "d"
    assert await second.changed_elsewhere() is False


async def test_a_second_process_starting_keeps_an_in_flight_registration(tmp_path: Path, roots: Path) -> None:
    """Opening the registry collects crash leftovers; it must not collect another process's registration."""
    first = open_registry(tmp_path, roots)
    source = write_lora(roots / "a")
    staged = first.store.stage_copy(sorted(source.iterdir()))  # the first process is mid-registration
    second = open_registry(tmp_path, roots)  # a second gateway process starts meanwhile
    assert staged.is_dir(), "the second process deleted the first one's staging dir"
    record = await first.add_staged("a", staged, Descriptors("d", ()))
    third = open_registry(tmp_path, roots)
    assert (record.path / "adapter_model.safetensors").is_file()
    assert stored_state(third) == (1, [record.sha256], [])
    await second.refresh()
    assert second.get("a").sha256 == record.sha256


def test_stale_staging_leftovers_are_collected_at_open(tmp_path: Path, roots: Path) -> None:
    registry = open_registry(tmp_path, roots)
    old, fresh = registry.store.new_staging_dir(), registry.store.new_staging_dir()
    (old / "adapter_config.json").write_text("{}")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    registry.close()
    reopened = open_registry(tmp_path, roots)
    assert stored_state(reopened) == (0, [], [fresh.name])
