"""Save and load an adapter folder of any method: dispatch on the method, one `graftlm.json`.

LoRA/QLoRA folders go through `graftlm.adapters` (PEFT format); every other method writes its own
files through its module (`graftlm.methods.<method>.save/load`), and this module adds the side file
`graftlm.json` (method, base fingerprint, training summary) and the fingerprint check on load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from graftlm.adapters import GRAFT_FILE, _check_fingerprint, _version, atomic_write_json
from graftlm.errors import GraftError
from graftlm.methods import folder_method, method_module
from graftlm.surgery import base_fingerprint


def save_trained(
    model: nn.Module, folder: str | os.PathLike, method: str, *, training: dict | None = None
) -> Path:
    """Write adapter "default" of `model`, trained with `method`, into `folder`.

    Returns:
        The folder.
    """
    folder = Path(folder)
    module = method_module(method)
    if module.PEFT_TYPE == "LORA":
        from graftlm.adapters import save_adapter

        return save_adapter(model, folder, training=training)
    base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    tensors = module.save(model, folder, base_name)
    graft = {
        "format_version": 1,
        "method": method,
        "graftlm_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_fingerprint": base_fingerprint(model),
        "trainable_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    if training:
        graft["training"] = training
    atomic_write_json(folder / GRAFT_FILE, graft)
    return folder


def read_graft(folder: Path) -> dict:
    """graftlm.json of a folder, or {} for adapters saved elsewhere (PEFT, ...)."""
    path = folder / GRAFT_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None


def load_any(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", *, force: bool = False
) -> str:
    """Load the adapter folder (any method) onto `model` as adapter `name`.

    Returns:
        The folder's method ("lora", "adalora", "ia3", "prompt", "prefix", "bottleneck").
    """
    folder = Path(folder)
    method = folder_method(folder)
    module = method_module(method)
    if method == "lora":
        module.load(model, folder, name, force=force)
        return method
    base_fingerprint(model)  # computed on the untouched base, before the method changes modules
    _check_fingerprint(model, read_graft(folder), folder, force)
    module.load(model, folder, name)
    return method


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require a gradient, by name (what a method trains)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
