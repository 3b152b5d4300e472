"""Walking a model's linear layers through any method's wrappers (shared by IA3 and bottleneck).

A method wraps a layer it adapts (`IA3Linear`, `BottleneckAdapter` keep the original as
`base_layer`; LoRA layers keep its weight). When a second adapter, of this or another method,
looks for layers, such a wrapper counts as the layer it wraps and its inside (LoRA's own A and B
are `nn.Linear` too) is never a candidate.
"""

from __future__ import annotations

from torch import nn

from graftlm.adapters.modules import is_conv1d, is_linear
from graftlm.methods.lora.layer import LoraEmbedding, LoraLayerBase


def outer_modules(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, bool]]:
    """`(name, module, is a linear layer)` for the modules of `root` in order, never the inside
    of a wrapper; names are prefixed with `prefix + "."` when a prefix is given.

    Linear layers are plain ones (`nn.Linear`, `Conv1D`, 4-bit linears) and any method's wrapper
    around one.
    """
    found, skip = [], None
    for name, module in root.named_modules():
        if not name or (skip is not None and name.startswith(skip)):
            continue
        wrapper = isinstance(module, LoraLayerBase) or hasattr(module, "base_layer")
        if wrapper:
            skip = name + "."  # named_modules() is pre-order: the inside follows directly
        linear = is_linear(module) or (wrapper and not isinstance(module, LoraEmbedding))
        found.append((f"{prefix}.{name}" if prefix else name, module, linear))
    return found


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of a linear layer, also inside other methods' wrappers."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(out_f), int(in_f)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    if hasattr(module, "base_layer"):  # e.g. a bottleneck adapter around the layer
        return layer_dims(module.base_layer)
    out_f, in_f = module.weight.shape
    return int(out_f), int(in_f)
