"""Prompt and prefix tuning folders, in PEFT's format: one `prompt_embeddings` tensor.

adapter_config.json          peft_type PROMPT_TUNING / PREFIX_TUNING and the shapes
adapter_model.safetensors    prompt_embeddings: [P, hidden] (prompt) or
                             [P, num_layers * 2 * kv_heads * head_dim] (prefix)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graftlm.errors import GraftError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_KEY = "prompt_embeddings"  # the one tensor PEFT saves for both methods


def read_config(folder, peft_type: str) -> dict:
    """adapter_config.json of `folder`, checked to be of `peft_type` for a causal LM."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraftError(f"{path}: not found (is {folder} an adapter folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None
    found = str(data.get("peft_type", "")).upper()
    if found != peft_type:
        raise GraftError(f"{path}: peft_type is {found!r}, expected {peft_type!r}")
    task = data.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise GraftError(f"{path}: task_type {task!r}; graftlm loads CAUSAL_LM adapters only")
    submodules = data.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise GraftError(
            f"{path}: num_transformer_submodules is {submodules!r} (an encoder-decoder adapter); "
            "graftlm loads decoder-only adapters"
        )
    for field_name in ("num_virtual_tokens", "token_dim"):
        value = data.get(field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GraftError(f"{path}: {field_name} should be a positive integer, got {value!r}")
    return data


def read_weights(folder, expected_shape: tuple[int, ...]) -> torch.Tensor:
    """The `prompt_embeddings` tensor of `folder`, checked against `expected_shape`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        legacy = folder / "adapter_model.bin"
        if not legacy.is_file():
            raise GraftError(f"{path}: not found")
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        path = legacy
    else:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise GraftError(f"{path}: not a readable safetensors file ({exc})") from None
    if PEFT_KEY not in tensors:
        raise GraftError(f"{path}: no {PEFT_KEY!r} tensor (found keys: {sorted(tensors)})")
    extra = sorted(set(tensors) - {PEFT_KEY})
    if extra:
        raise GraftError(f"{path}: unexpected tensors {extra} next to {PEFT_KEY!r}")
    tensor = tensors[PEFT_KEY]
    if tuple(tensor.shape) != tuple(expected_shape):
        raise GraftError(
            f"{path}: {PEFT_KEY!r} has shape {list(tensor.shape)}, this model needs "
            f"{list(expected_shape)}"
        )
    return tensor.float()


def save_weights(folder, config: dict, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's layout) atomically."""
    from graftlm.methods.lora.files import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    tensors = {PEFT_KEY: tensor.detach().float().cpu().contiguous()}
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, config)
    return tensors


def merge_refused(method: str) -> GraftError:
    return GraftError(
        f"{method} tuning adds virtual tokens to attention; there are no weights to fold it into, "
        "so it cannot be merged. Serve or generate with the adapter loaded instead"
    )
