"""What prompt tuning and prefix tuning share as methods: their adapters (the trained encoders
in `model.prompt_encoder`), switching between them, and their folders.

Both methods' folders are PEFT's, with one tensor:

    adapter_config.json          peft_type PROMPT_TUNING / PREFIX_TUNING and the shapes
    adapter_model.safetensors    prompt_embeddings: [P, hidden] (prompt) or
                                 [P, num_layers * 2 * kv_heads * head_dim] (prefix)

Prompt and prefix adapters live side by side in one `prompt_encoder` and one attention hook
(`attention.py`), so the contract's switching functions here serve both methods; one of their
adapters is active at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.base_model import check_base
from graftlm.adapters.contract import InjectSummary, merge_refused, summarize
from graftlm.adapters.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    peft_header,
    read_weights,
    write_folder,
)
from graftlm.adapters.folder import read_config as read_config_file
from graftlm.adapters.state import adapter_state
from graftlm.adapters.switch import set_adapter
from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens.attention import (
    ENCODERS,
    Geometry,
    VirtualTokenEncoder,
    geometry_of,
    install,
    state_of,
    uninstall,
)
from graftlm.models.load import load_tokenizer

# Chosen by experiment on tickets and intent_slots (docs/prompt_prefix_tuning.md, "Defaults"):
# on tickets, 1 epoch gave 0.33-0.37 exact match, these 3 epochs 0.67 (prompt) and 0.73 (prefix).
# max_epochs bounds the adaptive run; validation stops it sooner (train/adaptive.py).
DEFAULTS = {"num_virtual_tokens": 20, "prompt_init": "vocab", "lr": 3e-2, "max_epochs": 8.0}
INITS = ("random", "vocab")  # anything else is a text whose tokens start the prompt / prefix
PEFT_KEY = "prompt_embeddings"  # the one tensor PEFT saves for both methods


# -- adding -----------------------------------------------------------------------------------


def prepare(model: nn.Module, method: str, num_virtual_tokens: Any) -> Geometry:
    """Refuse a bad P or an unsupported model before anything changes; install the hooks.

    Returns:
        The model's attention geometry.
    """
    if (
        isinstance(num_virtual_tokens, bool)
        or not isinstance(num_virtual_tokens, int)
        or num_virtual_tokens <= 0
    ):
        raise GraftError(
            f"num_virtual_tokens should be a positive integer, got {num_virtual_tokens!r}"
        )
    install(model, method)
    return geometry_of(model)


def text_ids(init: str, count: int, tokenizer) -> list[int]:
    """`count` token ids of the text `init`, cut or repeated as PEFT does.

    Raises:
        GraftError: no tokenizer, or a text with no tokens.
    """
    if tokenizer is None:
        raise GraftError(
            f"prompt_init {init!r} is a text, which needs the model's tokenizer; "
            f"or use one of {INITS}"
        )
    ids = list(tokenizer(init)["input_ids"])
    if not ids:
        raise GraftError(f"prompt_init {init!r} has no tokens; use a longer text or one of {INITS}")
    return (ids * -(-count // len(ids)))[:count]


def tokenizer_for(cfg, needed: bool):
    """The base model's tokenizer when a text init needs it (`needed`), else None."""
    return load_tokenizer(cfg.model) if needed and cfg.prompt_init not in INITS else None


def add(model: nn.Module, method: str, name: str, encoder: VirtualTokenEncoder) -> InjectSummary:
    """Put `encoder` on `model` as adapter `name` of `method`, the active and only trainable
    one.

    Raises:
        GraftError: the name is taken or malformed.
    """
    state = adapter_state(model)
    state.check_new(name)
    tokens = install(model, method)
    encoder.to(device=model.get_input_embeddings().weight.device)
    tokens.encoders[name] = encoder
    state.add(name, method, encoder.settings())
    set_adapter(model, name)
    return summarize(model, name, [(f"{ENCODERS}.{name}", method, encoder.num_virtual_tokens)])


def encoder_of(model: nn.Module, name: str, kind: type | None = None) -> Any:
    """The trained module of adapter `name` (of class `kind`, when given).

    Raises:
        GraftError: the model has no such prompt/prefix adapter.
    """
    tokens = state_of(model)
    encoder = tokens.encoders[name] if tokens is not None and name in tokens.encoders else None
    if encoder is None or (kind is not None and not isinstance(encoder, kind)):
        known = list(tokens.encoders) if tokens is not None else []
        raise GraftError(
            f"the model has no {kind.__name__ if kind else 'prompt/prefix'} adapter {name!r} "
            f"(its prompt/prefix adapters: {known or 'none'})"
        )
    return encoder


# -- the contract's switching, both methods -----------------------------------------------------


def set_active(model: nn.Module, names: list[str]) -> None:
    """The attention hook adds the one of `names` that is a prompt/prefix adapter (or none);
    its parameters train.

    Raises:
        GraftError: two or more of `names` are prompt/prefix adapters.
    """
    tokens = state_of(model)
    if tokens is None:
        return
    mine = [n for n in names if n in tokens.encoders]
    if len(mine) > 1:
        raise GraftError(f"prompt/prefix tuning applies one adapter at a time, not {mine}")
    tokens.active = mine[0] if mine else None
    if tokens.active is not None:
        tokens.encoders[tokens.active].requires_grad_(True)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without its prompt/prefix adapter inside the block."""
    tokens = state_of(model)
    if tokens is None:
        yield
        return
    before = tokens.enabled
    tokens.enabled = False
    try:
        yield
    finally:
        tokens.enabled = before


def unload(model: nn.Module, name: str) -> None:
    """Remove prompt/prefix adapter `name`; with the last one gone, the model is as before.

    The latest remaining adapter takes over when `name` was the active one, as if loaded alone.

    Raises:
        GraftError: the model has no such adapter.
    """
    encoder = encoder_of(model, name)
    tokens = state_of(model)
    tokens.cache.pop(id(encoder), None)
    del tokens.encoders[name]
    state = adapter_state(model)
    state.remove(name)
    if not len(tokens.encoders):
        uninstall(model)
    elif tokens.active == name:
        set_adapter(model, [*state.active, list(tokens.encoders)[-1]])


merge = merge_refused(
    "prompt and prefix tuning add virtual tokens to attention; there are no weights to fold "
    "them into, so they cannot be merged. Serve or generate with the adapter loaded instead"
)


# -- folders ----------------------------------------------------------------------------------


def peft_config(
    peft_type: str,
    base_model_name: str | None,
    encoder: VirtualTokenEncoder,
    shape: tuple[int, int, int],
    fields: dict,
) -> dict:
    """PEFT's PromptTuningConfig / PrefixTuningConfig (0.21) fields in PEFT's order: the
    common ones, `shape` (token_dim, num_attention_heads, num_layers), the method's `fields`."""
    token_dim, heads, layers = shape
    return {
        **peft_header(peft_type, base_model_name),
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        **fields,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def save(
    model: nn.Module, folder: Path, base_model_name: str | None, name: str = "default"
) -> dict[str, torch.Tensor]:
    """Write prompt/prefix adapter `name` as a PEFT folder (adapter_config.json and
    adapter_model.safetensors, atomically); returns the tensors written."""
    encoder = encoder_of(model, name)
    with torch.no_grad():
        tensor = encoder.saved_tensor().detach().float().cpu().contiguous()
    tensors = {PEFT_KEY: tensor}
    write_folder(Path(folder), encoder.peft_config(base_model_name), tensors)
    return tensors


def read_config(folder: Path, peft_type: str) -> dict:
    """adapter_config.json of `folder`, checked to be of `peft_type` for a decoder-only model.

    Raises:
        GraftError: unreadable, another method's or an encoder-decoder adapter, or a bad P or
            token_dim (the field named).
    """
    data = read_config_file(folder, peft_type)
    path = Path(folder) / CONFIG_FILE
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


def begin_load(
    model: nn.Module, folder: Path, method: str, peft_type: str, name: str, force: bool
) -> tuple[dict, Geometry]:
    """The checks before a prompt/prefix folder goes onto `model`: its config, the name, the
    base fingerprint, a supported model.

    Returns:
        (the folder's config, the model's geometry).
    """
    config = read_config(folder, peft_type)
    adapter_state(model).check_new(name)
    check_base(model, folder, force)
    install(model, method)
    return config, geometry_of(model)


def finish_load(
    model: nn.Module, folder: Path, method: str, name: str, encoder: VirtualTokenEncoder
) -> None:
    """Fill `encoder` with the folder's tensor (checked against its shape) and add it as
    adapter `name`, active and trainable (as LoRA's load: the base frozen, this adapter
    trainable).

    Raises:
        GraftError: no or an extra tensor, or a shape this model does not take.
    """
    path = Path(folder) / WEIGHTS_FILE
    tensors = read_weights(folder, pickled=True)
    if PEFT_KEY not in tensors:
        raise GraftError(f"{path}: no {PEFT_KEY!r} tensor (found keys: {sorted(tensors)})")
    extra = sorted(set(tensors) - {PEFT_KEY})
    if extra:
        raise GraftError(f"{path}: unexpected tensors {extra} next to {PEFT_KEY!r}")
    tensor = tensors[PEFT_KEY]
    expected = encoder.embedding.weight.shape
    if tuple(tensor.shape) != tuple(expected):
        raise GraftError(
            f"{path}: {PEFT_KEY!r} has shape {list(tensor.shape)}, this model needs "
            f"{list(expected)}"
        )
    with torch.no_grad():
        encoder.embedding.weight.copy_(tensor.float())
    add(model, method, name, encoder)
