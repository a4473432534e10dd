"""Merging LoRA adapters in factor space (DESIGN.md, "Merge methods"): six methods, each with its algebra.

"Averaging adapters" means different things in different tools, and the difference decides what a
merged adapter computes, so each method here states its algebra. For adapter i with factors A_i
(r_i x k), B_i (d x r_i) and scaling s_i, the update is dW_i = s_i B_i A_i, and with weights w_i:

- ``linear``: A = sum(w_i sqrt(s_i) A_i), B = sum(w_i sqrt(s_i) B_i). The factors are averaged
  separately (LoRAX's ``linear``, the paper's "uniform" routing), so B A carries cross terms
  w_i w_j B_i A_j and is *not* sum(w_i dW_i). PEFT's ``linear`` scales by sqrt(w_i s_i) instead,
  which for two adapters at 0.5/0.5 gives twice this update.
- ``cat``: A = vstack(w_i s_i A_i), B = hstack(B_i): exactly sum(w_i dW_i) at rank sum(r_i); the same
  factors as PEFT's ``add_weighted_adapter(combination_type="cat")``.
- ``svd``: the best rank-r approximation of sum(w_i dW_i), computed from QR of the ``cat`` factors so
  that no d x k matrix is ever formed.
- ``ties``, ``dare_linear``, ``dare_ties``: task-vector merges (TIES, Yadav et al. 2023; DARE, Yu et al.
  2023) applied to the factors, A and B separately, as LoRAX does: the task tensors are T_i = sqrt(s_i) A_i
  (likewise B), and with density p,
  ``ties`` trims each T_i to its int(p * size) largest magnitudes, elects a sign per entry (``total``: the
  sign of sum_i T_i; ``frequency``: the sign of sum_i sign(T_i); 0 counts as +), keeps the entries whose
  sign agrees and takes their weighted mean, sum_i w_i m_i T_i / sum_i w_i m_i (0 where none agrees);
  ``dare_linear`` drops each entry with probability 1 - p, rescales the survivors by 1/p and sums,
  sum_i w_i M_i T_i / p; ``dare_ties`` is DARE's drop and rescale in place of the trim, then the sign
  election and mean of ``ties``. The masks M_i come from a generator seeded by (``seed``, module name,
  A or B), so a request gives the same merged adapter every time, on every replica.

Where these differ from PEFT's ``merge_utils`` (which LoRAX copies): the weights fold sqrt(s_i) into the
tensors as ``linear`` does (PEFT folds sqrt(w_i s_i), LoRAX uses w_i and the first adapter's scaling),
and the signs are elected on those T_i (PEFT and LoRAX elect on the raw factors, before any weight);
the disjoint mean divides by the agreeing entries' total weight, not their count (mergekit's
``normalize``): the paper's disjoint mean when the weights are equal, and PEFT's result when every weight
is 1 (LoRAX's default), whereas with routing's weights summing to 1 PEFT's mean is 1/n of the paper's at
full agreement, in each factor; DARE is seeded (PEFT and LoRAX call ``torch.bernoulli`` unseeded, so the
same request gives a different adapter each time, which a content-addressed cache cannot name).

Why on the factors and not on the dense update followed by a rank-r SVD (PEFT's ``ties_svd``, the
exact definition on dW_i): on the 7B-shaped case (docs/bench/merge.md) the dense route forms, trims and
truncates a d x k matrix per module, about half an hour of the gateway's CPU (2 cores; one layer timed,
times 32) against 1.5-4 s for the whole merge on the factors (two runs); its result is full rank, so truncating it to
the rank the workers serve keeps only about a quarter of its energy there, which makes it no more exact
where it matters; and the factor version is what LoRAX users get under these names.
The price is stated, not hidden: a sign election on factors compares entry j of rank component c across
adapters, which only means something when the components are aligned, and B A has the cross terms of
``linear``; so these methods need equal ranks (422 otherwise) and are not sum(w_i dW_i).

Every method takes its parameters (``target_rank``; ``density``, ``majority``, ``seed``) as one immutable
mapping, canonical with defaults filled in, and every entry enters the merge's content key.

Every method emits factors with scaling 1 (the merged config says ``lora_alpha = r``, no rsLoRA), so
the written adapter means exactly the product B A. Only numpy and safetensors are used: merges run in
the gateway process, which has no business importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, cast

import numpy as np
import safetensors
from numpy.typing import NDArray
from safetensors import safe_open

from loragate.adapters.peft_format import CONFIG_FILE, LORA_KEY, WEIGHTS_FILE, inspect_dir, read_config
from loragate.adapters.staging import new_dir
from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest, Unprocessable

Matrix = NDArray[np.float32]

#: Bumped whenever the bytes a merge produces for the same inputs would change, so old cache
#: entries stop matching instead of silently serving a different algorithm's output.
MERGE_FORMAT = 1
#: Provenance written next to the PEFT files; vLLM and PEFT ignore it, operators read it.
INFO_FILE = "loragate_merge.json"
#: Weights enter the content key (and the build) rounded to this many decimals, so float noise
#: from similarity scores cannot split one logical merge into many cache entries.
WEIGHT_DECIMALS = 6
#: The prefix PEFT's ``save_pretrained`` puts in front of module paths (and vLLM expects).
PEFT_PREFIX = "base_model.model."

# safetensors' stub leaves this untyped; it returns [(name, {"dtype", "shape", "data"})].
_deserialize = cast(Callable[[bytes], list[tuple[str, dict[str, Any]]]], safetensors.deserialize)


# --------------------------------------------------------------------------------------------------
# Weights


def _checked_weights(weights: Sequence[float], count: int) -> list[float]:
    """Weights a merge accepts: one per adapter, finite, non-negative, not all zero (else 422)."""
    if count == 0:
        raise Unprocessable("a merge needs at least one adapter, got an empty list", param="adapters",
                            code="merge_empty")
    if len(weights) != count:
        raise Unprocessable(f"got {len(weights)} weights for {count} adapters; give one weight per adapter",
                            param="weights", code="weights_mismatch")
    values = [float(w) for w in weights]
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise Unprocessable(f"merge weights must be finite and non-negative, got {values}", param="weights",
                            code="invalid_weights")
    if sum(values) <= 0:
        raise Unprocessable(f"merge weights must not all be zero, got {values}", param="weights",
                            code="invalid_weights")
    return values


# --------------------------------------------------------------------------------------------------
# Loading factors


@dataclass(frozen=True, slots=True, eq=False)
class ModuleFactors:
    """One module's LoRA factors: ``a`` is lora_A (r x k), ``b`` is lora_B (d x r)."""

    a: Matrix
    b: Matrix

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class LoraFactors:
    """An adapter's factors keyed by normalised module path, with what merging needs from its config."""

    label: str
    base_model: str
    rank: int
    scaling: float
    target_modules: tuple[str, ...]
    modules: Mapping[str, ModuleFactors]
    fan_in_fan_out: bool = False
    task_type: str | None = None


def normalise_module_key(module_path: str) -> str:
    """The module path without PEFT's wrapper prefix, so two adapters' keys for one module match.

    ``base_model.model.model.layers.0.self_attn.q_proj`` and ``model.layers.0.self_attn.q_proj`` name
    the same layer; the adapter-name segment (``lora_A.default.weight``) is dropped by the key regex.
    """
    return module_path.removeprefix(PEFT_PREFIX)


def _read_tensors(path: Path, label: str) -> dict[str, Matrix]:
    """All tensors of a safetensors file as float32.

    numpy has no bfloat16, and bf16 adapters are common, so BF16 tensors are widened by hand: a
    bfloat16 is the upper half of the float32 with the same value.
    """
    out: dict[str, Matrix] = {}
    widen: list[str] = []
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if handle.get_slice(key).get_dtype() == "BF16":
                    widen.append(key)
                else:
                    out[key] = np.asarray(handle.get_tensor(key), dtype=np.float32)
        if widen:
            raw = dict(_deserialize(path.read_bytes()))
            for key in widen:
                bits = np.frombuffer(bytes(raw[key]["data"]), dtype="<u2").astype(np.uint32) << 16
                out[key] = bits.view(np.float32).reshape(raw[key]["shape"])
    except (OSError, TypeError, ValueError, safetensors.SafetensorError) as exc:
        raise Unprocessable(f"adapter {label}: cannot read {path.name} ({exc})", code="invalid_weights") from exc
    return out


def _refuse_unmergeable(config: Mapping[str, Any], label: str) -> None:
    """Adapters whose effect is not a sum of B A products cannot be merged in factor space: say why."""
    if config.get("modules_to_save"):
        raise Unprocessable(f"adapter {label} has modules_to_save {config['modules_to_save']} (fully trained "
                            "modules), which cannot be merged", param="adapters", code="not_mergeable")
    if config.get("use_dora"):
        raise Unprocessable(f"adapter {label} is a DoRA adapter (use_dora), which cannot be merged in factor space",
                            param="adapters", code="not_mergeable")
    if config.get("trainable_token_indices"):
        raise Unprocessable(f"adapter {label} changes embeddings (trainable_token_indices), which cannot be merged",
                            param="adapters", code="not_mergeable")
    if config.get("bias", "none") not in ("none", None):
        raise Unprocessable(f"adapter {label} trains biases (bias={config['bias']!r}), which cannot be merged",
                            param="adapters", code="not_mergeable")


def load_factors(directory: Path, *, label: str | None = None) -> LoraFactors:
    """Read a (registered) PEFT LoRA dir into float32 factors, refusing what cannot be merged (422).

    The directory goes through the same validator as registration first, so a merge never trusts a
    file the registry would have refused. Every tensor must be a lora_A/lora_B factor: anything else
    (embedding LoRA, trainable tokens, saved full modules, DoRA magnitudes) changes the model in a
    way no factor merge can express, and is refused rather than dropped.
    """
    name = label or directory.name
    spec = inspect_dir(directory)
    config = read_config(directory)
    _refuse_unmergeable(config, name)
    pairs: dict[str, dict[str, Matrix]] = {}
    for key, tensor in _read_tensors(directory / WEIGHTS_FILE, name).items():
        match = LORA_KEY.match(key)
        if match is None:
            raise Unprocessable(f"adapter {name}: tensor {key} is not a lora_A/lora_B factor; adapters with "
                                "embedding changes, modules_to_save or other extra tensors cannot be merged",
                                param="adapters", code="not_mergeable")
        module = normalise_module_key(match["module"])
        if match["which"] in pairs.setdefault(module, {}):
            raise Unprocessable(f"adapter {name}: module {module} has two lora_{match['which']} tensors",
                                param="adapters", code="invalid_weights")
        pairs[module][match["which"]] = tensor
    return LoraFactors(
        label=name,
        base_model=spec.base_model,
        rank=spec.rank,
        scaling=spec.scaling,
        target_modules=spec.target_modules,
        modules=MappingProxyType({m: ModuleFactors(ab["A"], ab["B"]) for m, ab in sorted(pairs.items())}),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        task_type=config.get("task_type") if isinstance(config.get("task_type"), str) else None,
    )


# --------------------------------------------------------------------------------------------------
# Merge parameters

MergeParam = str | int | float
#: A method's parameters: immutable, canonical (defaults filled in, sorted), and all of it in the content key.
MergeParams = Mapping[str, MergeParam]
NO_PARAMS: MergeParams = MappingProxyType({})
MAJORITY_METHODS = ("total", "frequency")
DEFAULT_DENSITY = 0.5
#: Largest seed accepted: RFC 8941 integers have at most 15 digits, so every seed fits a header.
MAX_SEED = 999_999_999_999_999


def _param_error(method: str, key: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"merge method {method!r}: {message}", param=key, code="invalid_merge")


def _density(method: str, value: object) -> MergeParam:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _param_error(method, "density", f"density must be a number in (0, 1], got {value!r}")
    return float(value)


def _majority(method: str, value: object) -> MergeParam:
    if value not in MAJORITY_METHODS:
        raise _param_error(method, "majority", f"majority must be one of {', '.join(MAJORITY_METHODS)}, got {value!r}")
    return str(value)


def _seed(method: str, value: object) -> MergeParam:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise _param_error(method, "seed", f"seed must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value


def _target_rank(method: str, value: object) -> MergeParam:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _param_error(method, "target_rank", f"target_rank must be a positive integer, got {value!r}")
    return value


#: Every merge parameter and its validator (400 naming the parameter).
MERGE_PARAMS: Mapping[str, Callable[[str, object], MergeParam]] = MappingProxyType(
    {"density": _density, "majority": _majority, "seed": _seed, "target_rank": _target_rank})


# --------------------------------------------------------------------------------------------------
# Merge methods


class MergeMethod(ABC):
    """One way of combining per-module factors; every method emits factors with scaling 1.

    An instance carries its validated parameters (``params``, canonical: the defaults of ``takes``
    filled in), so the same request always names the same merge. ``output_rank`` is checked before
    any tensor is read (from registry records), so a request that cannot be served fails in
    microseconds with the reason; ``combine`` does the math per module. Parts for a module an adapter
    lacks are zero factors of that adapter's rank.
    """

    name: ClassVar[str]
    #: What the merged update equals; written into the merge's provenance (DESIGN: "say which one").
    meaning: ClassVar[str]
    #: The parameters the method takes and their defaults (None: no default, left out unless given).
    takes: ClassVar[Mapping[str, MergeParam | None]] = MappingProxyType({})

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.takes))
        if unknown:
            allowed = ", ".join(sorted(self.takes)) or "none"
            raise _param_error(self.name, unknown[0], f"does not take {', '.join(unknown)}; its parameters: {allowed}")
        canonical = {key: MERGE_PARAMS[key](self.name, given[key]) if key in given else default
                     for key, default in sorted(self.takes.items())}
        self.params: MergeParams = MappingProxyType({k: v for k, v in canonical.items() if v is not None})

    def output_rank(self, ranks: Sequence[int], labels: Sequence[str], *, max_rank: int) -> int:
        """The merged rank for inputs of these ranks; 422 when the workers could not load it."""
        rank = self._rank(ranks, labels)
        if rank > max_rank:
            raise Unprocessable(self._too_high(rank, ranks, max_rank), param="adapters", code="rank_too_high")
        return rank

    def keyed_params(self, rank: int) -> MergeParams:
        """The parameters as the content key names them, once the output rank is known."""
        return self.params

    @abstractmethod
    def _rank(self, ranks: Sequence[int], labels: Sequence[str]) -> int: ...

    def _too_high(self, rank: int, ranks: Sequence[int], max_rank: int) -> str:
        return f"{self.name} merge would have rank {rank}, above the workers' max LoRA rank {max_rank}"

    def _equal_ranks(self, ranks: Sequence[int], labels: Sequence[str]) -> int:
        """Methods that combine A and B entry by entry align rank component j of every adapter: 422 unless equal."""
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{label} r={r}" for label, r in zip(labels, ranks, strict=True))
            raise Unprocessable(f"{self.name} merge needs equal ranks (it combines A and B entry by entry, so rank "
                                f"component j of each adapter is matched with component j of the others), got "
                                f"{listed}; use cat or svd", param="adapters", code="rank_mismatch")
        return ranks[0]

    @abstractmethod
    def combine(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                rank: int, module: str = "") -> ModuleFactors:
        """Merged factors (rank ``rank``, scaling 1) of one module (``module`` seeds the random methods)."""

    def combine_into(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                     rank: int, out_a: Matrix, out_b: Matrix, module: str = "") -> None:
        """Write the merged factors into ``out_a`` (rank x k) and ``out_b`` (d x rank), float32.

        The writer streams every module through one scratch buffer into the output file; a method
        that can build its factors in place (``cat``) overrides this and skips an intermediate copy.
        """
        merged = self.combine(parts, scalings, weights, rank, module)
        out_a[...] = merged.a
        out_b[...] = merged.b


class LinearMerge(MergeMethod):
    """Average A and B separately after folding sqrt(s_i) into each (LoRAX ``linear``)."""

    name = "linear"
    meaning = ("A = sum(w_i sqrt(s_i) A_i), B = sum(w_i sqrt(s_i) B_i), scaling 1: factors averaged separately "
               "(LoRAX linear); B A has cross terms and is not sum(w_i dW_i); PEFT's linear (sqrt(w_i s_i)) "
               "differs")

    def _rank(self, ranks: Sequence[int], labels: Sequence[str]) -> int:
        return self._equal_ranks(ranks, labels)

    def combine(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                rank: int, module: str = "") -> ModuleFactors:
        a = np.zeros(parts[0].a.shape, dtype=np.float64)
        b = np.zeros(parts[0].b.shape, dtype=np.float64)
        for part, s, w in zip(parts, scalings, weights, strict=True):
            a += (w * math.sqrt(s)) * part.a
            b += (w * math.sqrt(s)) * part.b
        return ModuleFactors(a.astype(np.float32), b.astype(np.float32))


class CatMerge(MergeMethod):
    """Stack the factors: exact sum(w_i dW_i) at rank sum(r_i) (PEFT ``cat``)."""

    name = "cat"
    meaning = "A = vstack(w_i s_i A_i), B = hstack(B_i), scaling 1: exactly sum(w_i s_i B_i A_i) (PEFT cat)"

    def _rank(self, ranks: Sequence[int], labels: Sequence[str]) -> int:
        return sum(ranks)

    def _too_high(self, rank: int, ranks: Sequence[int], max_rank: int) -> str:
        return (f"cat merge rank is the sum of the ranks {' + '.join(map(str, ranks))} = {rank}, above the "
                f"workers' max LoRA rank {max_rank}; use svd or fewer adapters")

    def combine(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                rank: int, module: str = "") -> ModuleFactors:
        a = np.empty((rank, parts[0].a.shape[1]), np.float32)
        b = np.empty((parts[0].b.shape[0], rank), np.float32)
        self.combine_into(parts, scalings, weights, rank, a, b)
        return ModuleFactors(a, b)

    def combine_into(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                     rank: int, out_a: Matrix, out_b: Matrix, module: str = "") -> None:
        # The stacked factors are computed straight into the output: one pass over the inputs, no copies.
        row = 0
        for part, s, w in zip(parts, scalings, weights, strict=True):
            np.multiply(part.a, np.float32(w * s), out=out_a[row:row + part.rank], casting="same_kind")
            row += part.rank
        np.concatenate([part.b for part in parts], axis=1, out=out_b, casting="same_kind")


class SvdMerge(MergeMethod):
    """Best rank-r approximation of the exact sum, via QR of the stacked factors."""

    name = "svd"
    meaning = ("best rank-r approximation (Frobenius) of sum(w_i s_i B_i A_i), sqrt of singular values in both "
               "factors, scaling 1")

    takes = MappingProxyType({"target_rank": None})  # default: the largest input rank

    def _rank(self, ranks: Sequence[int], labels: Sequence[str]) -> int:
        # Components beyond sum(r_i) are zero: cap there so equivalent requests share one key.
        return min(int(self.params.get("target_rank") or max(ranks)), sum(ranks))

    def keyed_params(self, rank: int) -> MergeParams:
        return MappingProxyType({"target_rank": rank})  # the default and an explicit equal rank are one merge

    def _too_high(self, rank: int, ranks: Sequence[int], max_rank: int) -> str:
        return (f"svd merge rank {rank} is above the workers' max LoRA rank {max_rank}; ask for a smaller "
                "target rank")

    def combine(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                rank: int, module: str = "") -> ModuleFactors:
        # dW = B_cat A_cat = Q_B (R_B R_A^T) Q_A^T with orthonormal Q's, so dW's singular values and
        # vectors come from the small (<= R x R) core; truncating its SVD is Eckart-Young optimal.
        a_cat, b_cat = _stacked(parts, scalings, weights, np.float64)
        q_b, r_b = np.linalg.qr(b_cat)
        q_a, r_a = np.linalg.qr(a_cat.T)
        u, sigma, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
        keep = min(rank, sigma.shape[0])
        root = np.sqrt(sigma[:keep])
        b = np.zeros((b_cat.shape[0], rank))
        a = np.zeros((rank, a_cat.shape[1]))
        b[:, :keep] = (q_b @ u[:, :keep]) * root
        a[:keep] = root[:, None] * (vt[:keep] @ q_a.T)
        return ModuleFactors(a.astype(np.float32), b.astype(np.float32))


def _stacked(parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
             dtype: type[np.floating[Any]]) -> tuple[NDArray[Any], NDArray[Any]]:
    """The ``cat`` factors: A = vstack(w_i s_i A_i), B = hstack(B_i)."""
    # copy=False: inputs already in ``dtype`` are not copied before the one copy the stacking makes
    a = np.vstack([p.a.astype(dtype, copy=False) * (w * s) for p, s, w in zip(parts, scalings, weights, strict=True)])
    b = np.hstack([p.b.astype(dtype, copy=False) for p in parts])
    return a, b


def trim(stack: NDArray[np.float64], density: float) -> NDArray[np.float64]:
    """Each row of ``stack`` (one task tensor per adapter) with all but its int(density * size) largest
    magnitudes set to zero (TIES's trim; PEFT's ``magnitude_based_pruning``)."""
    out = np.zeros_like(stack)
    size = stack[0].size
    keep = int(density * size)
    for i, tensor in enumerate(stack):
        flat = tensor.reshape(-1)
        top = np.argpartition(np.abs(flat), size - keep)[size - keep:] if keep < size else slice(None)
        out[i].reshape(-1)[top] = flat[top]
    return out


def agreeing(stack: NDArray[np.float64], majority: str) -> NDArray[np.bool_]:
    """Which entries of each task tensor have the elected sign: that of sum_i T_i (``total``) or of
    sum_i sign(T_i) (``frequency``), 0 counting as +. A zero entry never agrees, so it is not averaged in."""
    signs = np.sign(stack)
    votes = stack.sum(axis=0) if majority == "total" else signs.sum(axis=0)
    elected: NDArray[np.bool_] = signs == np.where(votes >= 0, 1.0, -1.0)
    return elected


def disjoint_mean(stack: NDArray[np.float64], weights: NDArray[np.float64],
                  keep: NDArray[np.bool_]) -> NDArray[np.float64]:
    """sum_i w_i m_i T_i / sum_i w_i m_i per entry (0 where none is kept): the weighted mean of the kept entries."""
    kept = weights.reshape((-1,) + (1,) * (stack.ndim - 1)) * keep
    total = kept.sum(axis=0)
    mean: NDArray[np.float64] = np.divide((kept * stack).sum(axis=0), total, out=np.zeros(stack.shape[1:]),
                                          where=total > 0)
    return mean


def dare_drop(stack: NDArray[np.float64], density: float, seed: int, module: str, which: int) -> NDArray[np.float64]:
    """Each entry kept with probability ``density`` and rescaled by 1/density (DARE), from a generator seeded by
    (seed, module, which factor): the same request draws the same masks on every replica."""
    rng = np.random.default_rng([seed, zlib.crc32(module.encode()), which])
    kept = rng.random(stack.shape) < density
    return np.where(kept, stack / density, 0.0)


class TaskVectorMerge(MergeMethod):
    """A task-vector merge applied to A and B separately (LoRAX's way), on T_i = sqrt(s_i) A_i (likewise B).

    Subclasses say what happens to the stacked task tensors of one factor (``merge_tensors``).
    """

    def _rank(self, ranks: Sequence[int], labels: Sequence[str]) -> int:
        return self._equal_ranks(ranks, labels)

    @property
    def density(self) -> float:
        return float(self.params["density"])

    @abstractmethod
    def merge_tensors(self, stack: NDArray[np.float64], weights: NDArray[np.float64], module: str,
                      which: int) -> NDArray[np.float64]:
        """The merged tensor of one factor (``which``: 0 for A, 1 for B) from the n stacked task tensors."""

    def combine(self, parts: Sequence[ModuleFactors], scalings: Sequence[float], weights: Sequence[float],
                rank: int, module: str = "") -> ModuleFactors:
        w = np.asarray(weights, np.float64)
        roots = [math.sqrt(s) for s in scalings]
        a = np.stack([root * p.a.astype(np.float64) for p, root in zip(parts, roots, strict=True)])
        b = np.stack([root * p.b.astype(np.float64) for p, root in zip(parts, roots, strict=True)])
        return ModuleFactors(self.merge_tensors(a, w, module, 0).astype(np.float32),
                             self.merge_tensors(b, w, module, 1).astype(np.float32))


class TiesMerge(TaskVectorMerge):
    """TIES on each factor: trim to the top-density magnitudes, elect signs, weighted mean of the agreeing."""

    name = "ties"
    meaning = ("per factor, T_i = sqrt(s_i) A_i (likewise B): trim each T_i to its top-density magnitudes, elect a "
               "sign per entry (majority), A = sum(w_i m_i T_i) / sum(w_i m_i) over agreeing entries; scaling 1 "
               "(LoRAX ties on the factors; divides by the agreeing weight, not PEFT's count)")
    takes = MappingProxyType({"density": DEFAULT_DENSITY, "majority": "total"})

    def merge_tensors(self, stack: NDArray[np.float64], weights: NDArray[np.float64], module: str,
                      which: int) -> NDArray[np.float64]:
        trimmed = trim(stack, self.density)
        return disjoint_mean(trimmed, weights, agreeing(trimmed, str(self.params["majority"])))


class DareLinearMerge(TaskVectorMerge):
    """DARE on each factor: drop with probability 1 - density, rescale by 1/density, weighted sum."""

    name = "dare_linear"
    meaning = ("per factor, T_i = sqrt(s_i) A_i (likewise B): A = sum(w_i M_i T_i) / density with seeded Bernoulli("
               "density) masks M_i; scaling 1 (LoRAX/PEFT dare_linear on the factors, seeded)")
    takes = MappingProxyType({"density": DEFAULT_DENSITY, "seed": 0})

    def merge_tensors(self, stack: NDArray[np.float64], weights: NDArray[np.float64], module: str,
                      which: int) -> NDArray[np.float64]:
        dropped = dare_drop(stack, self.density, int(self.params["seed"]), module, which)
        summed: NDArray[np.float64] = np.einsum("i,i...->...", weights, dropped)
        return summed


class DareTiesMerge(TaskVectorMerge):
    """DARE's drop and rescale in place of TIES's trim, then TIES's sign election and mean."""

    name = "dare_ties"
    meaning = ("per factor, T_i = sqrt(s_i) A_i (likewise B): D_i = M_i T_i / density with seeded Bernoulli(density) "
               "masks, elect a sign per entry (majority), A = sum(w_i m_i D_i) / sum(w_i m_i) over agreeing entries; "
               "scaling 1 (LoRAX/PEFT dare_ties on the factors, seeded; divides by the agreeing weight)")
    takes = MappingProxyType({"density": DEFAULT_DENSITY, "majority": "total", "seed": 0})

    def merge_tensors(self, stack: NDArray[np.float64], weights: NDArray[np.float64], module: str,
                      which: int) -> NDArray[np.float64]:
        dropped = dare_drop(stack, self.density, int(self.params["seed"]), module, which)
        return disjoint_mean(dropped, weights, agreeing(dropped, str(self.params["majority"])))


MERGE_METHODS: Mapping[str, type[MergeMethod]] = MappingProxyType(
    {cls.name: cls for cls in (LinearMerge, CatMerge, SvdMerge, TiesMerge, DareLinearMerge, DareTiesMerge)})


def get_method(name: str, params: Mapping[str, object] | None = None) -> MergeMethod:
    """The merge method called ``name`` with ``params``; an unknown name is a 400 that lists the valid ones,
    and a parameter the method does not take, or out of range, a 400 that names it."""
    cls = MERGE_METHODS.get(name)
    if cls is None:
        raise InvalidRequest(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(MERGE_METHODS))}",
                             param="method", code="unknown_merge_method")
    return cls(params)


# --------------------------------------------------------------------------------------------------
# Merging loaded factors


@dataclass(frozen=True, slots=True, eq=False)
class MergedLora:
    """A merge result in memory: factors with scaling 1, ready to be written as a PEFT dir."""

    method: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    modules: Mapping[str, ModuleFactors]
    fan_in_fan_out: bool = False
    task_type: str | None = None


class CombinedModules(Mapping[str, ModuleFactors]):
    """A merge's modules, validated but combined only when used.

    Indexing combines one module in memory (tests, small merges); :func:`write_peft_dir` instead calls
    :meth:`combine_into` per module with views into one scratch buffer that goes straight to the file,
    so a large merge never holds all its merged factors, nor a stacked copy of them, in memory.
    """

    def __init__(self, merger: MergeMethod, parts: Mapping[str, Sequence[ModuleFactors]],
                 scalings: Sequence[float], weights: Sequence[float], rank: int) -> None:
        self._merger, self._parts = merger, parts
        self._scalings, self._weights, self._rank = tuple(scalings), tuple(weights), rank

    def __getitem__(self, module: str) -> ModuleFactors:
        return self._merger.combine(self._parts[module], self._scalings, self._weights, self._rank, module)

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def shapes(self, module: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(shape of A, shape of B) of the merged module."""
        first = self._parts[module][0]
        return (self._rank, int(first.a.shape[1])), (int(first.b.shape[0]), self._rank)

    def combine_into(self, module: str, out_a: Matrix, out_b: Matrix) -> None:
        self._merger.combine_into(self._parts[module], self._scalings, self._weights, self._rank, out_a, out_b,
                                  module)


def _common(values: Sequence[tuple[str, object]], what: str, code: str) -> None:
    if len({v for _, v in values}) > 1:
        listed = ", ".join(f"{label}: {v!r}" for label, v in values)
        raise Unprocessable(f"adapters of a merge must share {what}; got {listed}", param="adapters", code=code)


def _merged_targets(adapters: Sequence[LoraFactors], modules: Sequence[str]) -> tuple[str, ...]:
    """Union of target_modules; if any adapter used a regex, the module names actually present.

    PEFT reads a single string as a full-match regex and a list as name suffixes; a union of the two
    kinds means neither, so regex inputs fall back to the concrete names, which cover the same modules.
    """
    names = [t for a in adapters for t in a.target_modules]
    if all(t.isidentifier() for t in names):
        return tuple(sorted(set(names)))
    return tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))


def _zeros(rank: int, d: int, k: int) -> ModuleFactors:
    return ModuleFactors(np.zeros((rank, k), np.float32), np.zeros((d, rank), np.float32))


def merge_factors(adapters: Sequence[LoraFactors], weights: Sequence[float], method: str, *,
                  max_rank: int, params: Mapping[str, object] | None = None) -> MergedLora:
    """Merge loaded adapters; every refusal is a 422 that names the adapters and the problem.

    Target modules are the union: where an adapter lacks a module its part is zero factors of its own
    rank (a zero block for ``cat``, zeros of matching shape for ``linear``), so it contributes nothing.
    """
    merger = get_method(method, params)
    values = _checked_weights(weights, len(adapters))
    labels = [a.label for a in adapters]
    _common([(a.label, a.base_model) for a in adapters], "one base model", "base_model_mismatch")
    _common([(a.label, a.fan_in_fan_out) for a in adapters], "fan_in_fan_out", "not_mergeable")
    rank = merger.output_rank([a.rank for a in adapters], labels, max_rank=max_rank)
    scalings = [a.scaling for a in adapters]
    parts_by_module: dict[str, list[ModuleFactors]] = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        present = [(a.label, a.modules[module]) for a in adapters if module in a.modules]
        shapes = {(int(f.b.shape[0]), int(f.a.shape[1])) for _, f in present}
        if len(shapes) > 1:
            listed = ", ".join(f"{label}: {f.b.shape[0]}x{f.a.shape[1]}" for label, f in present)
            raise Unprocessable(f"module {module} has different shapes (out x in) across adapters ({listed}); "
                                "were they trained on different base models?", param="adapters",
                                code="shape_mismatch")
        ((d, k),) = shapes
        parts_by_module[module] = [a.modules[module] if module in a.modules else _zeros(a.rank, d, k)
                                   for a in adapters]
    return MergedLora(method=merger.name, base_model=adapters[0].base_model, rank=rank,
                      target_modules=_merged_targets(adapters, list(parts_by_module)),
                      modules=CombinedModules(merger, parts_by_module, scalings, values, rank),
                      fan_in_fan_out=adapters[0].fan_in_fan_out,
                      task_type=next((a.task_type for a in adapters if a.task_type), None))


# --------------------------------------------------------------------------------------------------
# Writing a PEFT dir


def peft_config(merged: MergedLora) -> dict[str, Any]:
    """adapter_config.json for a merge: scaling 1 (lora_alpha = r, no rsLoRA), union of targets."""
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": merged.rank, "lora_alpha": merged.rank, "use_rslora": False,
        "target_modules": list(merged.target_modules), "base_model_name_or_path": merged.base_model,
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": merged.fan_in_fan_out,
        "modules_to_save": None, "inference_mode": True,
    }
    if merged.task_type:
        config["task_type"] = merged.task_type
    return config


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _module_shapes(modules: Mapping[str, ModuleFactors], module: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(modules, CombinedModules):
        return modules.shapes(module)
    factors = modules[module]
    return (int(factors.a.shape[0]), int(factors.a.shape[1])), (int(factors.b.shape[0]), int(factors.b.shape[1]))


def _fill(modules: Mapping[str, ModuleFactors], module: str, out_a: Matrix, out_b: Matrix) -> None:
    if isinstance(modules, CombinedModules):
        modules.combine_into(module, out_a, out_b)
    else:
        out_a[...] = modules[module].a
        out_b[...] = modules[module].b


def write_safetensors(path: Path, modules: Mapping[str, ModuleFactors]) -> None:
    """Write the factors as a PEFT safetensors file, module by module through one scratch buffer.

    The format is an 8-byte header length, a JSON header of names, dtypes, shapes and byte offsets,
    then the raw tensors; since every shape is known up front, the header is written first and each
    module's A and B are combined into the scratch buffer and written at once. (``save_file`` would
    need every merged tensor in memory and then copy each one into one bytes object.)
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    layout = []
    offset = biggest = 0
    for module in sorted(modules):
        shape_a, shape_b = _module_shapes(modules, module)
        size_a, size_b = shape_a[0] * shape_a[1], shape_b[0] * shape_b[1]
        for name, shape, size in (("lora_A", shape_a, size_a), ("lora_B", shape_b, size_b)):
            header[f"{PEFT_PREFIX}{module}.{name}.weight"] = {
                "dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + 4 * size]}
            offset += 4 * size
        layout.append((module, shape_a, shape_b, size_a, size_b))
        biggest = max(biggest, size_a + size_b)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    scratch = np.empty(biggest, np.float32)
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for module, shape_a, shape_b, size_a, size_b in layout:
            _fill(modules, module, scratch[:size_a].reshape(shape_a), scratch[size_a:size_a + size_b].reshape(shape_b))
            out.write(scratch[:size_a + size_b].data)


def safetensors_intact(path: Path) -> bool:
    """True when the file's size is what its header declares (a torn, unsynced write is not)."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return bool(path.stat().st_size == 8 + length + end)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def write_peft_dir(merged: MergedLora, target: Path, *, staging_root: Path | None = None,
                   info: Mapping[str, Any] | None = None, durable: bool = True) -> tuple[Path, bool]:
    """Write ``merged`` as a PEFT LoRA dir at ``target`` atomically; returns (target, newly_written).

    Files go to a private staging dir on the same filesystem and the dir is renamed into place: a
    reader (vLLM's ``/v1/load_lora_adapter``, a second gateway process) sees either nothing or a
    complete adapter. If another writer got there first, its identical content is kept.
    ``durable=False`` skips the fsyncs (a third of a large merge's time): for a cache whose entries
    can be rebuilt and are checked with :func:`safetensors_intact` when a process starts.
    """
    if staging_root is not None:  # owned by this process: a restart collects it at once if we die (staging.py)
        staging_root.mkdir(parents=True, exist_ok=True)
        staged = new_dir(staging_root)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:16]}-"))
    try:
        write_safetensors(staged / WEIGHTS_FILE, merged.modules)
        (staged / CONFIG_FILE).write_text(json.dumps(peft_config(merged), indent=2), encoding="utf-8")
        if info is not None:
            (staged / INFO_FILE).write_text(json.dumps(dict(info), indent=2), encoding="utf-8")
        if durable:
            for file in staged.iterdir():
                _fsync(file)
        try:
            staged.rename(target)
        except OSError:
            if not (target / WEIGHTS_FILE).is_file():
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return target, False
        return target, True
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# Content addressing


def merge_key(inputs: Sequence[tuple[str, float]], method: str, params: MergeParams = NO_PARAMS) -> str:
    """sha256 naming a merge: format version, method, every parameter and the (adapter sha256, weight) list.

    Callers pass :func:`plan_merge`'s canonical order (sorted by adapter hash), so the same set of
    adapters and weights maps to one key whatever order routing listed them in; weights enter rounded
    to ``WEIGHT_DECIMALS`` and the build uses exactly those rounded values.
    """
    payload = {
        "format": MERGE_FORMAT, "method": method, "params": dict(params),
        "inputs": [[sha, f"{weight:.{WEIGHT_DECIMALS}f}"] for sha, weight in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MergePlan:
    """A validated merge request, before any tensor is read: what to build and under which key.

    ``inputs`` is canonical: sorted by adapter sha256, the same content listed twice summed into one
    weight, zero weights dropped. ``linear``, ``cat`` and ``svd`` give the same update (up to the order
    of cat's blocks) under these rewrites, so they only increase sharing; for the task-vector methods
    the canonical form is the definition: an adapter votes once in the sign election, with its summed
    weight, and one of weight zero takes no part. The build follows this order, so the key describes
    exactly the bytes on disk.
    """

    key: str
    method: str
    rank: int
    base_model: str
    inputs: tuple[tuple[AdapterRecord, float], ...]
    params: MergeParams = field(default_factory=lambda: NO_PARAMS)  # canonical, as keyed (svd: its output rank)

    @property
    def name(self) -> str:
        """The adapter name workers serve it under (fits the registry's name pattern)."""
        return f"merge-{self.key[:16]}"

    def info(self) -> dict[str, Any]:
        """Provenance for the merge dir: which adapters, weights and algebra produced it."""
        method = MERGE_METHODS[self.method]
        return {"format": MERGE_FORMAT, "key": self.key, "name": self.name, "method": self.method,
                "meaning": method.meaning, "rank": self.rank, "params": dict(self.params),
                "base_model": self.base_model,
                "inputs": [{"name": r.name, "sha256": r.sha256, "weight": w} for r, w in self.inputs]}


def plan_merge(records: Sequence[AdapterRecord], weights: Sequence[float], method: str, *,
               max_rank: int, params: Mapping[str, object] | None = None) -> MergePlan:
    """Validate a merge from registry records alone (no I/O) and compute its content key.

    Everything knowable from the registry is refused here with a 4xx: unknown method (400), empty
    list, weight count or values, different base models, modules_to_save, ranks (422); unknown or
    out-of-range parameters (400).
    """
    merger = get_method(method, params)
    values = _checked_weights(weights, len(records))
    _common([(r.name, r.base_model) for r in records], "one base model", "base_model_mismatch")
    for record in records:
        if record.modules_to_save:
            raise Unprocessable(f"adapter {record.name} has modules_to_save {list(record.modules_to_save)} (fully "
                                "trained modules), which cannot be merged", param="adapters", code="not_mergeable")
    merged: dict[str, tuple[AdapterRecord, float]] = {}
    for record, weight in zip(records, values, strict=True):
        rounded = round(weight, WEIGHT_DECIMALS)
        previous = merged.get(record.sha256)
        merged[record.sha256] = (previous[0], previous[1] + rounded) if previous else (record, rounded)
    inputs = tuple((r, round(w, WEIGHT_DECIMALS)) for _, (r, w) in sorted(merged.items()) if w > 0)
    if not inputs:
        raise Unprocessable(f"merge weights round to zero: {values}", param="weights", code="invalid_weights")
    rank = merger.output_rank([r.rank for r, _ in inputs], [r.name for r, _ in inputs], max_rank=max_rank)
    keyed = merger.keyed_params(rank)
    key = merge_key([(r.sha256, w) for r, w in inputs], merger.name, keyed)
    return MergePlan(key=key, method=merger.name, rank=rank, base_model=inputs[0][0].base_model, inputs=inputs,
                     params=keyed)


def build_merge(plan: MergePlan, target: Path, *, staging_root: Path | None = None,
                durable: bool = True) -> tuple[Path, bool]:
    """Load the plan's adapters, merge and write them atomically at ``target`` (blocking: run in a thread)."""
    factors = [load_factors(record.path, label=record.name) for record, _ in plan.inputs]
    merged = merge_factors(factors, [w for _, w in plan.inputs], plan.method, max_rank=plan.rank,
                           params=plan.params)
    return write_peft_dir(merged, target, staging_root=staging_root, info=plan.info(), durable=durable)
