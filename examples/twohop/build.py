"""Build the two-hop kit: a tiny base model that can chain facts, two hop LoRAs, an oracle, and controls.

``python examples/twohop/build.py --help``. The full build (``--size full``, the shipped artifacts)
takes about 45 minutes on 2 CPU cores; ``--size small`` is the reduced build CI reproduces.

Steps, each with a progress bar:

1. pretrain a tiny Llama on the base worlds (facts in two surfaces, taught chains, copy drills);
2. train LoRA ``spouses`` on the evaluation world's hop-1 facts and ``birthplaces`` on its hop-2
   facts, each batch half new facts, half replay of the base's own data (without replay a LoRA
   this size overwrites the formats the chain needs);
3. train LoRA ``oracle`` on both hops of the evaluation world (plus replay, which holds the base
   worlds' two-hop chains) — the upper bound a reuse policy could reach. The oracle is trained
   further, in at most ``ORACLE_EXTRA_ROUNDS`` bounded rounds, while its control fails: it is the
   reference a policy is compared with, not a measured policy, so it only has to be a good one
   (the rounds taken are recorded in ``controls.json``; the hop LoRAs never get extra rounds);
4. evaluate everything greedily and check the controls (the base chains unseen chains, each hop
   LoRA keeps its facts and the base's formats, the oracle composes); write eval sets, a
   manifest of hashes and ``controls.json``. The build exits non-zero when a control fails.

Training is deterministic for a seed on one machine: fixed thread count, seeded data order, no
dropout. Another CPU model reduces floats in another order, so a rebuild there lands near, not on,
the recorded numbers (see ``tests/integration/test_twohop.py`` for how near). Weights are rounded
to float16 *before* evaluation, so the numbers describe exactly the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.tiny_model import save_word_tokenizer
from examples.twohop import world as w

BASE_NAME = "twohop-base"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_WORDS = ("user", "assistant", "system", ":")
SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
DEFAULT_OUT = Path(__file__).resolve().parent / "artifacts"
MAX_NEW_TOKENS = 14


@dataclass(frozen=True)
class TrainPlan:
    """Model shape and training schedule of one build size."""

    size: w.KitSize
    layers: int
    hidden: int
    ffn: int
    base_steps: int
    lora_steps: int
    batch: int = 128
    base_lr: float = 3e-3
    lora_lr: float = 2e-3
    rank: int = 8
    mixture: dict[str, float] = field(default_factory=lambda: {"facts": 0.45, "chains": 0.3, "drills": 0.25})


PLANS = {
    "full": TrainPlan(w.FULL, layers=2, hidden=256, ffn=512, base_steps=1500, lora_steps=250),
    "small": TrainPlan(w.SMALL, layers=2, hidden=128, ffn=256, base_steps=500, lora_steps=150),
}

# Thresholds of the controls: without them a policy's two-hop number would mean nothing.
CONTROLS = {
    "base_chains_unseen": 0.5,   # the base answers held-out chains of its own worlds, step by step
    "hop_own_facts": 0.9,        # each hop LoRA answers its own single-hop questions
    "hop_keeps_formats": 0.9,    # ... and still answers the base worlds' single-hop questions
    "oracle_twohop_steps": 0.8,  # the oracle composes the new world's chains, step by step
}
ORACLE_EXTRA_ROUNDS = 3  # further oracle training rounds (lora_steps each) while its control fails


def vocabulary(kit: w.Kit) -> list[str]:
    return list(dict.fromkeys([*SPECIAL, *CHAT_WORDS, *kit.vocabulary()]))


class Encoder:
    """Word ids for prompts and answers; the model is trained exactly as vLLM will prompt it."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.tokens = list(tokens)
        self.bos, self.eos, self.pad = self.ids["<s>"], self.ids["</s>"], self.ids["<pad>"]

    def words(self, text: str) -> list[int]:
        return [self.ids[t] for t in text.split()]

    def example(self, e: w.Example) -> tuple[list[int], list[int]]:
        prompt = [self.bos, *self.words(e.prompt)]
        answer = self.words(e.answer) + ([self.eos] if e.final else [])
        return prompt, answer

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos:
                break
            out.append(self.tokens[i])
        return " ".join(out)


def batches(sources: dict[str, Callable[[], w.Example]], weights: dict[str, float], size: int,
            rng: random.Random) -> Iterator[list[w.Example]]:
    names = list(weights)
    probs = [weights[n] for n in names]
    while True:
        yield [sources[rng.choices(names, probs)[0]]() for _ in range(size)]


def collate(encoder: Encoder, examples: Sequence[w.Example]) -> tuple[Any, Any, Any]:
    import torch

    pairs = [encoder.example(e) for e in examples]
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), encoder.pad)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        seq = prompt + answer
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, len(prompt):len(seq)] = torch.tensor(answer)
    return ids, mask, labels


def train(model: Any, encoder: Encoder, stream: Iterator[list[w.Example]], steps: int, lr: float, label: str) -> float:
    """AdamW with warmup and cosine decay, loss on answer words only; returns the last smoothed loss."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    smoothed = float("nan")
    bar = tqdm(range(steps), desc=label, unit="step", mininterval=2)
    for step in bar:
        ids, mask, labels = collate(encoder, next(stream))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        smoothed = loss.item() if step == 0 else 0.95 * smoothed + 0.05 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def generate(model: Any, encoder: Encoder, prompts: Sequence[str], batch: int = 256) -> list[str]:
    """Greedy completions (stopping at ``</s>``), left-padded batches."""
    import torch

    out: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            rows = [[encoder.bos, *encoder.words(p)] for p in prompts[start:start + batch]]
            width = max(map(len, rows))
            ids = torch.tensor([[encoder.pad] * (width - len(r)) + r for r in rows])
            mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
            new: list[list[int]] = [[] for _ in rows]
            for _ in range(MAX_NEW_TOKENS):
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                logits[:, [encoder.pad, encoder.bos, encoder.ids["<unk>"]]] = -1e9
                step = logits.argmax(-1)
                for row, token in enumerate(step.tolist()):
                    new[row].append(token)
                ids = torch.cat([ids, step[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(step)[:, None]], 1)
                if all(encoder.eos in r for r in new):
                    break
            out += [encoder.decode(r) for r in new]
    return out


def accuracy(model: Any, encoder: Encoder, examples: Sequence[w.Example]) -> float:
    """Share of examples whose greedy completion contains the expected word (the gateway's grading rule)."""
    if not examples:
        return float("nan")
    outputs = generate(model, encoder, [e.prompt for e in examples])
    return sum(e.expected in o.split() for e, o in zip(examples, outputs, strict=True)) / len(examples)


def question_only(examples: Sequence[w.Example]) -> list[w.Example]:
    return [e for e in examples if not e.kind.endswith("statement")]


def to_float16(model: Any) -> None:
    """Round weights to float16 in place (kept as float32 tensors), as the shipped files hold them."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def train_until_holds(measure: Callable[[], float], train_more: Callable[[int], None], threshold: float,
                      max_rounds: int) -> list[float]:
    """Measure; while below ``threshold`` and rounds remain, train one more round and measure again.

    Returns every measurement, first one included (``len - 1`` rounds were trained). A model that
    holds at once is not trained further, so a build whose oracle holds is unchanged by this loop.
    """
    history = [measure()]
    while history[-1] < threshold and len(history) <= max_rounds:
        train_more(len(history))
        history.append(measure())
    return history


def oracle_rounds(lora: Any, encoder: Encoder, stream: Iterator[list[w.Example]], plan: TrainPlan,
                  probes: dict[str, list[w.Example]]) -> list[dict[str, float]]:
    """Train the oracle further (``lora_steps`` a round, at most ``ORACLE_EXTRA_ROUNDS``) while its control fails.

    Each measurement also holds the two statements a chain recalls, asked alone, so a failing build
    shows whether the oracle lacks the facts or the composition. Returns one measurement per round,
    the first taken before any extra round.
    """
    log: list[dict[str, float]] = []

    def measure() -> float:
        rates = {k: accuracy(lora, encoder, v) for k, v in probes.items()}
        log.append({k: round(v, 4) for k, v in rates.items()})
        print("oracle:", json.dumps(log[-1]), flush=True)
        return rates["twohop_steps"]

    def train_more(round_: int) -> None:
        print(f"oracle control below {CONTROLS['oracle_twohop_steps']}: extra round {round_}", flush=True)
        train(lora, encoder, stream, plan.lora_steps, plan.lora_lr, f"LoRA oracle, extra round {round_}")
        to_float16(lora)

    train_until_holds(measure, train_more, CONTROLS["oracle_twohop_steps"], ORACLE_EXTRA_ROUNDS)
    return log


def base_eval_sets(kit: w.Kit, pools: dict[str, list[w.Example]]) -> dict[str, list[w.Example]]:
    """What the base model is measured on: its own facts and chains (taught, held out) and the evaluation world."""
    return {
        "own_facts": question_only(pools["facts"]),
        "own_chains_taught_steps": [e for e in pools["chains"] if e.kind == "twohop-steps"],
        "own_chains_unseen_steps": w.held_out_chains(kit, "steps"),
        "own_chains_unseen_direct": w.held_out_chains(kit, "direct"),
        **{f"eval_{k}": v for k, v in evaluation_sets(kit).items()},
    }


def lora_eval_sets(kit: w.Kit, pools: dict[str, list[w.Example]],
                   facts: Sequence[w.Example]) -> dict[str, list[w.Example]]:
    """What a LoRA is measured on: its own facts, the base's facts and held-out chains, the evaluation world."""
    return {
        "own_facts": question_only(facts),
        "base_facts": question_only(pools["facts"]),
        "base_chains_unseen_steps": w.held_out_chains(kit, "steps"),
        **{f"eval_{k}": v for k, v in evaluation_sets(kit).items()},
    }


def build(out: Path, plan_name: str, seed: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)  # reduction order depends on the thread count: fixed, so numbers reproduce
    torch.manual_seed(seed)
    started = time.monotonic()
    plan = PLANS[plan_name]
    kit = w.make_kit(plan.size, seed)
    tokens = vocabulary(kit)
    encoder = Encoder(tokens)
    rng = random.Random(seed + 1)
    pools = w.pretraining_pools(kit)
    all_names = kit.names
    cyclers = {k: w.cycle_forever(v, rng) for k, v in pools.items()}
    sources: dict[str, Callable[[], w.Example]] = {k: cyclers[k].__next__ for k in cyclers}
    known_cities = {p.name: p.city for world in kit.base for p in world.people}
    sources["drills"] = lambda: w.copy_drills(all_names, known_cities, rng, 1)[0]

    staging = out.with_name(f".{out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=plan.hidden, intermediate_size=plan.ffn,
        num_hidden_layers=plan.layers, num_attention_heads=plan.hidden // 64, num_key_value_heads=plan.hidden // 64,
        head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=encoder.bos, eos_token_id=encoder.eos, pad_token_id=encoder.pad,
    )
    base = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    base_loss = train(base, encoder, batches(sources, plan.mixture, plan.batch, rng), plan.base_steps,
                      plan.base_lr, "pretrain base")
    to_float16(base)
    base_dir = staging / "model"
    base.save_pretrained(str(base_dir), safe_serialization=True)
    _halve_safetensors(base_dir / "model.safetensors")
    save_word_tokenizer(base_dir, tokens)

    evaluation = kit.evaluation
    eval_sets = evaluation_sets(kit)
    sets = base_eval_sets(kit, pools)
    counts = {"base": {k: len(v) for k, v in sets.items()}}
    results: dict[str, dict[str, float]] = {"base": {k: accuracy(base, encoder, v) for k, v in sets.items()}}
    print("base:", json.dumps(results["base"]), flush=True)
    oracle_log: list[dict[str, float]] = []
    statements = {hop: [e for e in w.hop_examples(evaluation, hop) if e.kind.endswith("statement")]
                  for hop in ("hop1", "hop2")}
    oracle_probes = {"twohop_steps": eval_sets["twohop-steps"],
                     "hop1_statements": statements["hop1"], "hop2_statements": statements["hop2"]}

    hop1, hop2 = w.hop_examples(evaluation, "hop1"), w.hop_examples(evaluation, "hop2")
    lora_data = {"spouses": hop1, "birthplaces": hop2, "oracle": hop1 + hop2}
    for name, facts in lora_data.items():
        torch.manual_seed(seed + hash_name(name))
        lora = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32),
                              LoraConfig(r=plan.rank, lora_alpha=2 * plan.rank, target_modules=list(LORA_TARGETS),
                                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
        new = w.cycle_forever(facts, rng)
        mix_sources = {**sources, "new": new.__next__}
        mix = {"new": 0.5, **{k: 0.5 * v for k, v in plan.mixture.items()}}
        stream = batches(mix_sources, mix, plan.batch, rng)
        train(lora, encoder, stream, plan.lora_steps, plan.lora_lr, f"LoRA {name}")
        to_float16(lora)
        if name == "oracle":
            oracle_log = oracle_rounds(lora, encoder, stream, plan, oracle_probes)
        sets = lora_eval_sets(kit, pools, facts)
        counts[name] = {k: len(v) for k, v in sets.items()}
        results[name] = {k: accuracy(lora, encoder, v) for k, v in sets.items()}
        print(f"{name}:", json.dumps(results[name]), flush=True)
        lora_dir = staging / "adapters" / name
        lora.save_pretrained(str(lora_dir), safe_serialization=True)
        _halve_safetensors(lora_dir / "adapter_model.safetensors")
        adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = BASE_NAME
        (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

    write_eval_sets(staging / "eval", eval_sets)
    (staging / "descriptors.json").write_text(json.dumps(descriptors(kit), indent=2) + "\n")
    controls = check_controls(results)
    report = {"plan": plan_name, "seed": seed, "plan_detail": asdict(plan), "base_final_loss": round(base_loss, 4),
              "results": results, "counts": counts, "controls": controls,
              "oracle_rounds": {"extra": len(oracle_log) - 1, "measured": oracle_log},
              "minutes": round((time.monotonic() - started) / 60, 1)}
    (staging / "controls.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_manifest(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return report


def evaluation_sets(kit: w.Kit) -> dict[str, list[w.Example]]:
    """The held-out questions about the evaluation world, by query kind (what the demo sends)."""
    world = kit.evaluation
    return {
        "hop1": question_only(w.hop_examples(world, "hop1")),
        "hop2": question_only(w.hop_examples(world, "hop2")),
        "twohop-direct": w.twohop_examples(world, "direct"),
        "twohop-steps": w.twohop_examples(world, "steps"),
    }


def write_eval_sets(directory: Path, eval_sets: dict[str, list[w.Example]]) -> None:
    """One JSONL file per query kind, in the load generator's workload format (``loragate loadtest --workload``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, examples in eval_sets.items():
        lines = (json.dumps({"prompt": e.prompt, "expected": e.expected, "tags": [kind]}) for e in examples)
        (directory / f"{kind}.jsonl").write_text("".join(f"{line}\n" for line in lines))


def hash_name(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)


def _halve_safetensors(path: Path) -> None:
    """Store float32 tensors as float16 (the values were rounded already, so nothing changes)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def descriptors(kit: w.Kit) -> dict[str, dict[str, Any]]:
    """What the gateway's router embeds for each adapter: a description and example prompts."""
    sample = kit.evaluation.people[:3]
    return {
        "spouses": {"description": "Marriages: who is married to whom, spouses of people.",
                    "examples": [q.format(x=p.name) for q, p in zip(w.HOP1_QUESTIONS, sample, strict=True)]},
        "birthplaces": {"description": "Birthplaces: the city where each person was born.",
                        "examples": [q.format(x=p.name) for q, p in zip(w.HOP2_QUESTIONS, sample, strict=True)]},
        "oracle": {"description": "Marriages and birthplaces together, including where spouses were born.",
                   "examples": [q.format(x=p.name) for q, p in zip(w.TWOHOP_QUESTIONS, sample, strict=True)]},
    }


def check_controls(results: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    measured = {
        "base_chains_unseen": results["base"]["own_chains_unseen_steps"],
        "hop_own_facts": min(results["spouses"]["own_facts"], results["birthplaces"]["own_facts"]),
        "hop_keeps_formats": min(results["spouses"]["base_facts"], results["birthplaces"]["base_facts"]),
        "oracle_twohop_steps": results["oracle"]["eval_twohop-steps"],
    }
    return {k: {"measured": round(v, 4), "threshold": CONTROLS[k], "ok": v >= CONTROLS[k]} for k, v in measured.items()}


def write_manifest(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PLANS), default="full", help="build size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of worlds, data order and weights (default: 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the kit (default: %(default)s)")
    args = parser.parse_args(argv)
    report = build(args.out.absolute(), args.size, args.seed)
    print(json.dumps(report["controls"], indent=2))
    failed = [k for k, v in report["controls"].items() if not v["ok"]]
    verdict = f"controls FAILED: {failed}" if failed else "all controls hold"
    print(f"built {args.out} in {report['minutes']} min; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
