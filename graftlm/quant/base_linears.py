"""Model-wide swaps of linear layers to and from 4 bits (QLoRA's base).

`quantize_model_linears` turns each plain linear layer into a `Q4GridLinear` where its weight
already lies on a 4-bit grid (`graftlm.quant.q4_grid`: kept exactly) and into an `NF4Linear`
otherwise; `dequantize_model_linears` turns them back into plain layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graftlm.kernels.small_batch_linear import is_plain_linear
from graftlm.quant.nf4_linear import NF4Linear
from graftlm.quant.q4_grid import Q4GridLinear, Q4GridTensor, find_q4_grid

__all__ = ["dequantize_model_linears", "quantize_model_linears"]


def quantize_model_linears(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    grids: dict[str, Q4GridTensor] | None = None,
) -> dict[str, Any]:
    """Replace every `nn.Linear` of `model` by a 4-bit layer, in place: a `Q4GridLinear` where
    the weight already lies on a 4-bit grid (a GGUF Q4_1 base: kept exactly, not rounded again),
    else an `NF4Linear`.

    Only modules whose type is exactly `nn.Linear` are replaced: embeddings, norms, and layers
    already wrapped (e.g. by LoRA) are left alone. A module is skipped when its full name or its
    last name component is in `skip` (the output head by default, which is often tied to the
    embedding).

    Args:
        model: any module.
        skip: module names or name suffixes (last component) to keep in full precision.
        compute_dtype: matmul dtype of the new layers (None: the input's dtype).
        blocksize: values per NF4 scale.
        double_quant: 8-bit double quantization of the scales.
        grids: `{layer name: its 4-bit grid}` where the caller has found them (in the model's
            files: `graftlm.adapters.base_model.grids_in_files`), the other layers getting NF4;
            None: each weight in memory is looked at (`find_q4_grid`).

    Returns:
        Summary dict: `replaced` (module names), `count`, `params` (quantized weights),
        `kept_on_grid` (how many of them were already 4-bit and kept so), `bytes_before` (those
        weights at their original dtype), `bytes_after` (their 4-bit form, codes + all scales),
        `bytes_per_param` (`bytes_after / params`).
    """
    skip = set(skip)
    # names only: a list of the modules would keep every full-precision weight alive until the
    # last layer is quantized, all of them beside all the 4-bit layers (a float32 QLoRA load
    # peaked 0.24 GB higher in some runs); here each weight is freed once its layer is replaced
    targets = [
        name
        for name, module in model.named_modules()
        if is_plain_linear(module) and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]
    replaced, params, before, after, on_grid = [], 0, 0, 0, 0
    for name in targets:
        linear = model.get_submodule(name)
        grid = find_q4_grid(linear.weight) if grids is None else grids.get(name)
        if grid is not None:
            if grid.shape != linear.weight.shape:
                raise ValueError(f"{name}: grid of shape {tuple(grid.shape)} for a weight of "
                                 f"{tuple(linear.weight.shape)}")  # fmt: skip
            bias = None if linear.bias is None else linear.bias.detach()
            layer = Q4GridLinear(grid, bias, compute_dtype=compute_dtype)
            on_grid += 1
        else:
            layer = NF4Linear.from_linear(
                linear, compute_dtype=compute_dtype, blocksize=blocksize, double_quant=double_quant
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced.append(name)
        params += linear.weight.numel()
        before += linear.weight.numel() * linear.weight.element_size()
        after += layer.quantized().nbytes()
        del linear, layer, grid  # the last references to the full-precision weight
    return {
        "replaced": replaced,
        "count": len(replaced),
        "params": params,
        "kept_on_grid": on_grid,
        "bytes_before": before,
        "bytes_after": after,
        "bytes_per_param": after / params if params else float("nan"),
    }


def dequantize_model_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every remaining 4-bit layer (`NF4Linear`, `Q4GridLinear`) by a plain `nn.Linear`
    holding its dequantized weight.

    Used when writing a merged QLoRA model: layers without an adapter still hold 4-bit codes,
    which a plain transformers checkpoint cannot express.

    Returns:
        The number of layers replaced.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) in (NF4Linear, Q4GridLinear):
            plain = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype
            )
            with torch.no_grad():
                plain.weight.copy_(module.dequantized_weight(torch.float32).to(dtype))
                if module.bias is not None:
                    plain.bias.copy_(module.bias.to(dtype))
            plain.requires_grad_(False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
            replaced += 1
    return replaced
