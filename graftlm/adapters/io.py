"""Save and load an adapter folder of any method, through the method contract.

The method writes and reads its own `adapter_config.json` and weights (`save` / `load` of
`adapters.contract`); this module picks the method (from the model's AdapterState when
saving, from the folder's `peft_type` when loading) and writes the one `graftlm.json` (method,
base fingerprint, the method's `graft_facts`, training summary).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from graftlm.adapters.base_model import base_fingerprint
from graftlm.adapters.folder import base_model_name, reading, staged_folder, write_graft
from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.methods import PEFT_TYPES, folder_method, method_module


def save_trained(
    model: nn.Module, folder: str | os.PathLike, method: str, *, training: dict | None = None
) -> Path:
    """Write adapter "default" of `model`, trained with `method` (a `--method` value), into
    `folder`; QLoRA writes a LoRA folder, as PEFT has it.

    Returns:
        The folder.
    """
    folder_type = PEFT_TYPES[method_module(method).PEFT_TYPE]
    return _save(model, Path(folder), folder_type, "default", training=training)


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "default",
    *,
    training: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write adapter `name` of `model` (any method) into `folder`: the method's files
    (PEFT's format where PEFT has the method), then `graftlm.json`; each atomically.

    Args:
        model: a model holding the adapter.
        folder: the folder (created if needed; other files in it are left alone).
        name: which adapter to save.
        training: a training summary to record in `graftlm.json`.
        extra: further graftlm facts for `graftlm.json`.

    Returns:
        The folder.

    Raises:
        GraftError: the model has no adapter of that name.
    """
    state = adapter_state(model)
    state.require([name])
    method = state.adapters[name].method
    return _save(model, Path(folder), method, name, training=training, extra=extra)


def _save(
    model: nn.Module,
    folder: Path,
    method: str,
    name: str,
    *,
    training: dict | None = None,
    extra: dict | None = None,
) -> Path:
    module = method_module(method)
    facts = module.graft_facts(model, name) if hasattr(module, "graft_facts") else None
    fingerprint = base_fingerprint(model)
    try:  # all files or none: a crash or a full disk leaves the previous adapter whole
        with staged_folder(folder) as staging:
            tensors = module.save(model, staging, base_model_name(model), name)
            write_graft(
                staging, method, fingerprint, tensors, facts=facts, training=training, extra=extra
            )
    except OSError as exc:
        raise GraftError(
            f"could not save the adapter to {str(folder)!r}: {exc}; the folder keeps its "
            "previous adapter"
        ) from None
    return folder


def load_any(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", *, force: bool = False
) -> str:
    """Load the adapter folder (any method) onto `model` as adapter `name`, the active one.

    Args:
        force: load it even if the base fingerprint says it was trained on another base model
            of the same architecture.

    Returns:
        The folder's method ("lora", "adalora", "ia3", "prompt", "prefix", "bottleneck").
    """
    folder = Path(folder)
    base_fingerprint(model)  # computed on the untouched base, before the method changes modules
    with reading(folder):
        method = folder_method(folder)
        method_module(method).load(model, folder, name, force=force)
    return method


def quantization(folder: str | os.PathLike) -> str | None:
    """The quantization of the base the folder's adapter was trained on ("nf4": QLoRA), or None.

    Raises:
        GraftError: not a readable adapter folder of a method graftlm implements.
    """
    with reading(folder):
        module = method_module(folder_method(folder))
        return module.quantization(Path(folder)) if hasattr(module, "quantization") else None
