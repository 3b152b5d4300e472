"""`graftlm combine`: several LoRA adapter folders into one, as PEFT's `add_weighted_adapter`.

Works on the folders' tensors alone (no base model is loaded)::

    linear, ties, dare_*, magnitude_prune   A' = merge_i(sign_i·sqrt|w_i·s_i|·A_i)
                                            B' = merge_i(sqrt|w_i·s_i|·B_i)          rank r
    cat                                     A' = [w_1·s_1·A_1; w_2·s_2·A_2; ...]
                                            B' = [B_1, B_2, ...]                      rank Σ r_i
    svd and *_svd                           ΔW = merge_i(w_i · s_i·B_i A_i)
                                            B', A' = the top-R singular pairs of ΔW   rank R

where s_i = alpha_i / r_i is adapter i's scale and merge is the rule named (`merge_utils`). The
folder written is PEFT's: the first adapter's `adapter_config.json` with `r = lora_alpha` = the
new rank (so its scale is 1, the weights and scales being inside A' and B'), the union of the
target modules, and the tensors in float32, PEFT's numbers bit for bit on the same machine.

DARE's masks are random: PEFT draws them from the global torch generator after the new
adapter's initialisation has drawn its own numbers, module by module in the base model's order.
`combine_adapters` replays those draws, so `torch.manual_seed(S)` before PEFT's call and
`seed=S` here give the same masks, given the base's module order (`base=`; else the folders'
`base_model_name_or_path` when it names a local model; else a name order, with a warning).

Where the masks cannot be PEFT's: PEFT run on a GPU draws them from the CUDA generator (graftlm
draws on the CPU, as PEFT on the CPU does); an `init_lora_weights` that reads the base (PiSSA,
OLoRA, LoftQ, ...) draws numbers graftlm does not replay (a warning says so); and a
fan_in_fan_out config (GPT-2) that also targets a plain `nn.Linear` (its lm_head) has PEFT
draw that one module's *_svd masks over (out, in) where graftlm uses (in, out). PEFT's
`svd_driver` (cuSOLVER only) has no counterpart: the SVD runs on the CPU.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graftlm.adapters.combine_order import module_order, replay_init_draws, seeded
from graftlm.adapters.combine_rules import HOWS
from graftlm.adapters.folder import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    group_keys,
    read_config,
    read_graft,
    read_weights,
    write_folder,
    write_graft,
)
from graftlm.adapters.merge_utils import MAJORITY_SIGN_METHODS, low_rank_factors, merge_tensors
from graftlm.errors import GraftError
from graftlm.methods.lora.config import LoraConfig

log = logging.getLogger(__name__)

DENSITY_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Rules that prune (alone or before an svd): they need a density."""

SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Rules that merge A and B entry by entry: every adapter needs the same rank."""

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMB_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")
# config fields that decide which modules a PEFT config selects besides target_modules: the
# combined config keeps the first adapter's, so the others must agree with it
_SELECTION_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class _Source:
    """One input folder, read and checked."""

    name: str
    folder: Path
    config: dict
    lora: LoraConfig
    graft: dict
    # module -> (A (r, in), B (out, r), is_embedding), float32
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict)
    # PEFT's copies of the base's embedding tables, {key: tensor}
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """PEFT's `scaling[adapter]` on `module`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        rank, alpha = self.lora.rank_for(module), self.lora.alpha_for(module)
        return alpha / math.sqrt(rank) if self.lora.use_rslora else alpha / rank

    def max_rank(self) -> int:
        # PEFT's rank for allocating the new adapter: r, or the largest of its rank_pattern
        return max([self.lora.rank, *self.lora.rank_pattern.values()])


def combine_adapters(
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    weights: Sequence[float],
    out: str | os.PathLike,
    *,
    how: str,
    density: float | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    majority_sign: str = "total",
    seed: int | None = None,
    base: str | os.PathLike | nn.Module | None = None,
) -> Path:
    """Combine LoRA adapter folders into one, with the numbers of PEFT 0.21's
    `add_weighted_adapter(adapters, weights, name, combination_type=how, ...)`.

    Args:
        adapters: the folders, as {name: folder} or a list (names are for messages only).
        weights: one weight per adapter; negative weights subtract.
        out: the folder to write (adapter_config.json, adapter_model.safetensors,
            graftlm.json; each atomically).
        how: one of `HOWS`; with a single adapter PEFT uses "linear" whatever is asked.
        density: the fraction of entries kept, in (0, 1]; required by ties, dare_* and
            magnitude_prune (and their _svd forms), refused by the others.
        svd_rank: the rank of an svd result (default: the largest input rank).
        svd_clamp: clamp an svd result's factors at this quantile of their entries, in (0, 1].
        svd_full_matrices: PEFT's `svd_full_matrices` (the full or the reduced SVD).
        majority_sign: TIES' sign election, "total" or "frequency".
        seed: seed the global generator with it first (`torch.manual_seed`), for DARE's masks;
            the caller's generator state is restored after. None: draw from the current state.
        base: the base model (a loaded model, a Hugging Face folder, a .gguf file or the
            built-in name), only to know its module order for DARE's masks; no weight is read.

    Returns:
        The folder written.

    Raises:
        GraftError: an unknown `how`; weights that do not match the adapters; a density, rank
            or clamp out of range; a folder that is not a plain LoRA adapter (DoRA, another
            peft_type, biases or modules_to_save); adapters of different bases or layer sizes;
            ranks that differ where `how` merges entry by entry; target_modules of mixed kinds.
    """
    named = _named_folders(adapters)
    weights = _check_arguments(named, weights, how, density, svd_rank, svd_clamp, majority_sign)
    sources = [_read_source(name, folder) for name, folder in named.items()]
    if len(sources) == 1:
        how = "linear"  # PEFT's rule: nothing to cat, elect or prune against
    fingerprint = _check_same_base(sources)
    new_rank = _new_rank(sources, how, svd_rank)
    config = _combined_config(sources, new_rank)
    modules = set().union(*(s.pairs for s in sources))
    dare = how.startswith("dare")
    order = module_order(
        modules, base if base is not None or not dare else _named_base(sources), dare
    )
    _check_svd_rank(sources, how, new_rank)

    with seeded(seed):
        if dare:
            layers = [next(s.pairs[m] for s in sources if m in s.pairs) for m in order]
            init = sources[0].config.get("init_lora_weights", True)
            replay_init_draws(
                [(a.shape[1], b.shape[0], emb) for a, b, emb in layers], new_rank, init
            )
        tensors = {}
        for module in order:
            present = [(s, w) for s, w in zip(sources, weights) if module in s.pairs]
            a, b = _combine_module(
                module, present, how, new_rank, density, majority_sign, svd_clamp, svd_full_matrices
            )
            kind = "lora_embedding_" if present[0][0].pairs[module][2] else "lora_"
            suffix = "" if kind == "lora_embedding_" else ".weight"
            tensors[f"{PREFIX}{module}.{kind}A{suffix}"] = a
            tensors[f"{PREFIX}{module}.{kind}B{suffix}"] = b

    for source in reversed(sources):  # the first adapter's copy wins, as in PEFT's model
        tensors.update(source.base_copies)
    out = Path(out)
    write_folder(out, config, tensors)
    quantize = {s.graft.get("quantize") for s in sources}
    if len(quantize) > 1:
        log.warning(
            "warning: the adapters were trained on bases of other precisions (quantize: %s); "
            "the combined adapter names none",
            ", ".join(f"{s.name}: {s.graft.get('quantize')}" for s in sources),
        )
    # a combination of QLoRA adapters keeps their 4-bit base (graftlm.json's "quantize")
    facts = {"quantize": quantize.pop() if len(quantize) == 1 else None}
    combined = {
        "how": how,
        "adapters": {s.name: str(s.folder) for s in sources},
        "weights": list(weights),
        "density": density,
        "svd_rank": svd_rank,
        "svd_clamp": svd_clamp,
        "seed": seed,
    }
    write_graft(out, "lora", fingerprint, tensors, facts=facts, extra={"combined": combined})
    return out


# -- arguments and folders --------------------------------------------------------------------


def _named_folders(adapters) -> dict[str, Path]:
    if isinstance(adapters, Mapping):
        named = {str(k): Path(v) for k, v in adapters.items()}
    elif isinstance(adapters, (str, os.PathLike)):
        raise GraftError("adapters should be a list or a {name: folder} mapping of folders")
    else:
        named = {}
        for folder in adapters:
            name = Path(folder).name or str(folder)
            named[name if name not in named else f"{name}#{len(named)}"] = Path(folder)
    if not named:
        raise GraftError("combine needs at least one adapter folder")
    return named


def _check_arguments(named, weights, how, density, svd_rank, svd_clamp, majority_sign):
    if how not in HOWS:
        raise GraftError(f"how should be one of {', '.join(HOWS)}; got {how!r}")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise GraftError(f"weights should be numbers, got {weights!r}") from None
    if len(weights) != len(named):
        raise GraftError(
            f"{len(weights)} weight(s) {weights} for {len(named)} adapter(s) "
            f"({', '.join(named)}): give one weight per adapter"
        )
    if not all(math.isfinite(w) for w in weights):
        raise GraftError(f"weights should be finite numbers, got {weights}")
    needs_density = how.removesuffix("_svd") in DENSITY_RULES
    if needs_density and density is None:
        raise GraftError(f"how={how!r} needs a density (the fraction of entries kept, in (0, 1])")
    if not needs_density and density is not None:
        raise GraftError(
            f"density is for ties, dare_* and magnitude_prune (and their _svd forms), not {how!r}"
        )
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise GraftError(f"density should be in (0, 1], got {density!r}")
    is_svd = how.endswith("svd")
    if svd_rank is not None and (not is_svd or not isinstance(svd_rank, int) or svd_rank < 1):
        raise GraftError(
            f"svd_rank should be a positive integer, for svd and the *_svd rules; got "
            f"{svd_rank!r} with how={how!r}"
        )
    if svd_clamp is not None and (not is_svd or not 0 < svd_clamp <= 1):
        raise GraftError(
            f"svd_clamp should be a quantile in (0, 1], for svd and the *_svd rules; got "
            f"{svd_clamp!r} with how={how!r}"
        )
    if majority_sign not in MAJORITY_SIGN_METHODS:
        raise GraftError(
            f"majority_sign should be one of {', '.join(MAJORITY_SIGN_METHODS)}, got {majority_sign!r}"
        )
    return weights


def _read_source(name: str, folder: Path) -> _Source:
    config = read_config(folder)
    path = folder / CONFIG_FILE
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise GraftError(
            f"{path}: peft_type is {peft_type!r}; combine works on LoRA adapters only "
            "(their updates are B·A products, which other methods do not have)"
        )
    if config.get("use_dora"):
        raise GraftError(
            f"{path}: use_dora is true; a DoRA adapter's output is normalised per column of the "
            "adapted weight, so a weighted sum of DoRA adapters is not defined: combine LoRA "
            "adapters only"
        )
    for key, allowed in (("lora_bias", (False, None)), ("target_parameters", (None, [], ()))):
        if config.get(key) not in allowed:
            raise GraftError(f"{path}: {key}={config.get(key)!r} is not supported by combine")
    if (config.get("bias") or "none") != "none":
        raise GraftError(
            f"{path}: bias={config.get('bias')!r}; the trained biases of two adapters cannot be "
            "combined (PEFT neither): combine adapters trained with bias 'none'"
        )
    if config.get("modules_to_save"):
        raise GraftError(
            f"{path}: modules_to_save={config.get('modules_to_save')!r}; whole trained modules "
            "cannot be combined: combine adapters without modules_to_save"
        )
    lora = LoraConfig.from_peft_dict(config, source=str(path))
    source = _Source(name, folder, config, lora, read_graft(folder))
    tensors = read_weights(folder)
    linear, rest = group_keys(tensors, _LORA_KEY)
    embedding, rest = group_keys(rest, _EMB_KEY)
    for module in embedding:
        # PEFT saves the base's table beside an embedding's LoRA pair: a copy, carried over
        key = f"{PREFIX}{module}.base_layer.weight"
        if key in rest:
            source.base_copies[key] = rest.pop(key)
    if rest:
        raise GraftError(
            f"{folder / WEIGHTS_FILE}: tensors other than LoRA's A and B ({', '.join(list(rest)[:3])}"
            f"{', ...' if len(rest) > 3 else ''}): combine handles plain LoRA adapters only"
        )
    for groups, is_embedding in ((linear, False), (embedding, True)):
        prefix = "lora_embedding_" if is_embedding else "lora_"
        for module, pair in groups.items():
            if set(pair) != {prefix + "A", prefix + "B"}:
                raise GraftError(f"{folder / WEIGHTS_FILE}: {module} lacks its A or B tensor")
            a, b = pair[prefix + "A"].float(), pair[prefix + "B"].float()
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise GraftError(
                    f"{folder / WEIGHTS_FILE}: {module}: A {tuple(a.shape)} and B "
                    f"{tuple(b.shape)} are not a LoRA pair (A (r, in), B (out, r))"
                )
            source.pairs[module] = (a, b, is_embedding)
    if not source.pairs:
        raise GraftError(f"{folder / WEIGHTS_FILE}: no LoRA tensors (keys like '...lora_A.weight')")
    return source


# -- the checks between adapters --------------------------------------------------------------


def _check_same_base(sources: list[_Source]) -> dict | None:
    """The common base fingerprint (None when no folder has one); refuses different bases."""
    first = sources[0]
    fingerprints = [(s, s.graft.get("base_fingerprint")) for s in sources]
    known = [(s, f) for s, f in fingerprints if f]
    for source, fingerprint in known[1:]:
        if fingerprint != known[0][1]:
            raise GraftError(
                f"adapters {known[0][0].name!r} and {source.name!r} were trained on different "
                f"base models (fingerprints {known[0][1]} and {fingerprint}, in their "
                "graftlm.json): combine adapters of one base"
            )
    if len(known) < len(sources):
        names = {s.name: s.config.get("base_model_name_or_path") for s in sources}
        if len(set(names.values())) > 1:
            log.warning(
                "warning: the adapters name different bases in base_model_name_or_path (%s); "
                "combining them as one base's",
                ", ".join(f"{k}: {v}" for k, v in names.items()),
            )
    dims: dict[str, tuple[tuple[int, int], _Source]] = {}
    for source in sources:
        for module, (a, b, _) in source.pairs.items():
            shape = (b.shape[0], a.shape[1])
            seen, other = dims.setdefault(module, (shape, source))
            if seen != shape:
                raise GraftError(
                    f"{source.folder / WEIGHTS_FILE}: {module} is {shape[0]}x{shape[1]} in "
                    f"{source.name!r} but {seen[0]}x{seen[1]} in {other.name!r}: the adapters "
                    "were trained on different base models"
                )
    for source in sources[1:]:
        for key in _SELECTION_FIELDS:
            if source.config.get(key) != first.config.get(key):
                raise GraftError(
                    f"{source.folder / CONFIG_FILE}: {key} is {source.config.get(key)!r} but "
                    f"{first.config.get(key)!r} in {first.name!r}; the combined adapter keeps one "
                    "module selection, so combine adapters that agree on it"
                )
    return known[0][1] if known else None


def _new_rank(sources: list[_Source], how: str, svd_rank: int | None) -> int:
    ranks = [s.max_rank() for s in sources]
    if how in SAME_RANK:
        if len(set(ranks)) != 1:
            raise GraftError(
                f"how={how!r} merges A and B entry by entry, so every adapter needs the same "
                f"rank; got {', '.join(f'{s.name}: r={r}' for s, r in zip(sources, ranks))} "
                "(use cat or an svd rule for adapters of different ranks)"
            )
        for source in sources:
            for module, (a, _, _) in source.pairs.items():
                if a.shape[0] != ranks[0]:
                    raise GraftError(
                        f"{source.folder / WEIGHTS_FILE}: {module} has rank {a.shape[0]} "
                        f"(rank_pattern), but how={how!r} needs rank {ranks[0]} on every module"
                    )
        return ranks[0]
    if how == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _check_svd_rank(sources: list[_Source], how: str, rank: int) -> None:
    if not how.endswith("svd"):
        return
    for source in sources:
        for module, (a, b, _) in source.pairs.items():
            if rank > min(a.shape[1], b.shape[0]):
                raise GraftError(
                    f"svd rank {rank} is larger than {module} ({b.shape[0]}x{a.shape[1]}) allows"
                )


def _combined_config(sources: list[_Source], new_rank: int) -> dict:
    """PEFT's config of the new adapter: the first adapter's, with r = lora_alpha = new rank,
    no patterns, and the targets of all (a set union, or the regexes joined with "|")."""
    targets = [s.config.get("target_modules") for s in sources]
    kinds = {isinstance(t, str) for t in targets}
    if len(kinds) > 1:
        raise GraftError(
            "the adapters' target_modules mix a regex string and a list of names "
            f"({', '.join(f'{s.name}: {t!r}' for s, t in zip(sources, targets))}); PEFT cannot "
            "combine those either: retrain one with the other's kind of target_modules"
        )
    if kinds == {True}:
        new_targets: str | list[str] = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(set().union(*(set(t) for t in targets)))
    if sources[0].config.get("use_rslora"):
        log.warning(
            "warning: use_rslora is true: the combined adapter is written as PEFT writes it "
            "(r = lora_alpha = %d, use_rslora kept), so it applies scale sqrt(%d) = %.3g to "
            "updates combined at scale 1",
            new_rank,
            new_rank,
            math.sqrt(new_rank),
        )
    config = dict(sources[0].config)
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        alpha_pattern={},
        rank_pattern={},
        inference_mode=True,
    )
    return config


def _named_base(sources: list[_Source]) -> str | None:
    names = {s.config.get("base_model_name_or_path") for s in sources} - {None, ""}
    return names.pop() if len(names) == 1 else None


# -- one module -------------------------------------------------------------------------------


def _combine_module(module, present, how, new_rank, density, majority_sign, clamp, full):
    """A' (new_rank, in) and B' (out, new_rank) of one module; `present` holds the
    (source, weight) of the adapters that adapt it, in the order given."""
    if how == "cat":
        parts_a = [s.pairs[module][0] * w * s.scaling(module) for s, w in present]
        parts_b = [s.pairs[module][1] for s, _ in present]
        cat_a, cat_b = torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1)
        new_a = torch.zeros(new_rank, cat_a.shape[1])
        new_b = torch.zeros(cat_b.shape[0], new_rank)
        new_a[: cat_a.shape[0], :] = cat_a  # ranks of adapters missing here stay zero
        new_b[:, : cat_b.shape[1]] = cat_b
        return new_a, new_b
    if how.endswith("svd"):
        # PEFT merges the update in the base weight's layout: (in, out) for an embedding or a
        # fan_in_fan_out (Conv1D) layer; DARE's masks are drawn in that tensor's order
        first = present[0][0]
        transposed = first.pairs[module][2] or bool(first.config.get("fan_in_fan_out"))
        deltas = []
        for source, _ in present:
            product = source.pairs[module][1] @ source.pairs[module][0]
            deltas.append((product.T if transposed else product) * source.scaling(module))
        weights = torch.tensor([w for _, w in present])
        delta = merge_tensors(how, deltas, weights, density, majority_sign)
        delta = delta.T if transposed else delta
        return low_rank_factors(delta, new_rank, clamp=clamp, full_matrices=full)
    # entry by entry: the weight and scale split as sqrt over A and B, the sign on A only
    weights_a, weights_b = [], []
    for source, weight in present:
        scaled = weight * source.scaling(module)
        weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        weights_b.append(math.sqrt(abs(scaled)))
    lora_a = [s.pairs[module][0] for s, _ in present]
    lora_b = [s.pairs[module][1] for s, _ in present]
    new_a = merge_tensors(how, lora_a, torch.tensor(weights_a), density, majority_sign)
    new_b = merge_tensors(how, lora_b, torch.tensor(weights_b), density, majority_sign)
    return new_a, new_b
