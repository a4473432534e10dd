"""Build a tiny, deterministic Llama model and PEFT LoRA adapters for it.

Why this exists: loragate's tests and examples run against the *real* vLLM engine
(the CPU build), but no model hub is reachable, so the model and adapters must be
made locally. Everything here is small enough to build in seconds and to serve
on two CPU cores, yet shaped like a real checkpoint (safetensors weights, a
``tokenizer.json``, a chat template, PEFT adapter files) so that vLLM treats it
exactly as it would a downloaded one.

Design choices, and why:

* Weights are random but seeded, so every build is byte-for-byte reproducible and
  greedy outputs are stable across runs and machines.
* The tokenizer is word-level over a fixed English vocabulary, so prompts written
  with those words tokenize one word per token and outputs decode to readable words.
* The output-layer rows of the special tokens are zeroed. Their logits are then
  exactly 0, while the best of the ~340 random word logits is in practice always
  above 0, so greedy decoding never emits ``</s>`` (or any special token) and never
  stops early: a request with ``max_tokens=N`` yields N real words. (Sampling at high temperature can still pick
  ``</s>`` occasionally; use ``ignore_eos`` if an exact length matters there.)
* LoRA adapters get random values in *both* ``lora_A`` and ``lora_B``. PEFT
  initialises ``lora_B`` to zero, which makes a fresh adapter a no-op; a test that
  checks "the adapter changed the output" needs a non-zero update.
* Builds are written to a temporary sibling directory and renamed into place, so
  an interrupted build never looks complete and concurrent builders (e.g. parallel
  test workers) do not see half-written files.

Run ``python examples/tiny_model.py OUT_DIR`` to build ``OUT_DIR/model`` plus the
adapters ``OUT_DIR/adapters/alpha`` and ``OUT_DIR/adapters/beta``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
"""Files whose presence marks a finished model build."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""Files whose presence marks a finished adapter build."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
"""Special tokens, in id order: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<pad>`` = 3."""

PUNCTUATION = (".", ",", "!", "?", ":", ";", "'", '"', "(", ")", "-")
"""Punctuation tokens; ``:`` is needed by the chat template."""

_WORD_TEXT = """
the a an and or but if then so because of to in on at by for with from up down out
over under about into after before again all any both each few more most other some
such no not only own same than too very can will just should now is are was were be
been being have has had do does did i you he she it we they me him her us them my your
his its our their this that these those what which who whom where when why how here
there yes hello hi thanks please sorry good bad new old big small long short high low
great little right left first last next early late young hot cold warm cool fast slow
happy sad easy hard open close red blue green yellow black white brown gray one two
three four five six seven eight nine ten hundred thousand time day night morning
evening week month year today tomorrow yesterday man woman child boy girl people
friend family mother father sister brother name home house room door window table
chair bed city town country world water food bread milk tea coffee apple fruit fish
meat rice cake dog cat bird horse cow tree flower grass sun moon star sky rain snow
wind fire earth sea river lake mountain road car bus train boat plane book paper pen
letter word story song music game ball school teacher student class lesson question
answer idea problem way thing place part end work job money shop market price go come
get make take give see look know think say tell ask find use want need like love help
try call run walk eat drink sleep read write speak listen play sing learn teach buy sell
pay move live stay start stop keep turn show hear feel leave bring put sit stand wait
user assistant system model
"""

WORDS = tuple(_WORD_TEXT.split())
"""A few hundred simple English words; ``user``/``assistant``/``system`` serve the chat template."""

DESCRIPTORS = {
    "alpha": ("Cooking: recipes, baking and kitchen techniques.",
              ["How long should I bake a loaf of bread?", "What can I cook with leftover rice?"]),
    "beta": ("Astronomy: planets, stars, galaxies and telescopes.",
             ["How far is Mars from the Sun?", "Why do stars twinkle at night?"]),
}
"""Routing descriptors of the two random test adapters (their outputs are meaningless; the descriptors are not)."""

DIGITS = tuple(str(d) for d in range(10))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
"""Renders ``role : content`` lines, then ``assistant :`` as the generation prompt.

vLLM refuses /v1/chat/completions for a tokenizer without a chat template, so the
tiny tokenizer needs one. Every piece it emits is in the vocabulary.
"""


def vocabulary() -> list[str]:
    """Return the token list in id order (special tokens first, no duplicates)."""
    tokens: list[str] = []
    for token in (*SPECIAL_TOKENS, *WORDS, *DIGITS, *PUNCTUATION):
        if token not in tokens:
            tokens.append(token)
    return tokens


def _is_complete(directory: Path, files: tuple[str, ...]) -> bool:
    return all((directory / name).is_file() for name in files)


def _build_atomically(out_dir: Path, files: tuple[str, ...], build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temporary sibling of ``out_dir``, then rename it into place.

    Returns at once when ``out_dir`` already holds ``files``. If another process
    finished the same build first, its result is kept and ours is discarded.
    """
    if _is_complete(out_dir, files):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(staging)
        _make_readable(staging)
        if out_dir.exists() and not _is_complete(out_dir, files):
            shutil.rmtree(out_dir)  # leftovers of an older, unfinished layout
        try:
            staging.rename(out_dir)
        except OSError:
            if not _is_complete(out_dir, files):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _make_readable(directory: Path) -> None:
    """Open up permissions (0755 dirs, 0644 files) of a finished build.

    ``mkdtemp`` creates 0700 directories and some writers create 0600 files; a
    vLLM worker running as another user (e.g. in a container) must still read them.
    """
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def save_word_tokenizer(out_dir: Path, tokens: list[str]) -> None:
    """Save a word-level fast tokenizer over ``tokens`` (specials first), BOS prepended, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # Prepend <s> like real Llama tokenizers do, so prompts look the usual way.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # transformers 5 records its own class name ("TokenizersBackend"), which older
    # transformers (e.g. in a GPU vLLM image) cannot resolve; this name works in both.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def build_tiny_model(out_dir: Path, *, name: str = "tiny-llama", seed: int = 0) -> Path:
    """Build the tiny Llama (weights + tokenizer) into ``out_dir`` and return it.

    The shape (hidden 128, 2 heads of 64, 2 layers) is about the smallest that
    vLLM's CPU attention accepts (it supports head sizes such as 64, not 32).
    ``initializer_range`` is raised from Llama's 0.02 so the attention path, where
    the LoRA adapters act, has real weight in the output. ``name`` only titles the
    model card; vLLM serves the model under ``--served-model-name``. Idempotent:
    an existing complete build is returned untouched.
    """

    def build(staging: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokens = vocabulary()
        config = LlamaConfig(
            vocab_size=len(tokens),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=512,
            initializer_range=0.1,
            tie_word_embeddings=False,
            bos_token_id=tokens.index("<s>"),
            eos_token_id=tokens.index("</s>"),
            pad_token_id=tokens.index("<pad>"),
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            # Zero logits for special tokens: greedy decoding then never picks them.
            for token in SPECIAL_TOKENS:
                model.lm_head.weight[tokens.index(token)].zero_()
        model.save_pretrained(str(staging), safe_serialization=True)
        save_word_tokenizer(staging, vocabulary())
        (staging / "README.md").write_text(
            f"# {name}\n\nRandom tiny Llama for tests, built by loragate's examples/tiny_model.py "
            f"(seed {seed}). Its outputs are meaningless words.\n"
        )

    return _build_atomically(out_dir, MODEL_FILES, build)


def build_tiny_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    base_model_name: str = "tiny-llama",
) -> Path:
    """Build a PEFT LoRA adapter for the model in ``base_dir`` into ``out_dir``.

    Both LoRA matrices get seeded random values, large enough that greedy output
    differs visibly from the base model's; different seeds give different adapters.
    ``base_model_name`` is written as ``base_model_name_or_path`` in
    ``adapter_config.json`` (the name the gateway serves the base under, not a
    local path). Idempotent: an existing complete build is returned untouched.
    """

    def build(staging: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(str(base_dir))  # saved as float32
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_A" in param_name or "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        # PEFT records the local base path. Record the served name instead, after
        # saving: with a hub-style name set, save_pretrained tries to look it up online.
        config_path = staging / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

    built = _build_atomically(out_dir, ADAPTER_FILES, build)
    recorded = json.loads((built / "adapter_config.json").read_text())["base_model_name_or_path"]
    if recorded != base_model_name:
        raise RuntimeError(f"{built} was built for base model {recorded!r}, not {base_model_name!r}")
    return built


def main(argv: list[str] | None = None) -> None:
    """Build the tiny model and two adapters (``alpha``, seed 1; ``beta``, seed 2)."""
    parser = argparse.ArgumentParser(description="Build a tiny random Llama and two LoRA adapters for vLLM tests.")
    parser.add_argument("out_dir", type=Path, help="directory to build into")
    parser.add_argument("--name", default="tiny-llama", help="base model name (default: %(default)s)")
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    model_dir = build_tiny_model(out_dir / "model", name=args.name)
    print(model_dir)
    for adapter, seed in (("alpha", 1), ("beta", 2)):
        print(build_tiny_lora(model_dir, out_dir / "adapters" / adapter, seed=seed, base_model_name=args.name))


if __name__ == "__main__":
    main()
