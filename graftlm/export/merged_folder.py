"""Merged model folders: base + adapter folded into plain weights that transformers loads alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from graftlm.errors import GraftError


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
    """
    from graftlm.adapters.io import load_any
    from graftlm.infer.generate import adapter_base_model, parse_dtype
    from graftlm.methods import folder_method, method_module
    from graftlm.methods.lora.files import read_adapter_config
    from graftlm.methods.lora.inject import merge_and_unload
    from graftlm.models.load import BUILTIN_NAME, load_model

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
    quantize = read_adapter_config(adapter)[0].quantize if method == "lora" else None
    base_name = model or adapter_base_model(adapter) or BUILTIN_NAME
    if not (base_name.lower() == BUILTIN_NAME or os.path.exists(base_name)):
        base_name = BUILTIN_NAME
    base, tokenizer = load_model(base_name, dtype=torch.float32)
    if quantize == "nf4":
        # A QLoRA adapter was trained against the 4-bit weights: merge it into those, dequantized
        # (in fp32), so the merged model computes what the adapter was trained to complement.
        from graftlm.methods.lora.inject import quantize_base

        quantize_base(base)
    load_any(base, adapter, name="default", force=force)
    if method == "lora":
        merged = merge_and_unload(base)
    else:
        module.merge(base)
        merged = _plain_copy(base, base_name)
    if quantize == "nf4":
        from graftlm.quant.nf4_linear import dequantize_model_linears

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


def _plain_copy(adapted: torch.nn.Module, base_name: str) -> torch.nn.Module:
    """A fresh base model holding `adapted`'s (merged) weights, without the method's modules.

    Methods wrap layers (`...k_proj.base_layer.weight`); the merged weights are matched to the
    plain model's keys by dropping the `base_layer.` step, so any method's merge gives a model
    that `save_pretrained` writes with the original architecture's keys.
    """
    from graftlm.models.load import load_model

    plain, _ = load_model(base_name, dtype=torch.float32)
    merged = {k.replace("base_layer.", ""): v for k, v in adapted.state_dict().items()}
    target = plain.state_dict()
    missing = [k for k in target if k not in merged]
    if missing:
        raise GraftError(f"merge: the merged model lacks base weights such as {missing[0]!r}")
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(merged[key])
    return plain
