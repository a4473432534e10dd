"""Token ids of ASCII text for a BERT-style WordPiece tokenizer, one cached lookup per word.

The static embedder's whole cost is tokenising: a routed request embeds the prompt, its clauses, its
requests and its content words (about 18 short texts), and ``tokenizers``' ``encode_batch_fast`` spends
~10 us per text building ``Encoding`` objects, normalised-string alignments and offsets that a lookup-and-
sum never reads, on the event loop. For ASCII text a BERT tokenizer's pipeline is simple enough to do in one
regex (control characters dropped, lower case, split at whitespace and at each punctuation character, as
``BertNormalizer`` and ``BertPreTokenizer`` do), and each word's WordPiece ids are the tokenizer model's own,
asked once per distinct word and kept in a bounded cache: about 5x less CPU per request. Anything else (a
non-ASCII text; a tokenizer with another normaliser, pre-tokeniser or model) goes through the tokenizer, and
:func:`word_piece_ids` refuses a tokenizer on which the two paths disagree on :data:`PROBES`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])
"""ASCII control characters other than tab, newline and carriage return: ``BertNormalizer(clean_text=True)``
drops them (and turns those three into spaces, which the split below treats alike)."""

_PIECES = re.compile(r"[^\s!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")
"""A run of non-space, non-punctuation characters, or one ASCII punctuation character (``BertPreTokenizer``
isolates each)."""

PROBES = ("warm-up", "  Mixed CASE,  spaces\tand\ntabs\r ", "Who is the spouse of the mother of Alice?",
          "don't-stop: x+y=z <tag> [a] {b} ~c `d` |e| ^f$ #1 @me 100% a_b", "bell\x07 and \x0bvtab\x0c\x7f",
          "supercalifragilisticexpialidocious" * 4, "unknownwordzzq qqxj 3.5km", "the " * 600, "")
"""Texts the cached path must tokenise exactly as the tokenizer does before it is used: punctuation of every
kind, odd whitespace and control characters, an over-long word (WordPiece's ``[UNK]``), rare words, one past
the truncation length, and an empty text."""

_CACHE_LIMIT = 65_536

Ids = Callable[[Sequence[str]], list[list[int]]]


@dataclass(frozen=True, slots=True)
class WordPieceIds:
    """Texts to their token ids (no special tokens, truncated as the tokenizer truncates); ``cached`` says
    whether ASCII texts take the cached word path."""

    ids: Ids
    cached: bool

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        return self.ids(texts)


def word_piece_ids(tokenizer: Any) -> WordPieceIds:
    """The cached word path for ASCII texts when ``tokenizer`` is a BERT WordPiece one that agrees with it on
    :data:`PROBES`, otherwise ``tokenizer.encode_batch_fast``."""

    def slow(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    fast = _cached(tokenizer, slow)
    if fast is None:
        return WordPieceIds(slow, cached=False)
    if any(fast([p]) != slow([p]) for p in PROBES) or fast(PROBES) != slow(PROBES):
        log.info("the static model's tokenizer differs from the cached WordPiece path; using the tokenizer")
        return WordPieceIds(slow, cached=False)
    return WordPieceIds(fast, cached=True)


def _cached(tokenizer: Any, slow: Ids) -> Ids | None:
    """The cached path (``slow`` for non-ASCII texts), or None when ``tokenizer``'s pipeline is not the BERT one
    it reproduces."""
    config = json.loads(tokenizer.to_str())
    normalizer, pre, model = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}, config["model"]
    bert = (normalizer.get("type") == "BertNormalizer" and normalizer.get("clean_text") is True
            and normalizer.get("lowercase") is True and pre.get("type") == "BertPreTokenizer"
            and model.get("type") == "WordPiece")  # accents, Chinese characters: not in ASCII text
    truncation = tokenizer.truncation
    if not bert or (truncation is not None and truncation.get("direction", "right") != "right"):
        return None
    limit = None if truncation is None else int(truncation["max_length"])
    vocab: dict[str, int] = tokenizer.get_vocab()
    word_model = tokenizer.model
    cache: dict[str, list[int]] = {}

    def ids_of(text: str) -> list[int]:
        out: list[int] = []
        for word in _PIECES.findall(text.translate(_CONTROL).lower()):
            got = cache.get(word)
            if got is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()  # a bounded memory; the common words come straight back
                got = cache[word] = [vocab[token.value] for token in word_model.tokenize(word)]
            out.extend(got)
        return out if limit is None else out[:limit]

    def ids(texts: Sequence[str]) -> list[list[int]]:
        rest = [t for t in texts if not t.isascii()]
        others = iter(slow(rest) if rest else [])
        return [ids_of(t) if t.isascii() else next(others) for t in texts]

    return ids
