"""``graftlm export --format gguf``: a LoRA adapter as llama.cpp's adapter file.

The format is the one llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type =
"adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, the base's
``general.architecture``, and per adapted matrix ``blk.{i}.attn_q.weight.lora_a`` (numpy shape
``(r, in)``, ggml ``[in, r]``) and ``.lora_b`` (``(out, r)``) — PEFT's A and B orientation, which is
the one llama.cpp checks when it loads the file. The rows of B for q and k are permuted like the
base's q/k weights (`graftlm.export.llama_layout.permute_qk`).

**One scale per file.** llama.cpp multiplies every module's B·A x by ``alpha / r`` with one
``alpha`` for the whole file and r the module's own rank (the width of its B). PEFT's scale is
``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with rsLoRA), with per-module ``rank_pattern`` /
``alpha_pattern`` overrides. The writer keeps the file's ``alpha`` = the config's ``alpha`` and
multiplies each B by ``scale_m · r_m / alpha``, so every module keeps its true scale under
llama.cpp (and ``--lora-scaled F`` still scales the whole adapter by F).

`lora_pairs` reads an adapter as llama.cpp tensors; the merged writer
(`graftlm.export.gguf_merged`) uses it too.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from graftlm.errors import GraftError
from graftlm.export.gguf_base import GGUFBase, embedding_hash, resolve_base
from graftlm.export.llama_layout import (
    LORA_TENSORS,
    encode,
    file_type,
    gguf_name,
    new_writer,
    permute_qk,
    qk_heads,
    write_file,
)
from graftlm.methods.lora.files import read_adapter_config, read_adapter_weights

logger = logging.getLogger(__name__)

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""Tensor types for ``--format gguf`` (those llama.cpp's own LoRA converter offers)."""

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector$")


@dataclass
class LoraPair:
    """One adapted matrix, ready for llama.cpp.

    Attributes:
        module: Hugging Face module name (``model.layers.0.self_attn.q_proj``).
        tensor: llama.cpp base tensor (``blk.0.attn_q.weight``).
        a: ``(r, in)`` float32, as trained.
        b: ``(out, r)`` float32 as trained, rows in llama.cpp's order (permuted for q and k).
        scale: the module's true scale (alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA).
        magnitude: DoRA's ``(out,)`` magnitude in llama.cpp's row order, or None (plain LoRA).
    """

    module: str
    tensor: str
    a: np.ndarray
    b: np.ndarray
    scale: float
    magnitude: np.ndarray | None = None

    def merged(self, base: np.ndarray) -> np.ndarray:
        """``base + scale·B·A``, for DoRA rescaled to ``m / ‖base + scale·B·A‖`` per row;
        ``(out, in)`` float32 (computed in fp32)."""
        weights = base.astype(np.float32) + self.delta()
        if self.magnitude is not None:
            norms = np.linalg.norm(weights.astype(np.float64), axis=1).astype(np.float32)
            weights *= (self.magnitude / norms)[:, None]
        return weights

    def delta(self) -> np.ndarray:
        """``scale · B·A`` in llama.cpp's row order, ``(out, in)`` float32 (computed in fp32)."""
        a = torch.from_numpy(self.a)
        b = torch.from_numpy(self.b)
        return (b @ a).mul_(self.scale).numpy()


def lora_pairs(
    adapter: str | os.PathLike, base: GGUFBase, *, force: bool = False, merging: bool = False
) -> tuple[Any, list[LoraPair]]:
    """Read an adapter folder as llama.cpp tensors for `base` (B rows permuted for q and k).

    A DoRA adapter is read only when `merging` (``--format gguf-merged``): llama.cpp's adapter
    files hold A and B, with no place for DoRA's magnitude.

    Returns:
        (LoraConfig, pairs in block order); each pair's B is unscaled (see `LoraPair`).

    Raises:
        GraftError: listing every tensor or setting llama.cpp cannot take (embedding adapters,
            modules_to_save, biases, modules without a llama.cpp tensor, shape mismatches);
            or the adapter's base fingerprint names another base (unless `force`).
    """
    config, graft = read_adapter_config(adapter)
    if config.use_dora and not merging:
        raise GraftError(
            f"{adapter}: a DoRA adapter (use_dora) cannot be exported as a llama.cpp adapter: "
            "llama.cpp has no DoRA adapter type; export the merged model with --format gguf-merged"
        )
    expected = (graft.get("base_fingerprint") or {}).get("weights_sha256")
    if expected and not force:
        base_hash = embedding_hash(base)
        if base_hash is not None and base_hash != expected:
            raise GraftError(
                f"{adapter}: adapter was trained on a different base model than {str(base.path)!r} "
                f"(weights fingerprint {expected} != {base_hash}); pass --force to export it anyway"
            )
    found, problems = _split_tensors(read_adapter_weights(adapter), config)
    pairs, unmapped, mismatched = [], [], []
    for module, ab in sorted(found.items(), key=lambda kv: _block_order(kv[0])):
        magnitude = ab.pop("M", None)
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        name = gguf_name(module)
        if name is None or name.split(".")[-1] not in LORA_TENSORS:
            unmapped.append(module)
            continue
        tensor = f"{name}.weight"
        a = ab["A"].float().numpy()
        b = ab["B"].float().numpy()
        base_shape = base.shapes.get(tensor)
        if base_shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            mismatched.append(
                f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)}; base {tensor} is "
                f"{'absent' if base_shape is None else base_shape}"
            )
            continue
        heads = qk_heads(tensor, base.n_head, base.n_head_kv)
        if magnitude is not None:  # one value per output row: permuted as B's rows are
            magnitude = magnitude.float().numpy()[:, None]
            magnitude = (magnitude if heads is None else permute_qk(magnitude, heads))[:, 0]
        if heads is not None:
            b = permute_qk(b, heads)
        pair = LoraPair(module, tensor, a, np.ascontiguousarray(b), config.scaling_for(module))
        pair.magnitude = None if magnitude is None else np.ascontiguousarray(magnitude)
        pairs.append(pair)
    if unmapped:
        problems.append(f"modules without a llama.cpp LoRA tensor: {_listing(unmapped)}")
    if mismatched:
        problems.append(f"shapes do not match the base {str(base.path)!r}: {_listing(mismatched)}")
    if problems:
        raise GraftError(f"{adapter}: cannot export to llama.cpp: " + "; ".join(problems))
    if not pairs:
        raise GraftError(f"{adapter}: no LoRA tensors to export")
    if config.quantize == "nf4":
        logger.warning(
            "%s is a QLoRA adapter, trained against an NF4 copy of the base; llama.cpp applies it "
            "to the base as stored in the GGUF file",
            adapter,
        )
    return config, pairs


def _split_tensors(weights: dict, config: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The adapter's LoRA A/B tensors by module, and a problem for everything else it holds."""
    problems: list[str] = []
    if config.modules_to_save:
        problems.append(
            f"modules_to_save {list(config.modules_to_save)!r} (whole trained modules have no "
            "place in a llama.cpp LoRA file)"
        )
    found: dict[str, dict[str, Any]] = {}
    others = []
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        magnitude = _MAGNITUDE_KEY.match(key) if config.use_dora else None
        if match:
            found.setdefault(match.group("module"), {})[match.group("kind")] = tensor
        elif magnitude:
            found.setdefault(magnitude.group("module"), {})["M"] = tensor
        else:
            others.append(key)
    embeddings = [k for k in others if ".lora_embedding_" in k]
    if embeddings:
        problems.append(f"embedding adapters are not exported ({_listing(embeddings)})")
    rest = [k for k in others if k not in embeddings]
    if rest:
        problems.append(f"tensors other than LoRA A/B ({_listing(rest)}: biases or saved modules)")
    return found, problems


def _listing(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _block_order(module: str) -> tuple[int, str]:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return (int(match.group(1)) if match else -1, module)


def export_adapter_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    outtype: str = "f32",
    force: bool = False,
) -> Path:
    """Write a llama.cpp LoRA adapter file (run it with ``llama-cli -m BASE --lora OUT``).

    Args:
        adapter: a PEFT-format adapter folder.
        out: the ``.gguf`` file to write (replaced if it exists).
        model: the base (built-in name, ``.gguf`` file or HF Llama folder); default: the base
            the adapter names, else the built-in model. Only its architecture, head counts and
            shapes are read.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the A and B tensors.
        force: export although the adapter's base fingerprint names another base.

    Returns:
        The written path.

    Raises:
        GraftError: unknown `outtype`, unsupported architecture or adapter contents (see
            `lora_pairs`).
    """
    if outtype not in ADAPTER_OUTTYPES:
        raise GraftError(
            f"--outtype should be one of {', '.join(ADAPTER_OUTTYPES)}, got {outtype!r}"
        )
    base = resolve_base(model, adapter)
    config, pairs = lora_pairs(adapter, base, force=force)
    writer = new_writer(base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, config.alpha)
    writer.add_name(Path(adapter).resolve().name)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for pair in pairs:
        rank = pair.a.shape[0]
        # llama.cpp scales by alpha / rank; fold the rest of the module's true scale into B
        fold = pair.scale * rank / config.alpha
        b = pair.b if fold == 1.0 else pair.b * np.float32(fold)
        writer.add_tensor(f"{pair.tensor}.lora_a", *_tensor(pair.a, outtype, pair.tensor))
        writer.add_tensor(f"{pair.tensor}.lora_b", *_tensor(b, outtype, pair.tensor))
    return write_file(writer, Path(out))


def _tensor(weights: np.ndarray, kind: str, name: str) -> tuple[np.ndarray, None, Any]:
    data, qtype = encode(weights, kind, name)
    return data, None, qtype  # add_tensor(name, tensor, raw_shape, raw_dtype)
