"""Save and load an adapter folder of any method: dispatch on the method, one `graftlm.json`.

LoRA/QLoRA folders go through `graftlm.methods.lora.files` (PEFT format); every other method writes its own
files through its module (`graftlm.methods.<method>.save/load`), and this module adds the side file
`graftlm.json` (method, base fingerprint, training summary) and the fingerprint check on load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from torch import nn

from graftlm.errors import GraftError
from graftlm.methods import folder_method, method_module
from graftlm.methods.lora.files import (
    GRAFT_FILE,
    atomic_write_json,
    check_fingerprint,
    graftlm_version,
)
from graftlm.methods.lora.inject import base_fingerprint


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
        from graftlm.methods.lora.files import save_adapter

        return save_adapter(model, folder, training=training)
    base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    tensors = module.save(model, folder, base_name)
    graft = {
        "format_version": 1,
        "method": method,
        "graftlm_version": graftlm_version(),
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
    if name in other_adapters(model):
        raise GraftError(f"an adapter named {name!r} is already loaded")
    base_fingerprint(model)  # computed on the untouched base, before the method changes modules
    check_fingerprint(model, read_graft(folder), folder, force)
    module.load(model, folder, name)
    other_adapters(model)[name] = method
    return method


def other_adapters(model: nn.Module) -> dict[str, str]:
    """Adapters of methods other than LoRA loaded by `load_any`: {name: method} (live dict)."""
    if not hasattr(model, "graftlm_other_adapters"):
        model.graftlm_other_adapters = {}
    return model.graftlm_other_adapters


def unload_any(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (any method) from `model`; the base computes as before it came."""
    from graftlm.methods.lora.inject import adapter_names, delete_adapter

    if name in adapter_names(model):
        delete_adapter(model, name)
        return
    method = other_adapters(model).get(name)
    if method is None:
        raise GraftError(f"no adapter named {name!r} is loaded")
    module = method_module(method)
    if not hasattr(module, "unload"):
        raise GraftError(f"{method} adapters cannot be unloaded one by one")
    module.unload(model, name)
    del other_adapters(model)[name]


def serves_per_row(method: str) -> bool:
    """Whether adapters of `method` can share a batch with others (one adapter per row)."""
    return method == "lora" or hasattr(method_module(method), "unload")
