"""The cached WordPiece path gives the tokenizer's own ids, and steps aside wherever it could not."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from loragate.router import wordpiece
from loragate.router.compositional import learned_probe
from loragate.router.embedder import STATIC_256_MODEL_DIR, STATIC_MODEL_DIR
from loragate.router.wordpiece import PROBES, word_piece_ids

DATA = Path(__file__).resolve().parents[2] / "data"


def tokenizer_of(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    return tokenizer


def theirs(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


@pytest.mark.parametrize("model_dir", [STATIC_MODEL_DIR, STATIC_256_MODEL_DIR], ids=["static", "static-256"])
def test_every_text_the_router_embeds_gets_the_tokenizers_ids(model_dir: Path) -> None:
    """Every labelled prompt of the three sets and every text the learned detector embeds beside it, in one
    batch and one at a time (the cache fills on the first and serves the second), plus non-ASCII texts."""
    tokenizer = tokenizer_of(model_dir)
    ours = word_piece_ids(tokenizer)
    assert ours.cached  # the shipped tables take the cached path
    texts = []
    for split in ("routing", "routing_heldout", "routing_fresh"):
        for line in (DATA / split / "prompts.jsonl").read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            texts += [prompt, *learned_probe(prompt).texts]
    texts += ["Émile's naïve café", "Ω ≈ 3", "\u2603 snow", "中文 text", *PROBES]
    assert sum(not t.isascii() for t in texts) >= 4
    assert ours(texts) == theirs(tokenizer, texts)
    assert [ours([t])[0] for t in texts[:200]] == theirs(tokenizer, texts[:200])


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wordpiece, "_CACHE_LIMIT", 3)
    tokenizer = tokenizer_of(STATIC_MODEL_DIR)
    ours = word_piece_ids(tokenizer)
    texts = [f"word{i} and more words here" for i in range(20)]
    assert ours(texts) == theirs(tokenizer, texts)


def toy(normalizer: Any, vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def test_another_pipeline_or_a_disagreement_falls_back_to_the_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = {"[UNK]": 0, "who": 1, "is": 2, "?": 3, "Who": 4}
    cased = toy(normalizers.BertNormalizer(lowercase=False), vocab)  # not the pipeline the cache reproduces
    assert not word_piece_ids(cased).cached and word_piece_ids(cased)(["Who is?"]) == [[4, 2, 3]]
    plain = toy(normalizers.BertNormalizer(lowercase=True), vocab)
    assert word_piece_ids(plain).cached and word_piece_ids(plain)(["Who is?"]) == [[1, 2, 3]]
    monkeypatch.setattr(wordpiece, "_PIECES", re.compile(r"\S+"))  # "is?" one piece: the probes disagree
    assert not word_piece_ids(plain).cached and word_piece_ids(plain)(["Who is?"]) == [[1, 2, 3]]
    monkeypatch.undo()
    plain.pre_tokenizer = pre_tokenizers.Whitespace()  # another pre-tokenizer: refused by its configuration
    assert not word_piece_ids(plain).cached
