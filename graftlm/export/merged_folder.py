"""Merged model folders: base + adapter folded into plain weights that transformers loads alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from graftlm.adapters.base_model import quantize_base
from graftlm.adapters.io import load_any, quantization
from graftlm.adapters.switch import merge_and_unload
from graftlm.errors import GraftError
from graftlm.infer.generate import base_for_adapters, parse_dtype
from graftlm.methods import folder_method, method_module
from graftlm.models.load import load_model
from graftlm.quant.base_linears import dequantize_model_linears


def merge_to_folder(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Load base + adapter, merge (fp32 math), and save a Hugging Face model folder.

    The folder holds `config.json`, `model.safetensors`, the tokenizer files and a
    `graftlm_merge.json` naming the adapter; it is written next to `out` and renamed into
    place, so a crash never leaves a half-written model.

    Args:
        adapter: the adapter folder.
        out: the folder to create (must not exist, or be empty).
        model: base model (default: the one the adapter names, else the built-in).
        dtype: dtype of the saved weights ("float32" or "bfloat16").
        force: merge despite a base fingerprint mismatch.

    Returns:
        The output folder.

    Raises:
        GraftError: `out` is not empty; the adapter's method cannot merge; it does not fit
            the base.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GraftError(f"--out {out}: folder exists and is not empty")
    method = folder_method(adapter)
    module = method_module(method)
    if not module.MERGEABLE:
        raise GraftError(
            f"{adapter}: a {method} adapter cannot be merged into the base weights "
            "(it is not a change of those weights); serve or generate with it unmerged"
        )
    quantize = quantization(adapter)
    base_name = model or base_for_adapters([adapter])
    base, tokenizer = load_model(base_name, dtype=torch.float32)
    if quantize == "nf4":
        # A QLoRA adapter was trained against the 4-bit weights: merge it into those, dequantized
        # (in fp32), so the merged model computes what the adapter was trained to complement.
        quantize_base(base)
    load_any(base, adapter, name="default", force=force)
    merged = merge_and_unload(base)
    if quantize == "nf4":
        dequantize_model_linears(merged)
    merged.to(parse_dtype(dtype))
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "graftlm_merge.json").write_text(
        json.dumps(
            {
                "adapter": str(Path(adapter).resolve()),
                "base": base_name,
                "method": method,
                "quantize": quantize,
            },
            indent=2,
        )
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
