"""Registry: real SQLite files and a real store on disk; every rejected registration leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from loragate.adapters.objectstore import S3Location, S3Store
from loragate.adapters.registry import AdapterRegistry, RegistryLimits
from loragate.adapters.types import Descriptors
from loragate.database import PostgresDatabase, PostgresOptions, migrate, schema_version
from loragate.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    LoragateError,
    NotFound,
    PayloadTooLarge,
    StorageUnavailable,
)
from tests.lora_files import write_lora
from tests.postgres import running_postgres
from tests.s3 import KEY_ID, REGION, SECRET, S3Server
from tests.waiting import until


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    root.mkdir()
    return root


OpenRegistry = Callable[..., AdapterRegistry]


def limits_for(roots: Path, **overrides: Any) -> RegistryLimits:
    """The tests' registration limits: the tiny base model, rank 16, 10 MiB, ``roots`` as the import root."""
    return RegistryLimits(**{"base_models": frozenset({"tiny-llama"}), "max_rank": 16, "max_bytes": 10 << 20,
                             "import_roots": (roots,), **overrides})


@contextlib.asynccontextmanager
async def following(registry: AdapterRegistry, on_change: Callable[[], Awaitable[None]] | None = None,
                    settle_s: float = 0.3) -> AsyncIterator[None]:
    """``registry`` follows other processes' changes for the block (notifications only: the resync is an hour
    away); ``settle_s`` lets it start listening first."""
    async def nothing() -> None:
        return None

    follower = asyncio.create_task(registry.follow(on_change or nothing, poll_s=0.05, resync_s=3600))
    try:
        await asyncio.sleep(settle_s)
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


@pytest.fixture
def open_registry(tmp_path: Path, roots: Path, database_url: str | None) -> OpenRegistry:
    """Opens the registry of ``tmp_path/data`` on the test's backend (each test runs on SQLite and on
    PostgreSQL); every call is another gateway process's view of the same state."""
    def opened(**overrides: Any) -> AdapterRegistry:
        database = PostgresDatabase(database_url) if database_url else None
        return AdapterRegistry.open(tmp_path / "data", limits_for(roots, **overrides), database=database)

    return opened


def stored_state(registry: AdapterRegistry) -> tuple[int, list[str], list[str]]:
    """(rows, store entries, staging leftovers) as found in the database and on disk."""
    rows = registry.database.query("SELECT COUNT(*) AS n FROM adapters")[0]["n"]
    entries = sorted(p.name for p in registry.store.root.iterdir() if p.name != "tmp")
    staging = sorted(p.name for p in registry.store.staging.iterdir())
    return rows, entries, staging


def _run_in_child(script: str, tmp_path: Path, roots: Path, database_url: str | None,
                  **kwargs: object) -> subprocess.Popen[bytes]:
    """A second gateway process: opens the same registry and runs ``script`` with ``reg`` bound."""
    prelude = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from loragate.adapters.registry import AdapterRegistry, RegistryLimits
        from loragate.adapters.types import Descriptors
        from loragate.database import PostgresDatabase, PostgresOptions, schema_version
        url = {database_url!r}
        reg = AdapterRegistry.open(Path({str(tmp_path / "data")!r}), RegistryLimits(
            base_models=frozenset({{"tiny-llama"}}), max_rank=16, max_bytes=1 << 30,
            import_roots=(Path({str(roots)!r}),)), database=PostgresDatabase(url) if url else None)
    """)
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], env={**os.environ},
                            **kwargs)  # type: ignore[call-overload]


async def test_register_copies_into_content_addressed_store(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    source = write_lora(roots / "a")
    record = (await registry.add_from_path("alpha", source, Descriptors("facts", ("who?",)))).record
    assert record.path == registry.store.root / record.sha256
    assert record.rank == 8 and record.alpha == 16 and record.target_modules == ("q_proj", "v_proj")
    # editing the source afterwards cannot change the registered adapter
    original = (record.path / "adapter_model.safetensors").read_bytes()
    (source / "adapter_model.safetensors").write_bytes(b"garbage")
    assert (record.path / "adapter_model.safetensors").read_bytes() == original
    # durable: a new process sees the row
    registry.close()
    reopened = open_registry()
    assert reopened.get("alpha").sha256 == record.sha256
    assert reopened.get("alpha").descriptors.examples == ("who?",)
    assert reopened.store.root.joinpath(record.sha256, "adapter_config.json").is_file()


async def test_same_content_two_names_share_files_and_delete_keeps_the_other(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    source = write_lora(roots / "a")
    first = (await registry.add_from_path("one", source, Descriptors())).record
    second = (await registry.add_from_path("two", source, Descriptors())).record
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
async def test_each_rejection_has_its_status_and_leaves_nothing(
        case: str, tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    outside = tmp_path / "outside"
    outside.mkdir()
    path, error_type, status, fragment = _bad_dirs(roots, outside)[case]
    with pytest.raises(error_type, match=fragment) as caught:
        await registry.add_from_path("bad", path, Descriptors())
    assert caught.value.status == status
    assert stored_state(registry) == (0, [], [])
    assert "bad" not in registry.snapshot()


async def test_duplicate_name_is_409_and_keeps_the_first(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    first = (await registry.add_from_path("dup", write_lora(roots / "a", seed=1), Descriptors())).record
    with pytest.raises(Conflict, match="already registered with different files") as caught:
        await registry.add_from_path("dup", write_lora(roots / "b", seed=2), Descriptors())
    assert caught.value.status == 409
    assert stored_state(registry) == (1, [first.sha256], [])


@pytest.mark.parametrize("name", ["Upper", "-lead", "", "a" * 65, "white space", "slash/x"])
async def test_invalid_names_are_400(name: str, tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    with pytest.raises(InvalidRequest, match="invalid adapter name"):
        await registry.add_from_path(name, write_lora(roots / "a"), Descriptors())
    assert stored_state(registry) == (0, [], [])


def test_crash_between_store_and_commit_leaves_nothing_after_restart(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry, database_url: str | None) -> None:
    """A process killed after the files are in the store but before the row commits."""
    write_lora(roots / "a")
    child = _run_in_child(f"""
        reg._insert = lambda record: os._exit(9)   # die exactly between rename and commit
        asyncio.run(reg.add_from_path("crashy", Path({str(roots / "a")!r}), Descriptors()))
    """, tmp_path, roots, database_url, stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 9, stderr.decode()
    store = tmp_path / "data" / "adapters"
    assert [p.name for p in store.iterdir() if p.name != "tmp"], "the crash should have left a store entry"
    registry = open_registry()
    assert stored_state(registry) == (0, [], [])


async def test_patch_descriptors_is_durable(tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    await registry.add_from_path("a", write_lora(roots / "a"), Descriptors("old", ()))
    updated = await registry.update_descriptors("a", Descriptors("new", ("q1", "q2")))
    assert updated.descriptors == Descriptors("new", ("q1", "q2"))
    registry.close()
    assert open_registry().get("a").descriptors.description == "new"


async def test_a_second_process_follows_registrations_patches_and_deletes(
        roots: Path, open_registry: OpenRegistry) -> None:
    """SQLite: data_version polls; PostgreSQL: LISTEN/NOTIFY (resync far away, so notifications carry it)."""
    first, second = open_registry(), open_registry()
    seen: list[frozenset[str]] = []

    async def changed() -> None:
        seen.append(frozenset(second.snapshot()))

    async with following(second, changed, settle_s=0.2):
        await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))
        await until(lambda: "a" in second.snapshot())
        assert seen and "a" in seen[-1]  # the callback (the descriptor index's re-sync) ran after the re-read
        await first.update_descriptors("a", Descriptors("patched", ()))
        await until(lambda: second.get("a").descriptors.description == "patched")
        await first.remove("a")
        await until(lambda: "a" not in second.snapshot())


async def test_a_registration_committed_as_the_follower_starts_is_not_missed(
        roots: Path, open_registry: OpenRegistry) -> None:
    """The follower re-reads once its baseline is taken: a commit between the process's first read and
    the baseline (a second gateway process starting while the first registers) is seen anyway."""
    first, second = open_registry(), open_registry()
    second.snapshot()  # the starting process has read the registry ...
    await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))  # ... then the other commits
    async with following(second, settle_s=0.0):  # the baseline is read after the commit: no change to see
        await until(lambda: "a" in second.snapshot())


async def test_postgres_follower_catches_up_after_losing_its_connection(
        roots: Path, postgres_url: str, tmp_path: Path) -> None:
    """Notifications sent while the LISTEN connection is down are lost; the reconnect re-reads everything."""
    first = AdapterRegistry.open(tmp_path / "one", limits_for(roots), database=PostgresDatabase(postgres_url))
    second = AdapterRegistry.open(tmp_path / "two", limits_for(roots), database=PostgresDatabase(postgres_url))
    async with following(second):
        # kill every LISTEN connection, register while none is back (a listener reconnects within 0.2 s, so
        # the registration races it; either way the reconnect's re-read must bring the row)
        first.database.query("SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
                             "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))
        await until(lambda: "a" in second.snapshot())


async def test_a_second_process_starting_keeps_an_in_flight_registration(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    """Opening the registry collects crash leftovers; it must not collect another process's registration."""
    first = open_registry()
    source = write_lora(roots / "a")
    staged = first.store.stage_copy(sorted(source.iterdir()))  # the first process is mid-registration
    second = open_registry()  # a second gateway process starts meanwhile
    assert staged.is_dir(), "the second process deleted the first one's staging dir"
    record = (await first.add_staged("a", staged, Descriptors("d", ()))).record
    third = open_registry()
    assert (record.path / "adapter_model.safetensors").is_file()
    assert stored_state(third) == (1, [record.sha256], [])
    await second.refresh()
    assert second.get("a").sha256 == record.sha256


def test_a_killed_uploads_staging_dir_is_collected_at_the_next_start(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry, database_url: str | None) -> None:
    """SIGKILL in the middle of an upload (the real upload code) leaves its staging dir; the next start,
    however soon, collects it: its owner is gone."""
    registry = open_registry()
    child = _run_in_child("""
        from loragate.server.admin import AdminService
        async def body():
            yield b"x" * (1 << 20)
            yield b"y" * (1 << 20)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-upload
            yield b""
        admin = AdminService(reg, None, 1 << 30)
        asyncio.run(admin.register_upload("big", {"adapter_model.safetensors": body()}, "", []))
    """, tmp_path, roots, database_url, stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    leftovers = list(registry.store.staging.iterdir())
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_model.safetensors").stat().st_size == 2 << 20
    registry.close()
    assert stored_state(open_registry()) == (0, [], [])


def test_a_live_processs_staging_dir_is_never_collected(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry, database_url: str | None) -> None:
    """Another gateway process mid-registration keeps its staging dir however old it is; once that
    process is gone, the next start collects it."""
    child = _run_in_child("""
        staged = reg.store.new_staging_dir()
        (staged / "adapter_config.json").write_text("{}")
        print(staged, flush=True)
        sys.stdin.read()  # busy until the test lets it go; exits without cleaning up
    """, tmp_path, roots, database_url, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        staged = Path(child.stdout.readline().decode().strip())
        hours_ago = time.time() - 2 * 3600
        os.utime(staged, (hours_ago, hours_ago))
        registry = open_registry()  # a second process starts meanwhile
        assert staged.is_dir(), "a live process's staging dir was collected"
        registry.close()
    finally:
        child.communicate(b"", timeout=120)
    assert stored_state(open_registry()) == (0, [], [])


def test_staging_owned_by_a_reused_pid_and_old_unowned_entries_are_collected(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    mine = registry.store.new_staging_dir()
    owner = mine.name.split("~")
    reused = registry.store.staging / "~".join([*owner[:3], str(int(owner[3]) + 1), "x"])  # same pid, other start
    reused.mkdir()
    old, fresh = registry.store.staging / "tmpold", registry.store.staging / "tmpfresh"  # older versions' names
    # another host or container on shared storage: its pids mean nothing here, so age decides
    remote_old, remote_fresh = (registry.store.staging / f"owner~elsewhere~{os.getpid()}~1~{tag}"
                                for tag in ("old", "fresh"))
    for entry in (old, fresh, remote_old, remote_fresh):
        entry.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(remote_old, (hours_ago, hours_ago))
    registry.close()
    reopened = open_registry()
    assert stored_state(reopened) == (0, [], sorted([mine.name, "tmpfresh", remote_fresh.name]))


async def test_repeating_a_committed_registration_returns_the_existing_record(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    """A client that lost the response retries: same name, files and descriptors is the same registration."""
    registry = open_registry()
    source = write_lora(roots / "a")
    first = await registry.add_from_path("a", source, Descriptors("facts", ("who?",)))
    again = await registry.add_from_path("a", source, Descriptors("facts", ("who?",)))
    assert first.created and not again.created
    assert again.record == first.record
    staged = registry.store.stage_copy(sorted(source.iterdir()))  # the same files, uploaded
    assert (await registry.add_staged("a", staged, Descriptors("facts", ("who?",)))).record == first.record
    # a second process that has not seen the row yet answers the same
    other = open_registry()
    assert (await other.add_from_path("a", source, Descriptors("facts", ("who?",)))).record == first.record
    assert stored_state(registry) == (1, [first.record.sha256], [])


@pytest.mark.parametrize(("change", "fragment"), [
    ("files", "different files"), ("description", "a different description"), ("examples", "different examples")])
async def test_a_different_registration_under_a_taken_name_is_409_naming_the_difference(
        change: str, fragment: str, tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    first = (await registry.add_from_path("a", write_lora(roots / "a"), Descriptors("facts", ("who?",)))).record
    source = write_lora(roots / "b", seed=7) if change == "files" else roots / "a"
    descriptors = Descriptors("other" if change == "description" else "facts",
                              ("what?",) if change == "examples" else ("who?",))
    with pytest.raises(Conflict, match=fragment) as caught:
        await registry.add_from_path("a", source, descriptors)
    assert caught.value.code == "adapter_exists" and caught.value.param == "name"
    assert registry.get("a") == first
    assert stored_state(registry) == (1, [first.sha256], [])


async def test_errors_name_the_users_path_or_the_upload_never_the_staging_dir(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    empty = roots / "empty"
    empty.mkdir()
    with pytest.raises(LoragateError) as caught:
        await registry.add_from_path("e", empty, Descriptors())
    assert caught.value.message == f"adapter_config.json is missing in {empty}"
    staged = registry.store.new_staging_dir()
    (staged / "adapter_config.json").write_text((write_lora(roots / "x") / "adapter_config.json").read_text())
    with pytest.raises(LoragateError) as caught:
        await registry.add_staged("u", staged, Descriptors(), "the upload (adapter_config.json)")
    assert caught.value.message == "adapter_model.safetensors is missing in the upload (adapter_config.json)"
    assert str(registry.store.staging) not in caught.value.message
    assert stored_state(registry) == (0, [], [])


@pytest.mark.parametrize(("path", "code", "fragment"), [
    ("a\0b", "invalid_path", "NUL byte"),
    ("x" * 5000, "invalid_path", "File name too long"),
    ("deep/" + "y" * 5000 + "/z", "invalid_path", "File name too long"),
])
async def test_paths_the_os_refuses_are_400_naming_the_path_field(
        path: str, code: str, fragment: str, tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    with pytest.raises(InvalidRequest, match=fragment) as caught:
        await registry.add_from_path("a", roots / path, Descriptors())
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "path", code)
    assert len(caught.value.message) < 400  # a 5,000-character name is not echoed whole
    assert stored_state(registry) == (0, [], [])


async def test_dotdot_out_of_the_roots_is_outside_not_a_symlink(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    write_lora(tmp_path / "elsewhere")
    with pytest.raises(Forbidden) as caught:
        await registry.add_from_path("a", roots / ".." / "elsewhere", Descriptors())
    assert "is outside the import roots" in caught.value.message and "symlink" not in caught.value.message
    (roots / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(Forbidden, match="symlink that leaves"):
        await registry.add_from_path("a", roots / "link", Descriptors())
    write_lora(roots / "in")
    assert (await registry.add_from_path("a", roots / "x" / ".." / "in", Descriptors())).created


BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
               "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "head_dim": 64}


@pytest.mark.parametrize(("lora", "fragment"), [
    ({"hidden": 512}, "maps 512 -> 512 features, the base model's q_proj maps 128 -> 128"),
    ({"layers": 3}, "layer 2 does not exist (the base model has 2 layers)"),
    ({"config_overrides": {"modules_to_save": ["lm_head"]}}, "modules_to_save ['lm_head']"),
    ({"config_overrides": {"use_dora": True}}, "DoRA"),
    ({"config_overrides": {"init_lora_weights": "pissa"}}, "init_lora_weights='pissa'"),
    ({"config_overrides": {"bias": "all"}}, "bias='all'"),
])
async def test_what_the_workers_cannot_load_is_refused_at_registration(
        lora: dict[str, object], fragment: str, tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    """Each of these registered (201) and then failed every request (502 adapter_load_failed)."""
    from loragate.adapters.base_shapes import BaseModelShapes

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(BASE_CONFIG))
    registry = open_registry(base_shapes=BaseModelShapes.read(model))
    assert (await registry.add_from_path("fits", write_lora(roots / "fits"), Descriptors())).created
    with pytest.raises(LoragateError) as caught:
        await registry.add_from_path("bad", write_lora(roots / "bad", **lora), Descriptors())  # type: ignore[arg-type]
    assert caught.value.status == 422 and fragment in caught.value.message, caught.value.message
    assert stored_state(registry) == (1, [registry.get("fits").sha256], [])


async def test_a_missing_dir_is_422_saying_it_does_not_exist(
        tmp_path: Path, roots: Path, open_registry: OpenRegistry) -> None:
    registry = open_registry()
    with pytest.raises(LoragateError) as caught:
        await registry.add_from_path("a", roots / "nope", Descriptors())
    assert (caught.value.status, caught.value.code) == (422, "path_not_found")
    assert caught.value.message == f"{roots / 'nope'} does not exist"


async def test_a_registry_file_from_before_versioned_migrations_is_migrated(tmp_path: Path, roots: Path) -> None:
    """Version 1 rows carried the registering host's absolute path; version 2 derives it from the store."""
    limits = limits_for(roots)
    first = AdapterRegistry.open(tmp_path / "data", limits)
    record = (await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ("q",)))).record
    first.close()
    db = sqlite3.connect(tmp_path / "data" / "registry.sqlite3")  # rewrite it as the old release left it
    db.executescript(
        "DROP TABLE schema_versions; ALTER TABLE adapters RENAME TO new; "
        "CREATE TABLE adapters (name TEXT PRIMARY KEY, base_model TEXT NOT NULL, rank INTEGER NOT NULL, "
        "alpha REAL NOT NULL, target_modules TEXT NOT NULL, use_rslora INTEGER NOT NULL, "
        "modules_to_save TEXT NOT NULL, "
        "sha256 TEXT NOT NULL, path TEXT NOT NULL, size_bytes INTEGER NOT NULL, description TEXT NOT NULL, "
        "examples TEXT NOT NULL, created_at REAL NOT NULL); "
        "INSERT INTO adapters SELECT name, base_model, rank, alpha, target_modules, use_rslora, modules_to_save, "
        "sha256, '/elsewhere/on/another/host', size_bytes, description, examples, created_at FROM new; DROP TABLE new;")
    db.close()
    reopened = AdapterRegistry.open(tmp_path / "data", limits)
    assert reopened.get("a") == record  # the path comes from this host's store, not the old row
    assert schema_version(reopened.database, "registry") == 2
    columns = {row["name"] for row in reopened.database.query("PRAGMA table_info(adapters)")}
    assert "path" not in columns


async def test_registration_while_postgres_is_down_is_503_and_leaves_nothing(tmp_path: Path, roots: Path) -> None:
    """A server of its own (stopping the session's would fail other tests): down -> a 503 naming it, nothing
    stored; back -> the pool reconnects and the same registration succeeds."""
    with running_postgres() as server:
        registry = AdapterRegistry.open(tmp_path / "data", limits_for(roots),
                                        database=PostgresDatabase(server.url(), PostgresOptions(connect_timeout_s=2)))
        server.stop()
        with pytest.raises(StorageUnavailable) as caught:
            await registry.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))
        assert caught.value.status == 503 and f"127.0.0.1:{server.port}" in caught.value.message
        assert "password" not in caught.value.message
        assert [p.name for p in registry.store.root.iterdir() if p.name != "tmp"] == []
        assert list(registry.store.staging.iterdir()) == []
        server.start()
        assert (await registry.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))).created
        assert stored_state(registry)[0] == 1
        registry.close()


def test_a_replica_killed_between_upload_and_row_leaves_no_object_after_the_next_start(
        tmp_path: Path, roots: Path, postgres_url: str, s3_server: S3Server) -> None:
    """PostgreSQL + the object store: the files are in the bucket, the row never commits; the next start of any
    replica (another data dir, another host) collects the objects under the registry's exclusive lock."""
    write_lora(roots / "a")
    bucket = s3_server.new_bucket()
    store = (f"S3Store(Path({str(tmp_path / 'one' / 'adapters')!r}), s3_client({s3_server.endpoint!r}, {REGION!r}, "
             f"{KEY_ID!r}, {SECRET!r}), S3Location({bucket!r}, 'p'), cache_bytes=1 << 30, grace_s=0)")
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from loragate.adapters.objectstore import S3Location, S3Store, s3_client
        from loragate.adapters.registry import AdapterRegistry, RegistryLimits
        from loragate.adapters.types import Descriptors
        from loragate.database import PostgresDatabase
        reg = AdapterRegistry.open(Path({str(tmp_path / "one")!r}), RegistryLimits(
            base_models=frozenset({{"tiny-llama"}}), max_rank=16, max_bytes=1 << 30,
            import_roots=(Path({str(roots)!r}),)), database=PostgresDatabase({postgres_url!r}), store={store})
        reg._insert = lambda record: os._exit(9)   # die exactly between the upload and the row
        asyncio.run(reg.add_from_path("crashy", Path({str(roots / "a")!r}), Descriptors()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="p/adapters/").get("Contents", [])
    assert listed, "the crash should have left objects in the bucket"
    other = AdapterRegistry.open(
        tmp_path / "two", limits_for(roots, max_bytes=1 << 30), database=PostgresDatabase(postgres_url),
        store=S3Store(tmp_path / "two" / "adapters", s3_server.client(), S3Location(bucket, "p"),
                      cache_bytes=1 << 30, grace_s=0))
    assert stored_state(other)[0] == 0
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix="p/adapters/").get("Contents", []) == []
    other.close()


async def test_a_postgres_registry_at_version_1_is_migrated_and_notifies(
        tmp_path: Path, roots: Path, postgres_url: str) -> None:
    """Every earlier PostgreSQL version too: a database left at version 1 (no index, no trigger) gets version 2,
    whose trigger is what tells other replicas."""
    from loragate.adapters import registry as module

    migrate(PostgresDatabase(postgres_url), "registry", module.MIGRATIONS[:1])
    first = AdapterRegistry.open(tmp_path / "one", limits_for(roots), database=PostgresDatabase(postgres_url))
    assert schema_version(first.database, "registry") == 2
    second = AdapterRegistry.open(tmp_path / "two", limits_for(roots), database=PostgresDatabase(postgres_url))
    async with following(second):
        await first.add_from_path("a", write_lora(roots / "a"), Descriptors("d", ()))
        await until(lambda: "a" in second.snapshot())
