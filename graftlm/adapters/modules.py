"""Facts about a model's modules that every method needs: which layers are linear, their sizes,
how target names match, and replacing a submodule in place.

No method-specific code: LoRA, AdaLoRA, IA3 and bottleneck adapters all pick and swap layers
through these, so that they agree on what "a linear layer" and "q_proj matches" mean.
"""

from __future__ import annotations

import re

from torch import nn

from graftlm.errors import GraftError

# The first numbered segment of a module name is its block index ("model.layers.3.mlp" -> 3).
LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (weight stored `[in, out]`), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt as a linear map: nn.Linear, GPT-2's Conv1D, or a quantized linear."""
    return (
        isinstance(module, nn.Linear)
        or is_conv1d(module)
        or getattr(module, "is_quantized_linear", False)
    )


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of a plain linear layer (Conv1D stores its weight `[in, out]`)."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return out_f, in_f
    return module.out_features, module.in_features


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (`lm_head` or whatever `get_output_embeddings` returns)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {"lm_head"}


# A target string of plain names ("q_proj" or "q_proj, v_proj") means those names (suffix match),
# not a regex: as PEFT's regex, "q_proj" would have to match a whole dotted module name and
# would match nothing, while the error listed q_proj among the layers
PLAIN_NAMES = re.compile(r"[\w.\-]+(\s*,\s*[\w.\-]+)*")


def plain_names(value: str) -> tuple[str, ...] | None:
    """The names of a string of plain comma-separated names, else None (a regex)."""
    if value == "all-linear" or not PLAIN_NAMES.fullmatch(value):
        return None
    return tuple(v.strip() for v in value.split(","))


def name_matches(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex the whole name must match; names match as a suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_adapter_name(name: str) -> None:
    """Adapter names become parts of module and file keys: letters, digits, '_' and '-' only.

    Raises:
        GraftError: any other character, or an empty name.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise GraftError(f"adapter name {name!r} may only use letters, digits, '_' and '-'")


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` non-trainable (adapters then unfreeze their own)."""
    for param in model.parameters():
        param.requires_grad_(False)
