"""``graftlm export --format gguf-merged``: base + adapter merged into one GGUF model file.

The base with ``scale · B·A`` added to each adapted weight, one GGUF that llama.cpp runs without
an adapter. Two kinds of base:

- a GGUF file (the built-in model, or any ``.gguf`` of a supported architecture): metadata and
  tokenizer are copied from the source file; each adapted tensor is dequantized, merged in fp32 and
  written as ``--quant``; every other tensor is copied byte for byte (re-quantizing it would only
  lose precision).
- a Hugging Face Llama folder (``model_type: llama``): merged by
  `graftlm.export.merged_folder.merge_to_folder`, then written by
  `graftlm.export.llama_layout.write_llama_folder` (hyperparameters, tensors, and a GPT-2 style
  BPE tokenizer whose pre-tokenizer llama.cpp knows; see that module for what is refused).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from graftlm.errors import GraftError
from graftlm.export.gguf_adapter import LoraPair, lora_pairs
from graftlm.export.gguf_base import GGUFBase, gguf_reader, resolve_base
from graftlm.export.llama_layout import (
    encode,
    file_type,
    merged_kind,
    new_writer,
    write_file,
    write_llama_folder,
)
from graftlm.export.merged_folder import merge_to_folder

logger = logging.getLogger(__name__)

MERGED_QUANTS = ("f16", "q8_0", "q4_0", "q4_1")
"""Types for the adapted weights of ``--format gguf-merged``."""

# Tensor types the writer takes as numpy arrays; any other (block-quantized) type is copied as
# raw bytes with its type.
_PLAIN = (
    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
    gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
    gguf.GGMLQuantizationType.I64,
)  # fmt: skip


def export_merged_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    quant: str = "f16",
    force: bool = False,
) -> Path:
    """Write base + adapter merged as one GGUF model file (run it with ``llama-cli -m OUT``).

    Args:
        adapter: a PEFT-format adapter folder.
        out: the ``.gguf`` file to write (replaced if it exists).
        model: the base: built-in name or ``.gguf`` file (metadata, tokenizer and unadapted tensors
            copied from it), or a Hugging Face Llama folder; default as `export_adapter_gguf`.
        quant: type of the merged weights: ``f16``, ``q8_0``, ``q4_0`` or ``q4_1`` (1-D tensors
            stay f32; the embedding table and output head stay q8_0 under the 4-bit types).
        force: merge although the adapter's base fingerprint names another base.

    Returns:
        The written path.
    """
    if quant not in MERGED_QUANTS:
        raise GraftError(f"--quant should be one of {', '.join(MERGED_QUANTS)}, got {quant!r}")
    base = resolve_base(model, adapter)
    if base.is_gguf:
        _, pairs = lora_pairs(adapter, base, force=force, merging=True)
        return _merge_into_gguf(base, pairs, Path(out), quant)
    return _merge_hf_folder(adapter, base, Path(out), quant, force)


def _merge_into_gguf(base: GGUFBase, pairs: list[LoraPair], out: Path, quant: str) -> Path:
    reader = base.reader or gguf_reader(base.path)
    writer = new_writer(base.arch, use_temp_file=True)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    skip = {"general.architecture", "general.file_type"}
    for entry in reader.fields.values():
        if not entry.name.startswith("GGUF.") and entry.name not in skip:
            copy_field(writer, entry)
    writer.add_file_type(file_type(quant))
    by_tensor = {pair.tensor: pair for pair in pairs}
    kept, noise, total = 0.0, 0.0, 0.0
    for t in reader.tensors:
        pair = by_tensor.get(t.name)
        if pair is None:
            raw = None if t.tensor_type in _PLAIN else t.tensor_type
            writer.add_tensor(t.name, t.data, raw_dtype=raw)
            continue
        shape = (pair.b.shape[0], pair.a.shape[1])
        base_weights = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        weights = pair.merged(base_weights)
        delta = weights - base_weights  # DoRA: the whole change its rescaling makes
        if not np.isfinite(weights).all():
            raise GraftError(f"{pair.module}: the merged weight has NaN or inf; not writing it")
        data, qtype = encode(weights, merged_kind(t.name, quant), t.name)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        # what rounding did to the fine-tune: the part of the change that survives (projection
        # of written - base on delta) and the rounding error, both against the size of delta
        written = gguf.quants.dequantize(data, qtype).reshape(shape)
        kept += float(np.vdot(written - base_weights, delta))
        noise += float(np.square(written - weights).sum())
        total += float(np.vdot(delta, delta))
    _report_rounding(out, quant, kept, noise, total)
    return write_file(writer, out)


def _report_rounding(out: Path, quant: str, kept: float, noise: float, total: float) -> None:
    """Log how much of the adapter's change survived rounding; warn when most of it is lost."""
    share, error = (kept / total, (noise / total) ** 0.5) if total else (1.0, 0.0)
    message = (
        "%s: after rounding to %s the merged weights keep %.0f%% of the adapter's change, "
        "with a rounding error %.2fx the change's size"
    )
    if share < 0.5 or error > 3.0:
        logger.warning(
            message + ": much of the fine-tune is lost. Keep it with --format gguf (the adapter "
            "file on this base) or --quant q8_0/f16",
            out,
            quant,
            100 * share,
            error,
        )
    else:
        logger.info(message, out, quant, 100 * share, error)


def copy_field(writer: Any, entry: Any) -> None:
    """Copy one metadata key of a `gguf.GGUFReader` to a writer, types kept, strings as bytes
    (so tokens that are not valid UTF-8 survive)."""
    types = entry.types
    main = types[0]
    if main == gguf.GGUFValueType.ARRAY:
        if len(types) != 2:
            raise GraftError(f"GGUF key {entry.name!r}: nested arrays are not supported")
        sub = types[1]
        if sub == gguf.GGUFValueType.STRING:
            value: Any = [bytes(entry.parts[i]) for i in entry.data]
        else:
            value = (
                np.concatenate([entry.parts[i] for i in entry.data]).tolist() if entry.data else []
            )
        if not value:
            return
        writer.add_key_value(entry.name, value, main, sub_type=sub)
    elif main == gguf.GGUFValueType.STRING:
        writer.add_key_value(entry.name, bytes(entry.parts[entry.data[0]]), main)
    else:
        writer.add_key_value(entry.name, entry.parts[entry.data[0]].tolist()[0], main)


def _merge_hf_folder(
    adapter: str | os.PathLike, base: GGUFBase, out: Path, quant: str, force: bool
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".graftlm-merge-", dir=out.parent) as tmp:
        merged = merge_to_folder(adapter, Path(tmp) / "merged", model=str(base.path), force=force)
        write_llama_folder(merged, out, quant=quant)
        shutil.rmtree(merged, ignore_errors=True)
    return out
