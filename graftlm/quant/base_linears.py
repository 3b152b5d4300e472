"""Model-wide swaps of linear layers to and from 4 bits (QLoRA's base).

`quantize_model_linears` turns each plain linear layer into a `Q4GridLinear` where its weight
already lies on a 4-bit grid (`graftlm.quant.q4_grid`: kept exactly) and into an `NF4Linear`
otherwise; `LinearsToFourBit` does the same while a model's weights are read from its files, so
the full-precision linear weights are never resident (`load_model(..., quantize="nf4")`);
`dequantize_model_linears` turns them back into plain layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graftlm.kernels.small_batch_linear import is_plain_linear
from graftlm.quant.nf4 import quantize_nf4
from graftlm.quant.nf4_linear import NF4Linear
from graftlm.quant.q4_grid import Q4GridLinear, Q4GridTensor, find_q4_grid

__all__ = ["LinearsToFourBit", "dequantize_model_linears", "quantize_model_linears"]


def four_bit_layer(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid: Q4GridTensor | None,
    *,
    compute_dtype: torch.dtype | None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> NF4Linear:
    """The 4-bit layer for linear layer `name`'s weight: a `Q4GridLinear` on `grid` where one is
    given (the weight's own 4-bit values, kept exactly), else an `NF4Linear` of `weight` as it is
    (its dtype is the one NF4 rounds from).

    Raises:
        ValueError: naming the layer: a grid of another shape, or a weight NF4 cannot take.
    """
    try:
        if grid is not None:
            if grid.shape != weight.shape:
                raise ValueError(f"grid of shape {tuple(grid.shape)} for a weight of "
                                 f"{tuple(weight.shape)}")  # fmt: skip
            return Q4GridLinear(grid, bias, compute_dtype=compute_dtype)
        q = quantize_nf4(weight.detach(), blocksize, double_quant)
        return NF4Linear.from_nf4(q, bias, compute_dtype=compute_dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _targets(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """Names of the plain linear layers to quantize: not named (in full or by their last
    component) in `skip`."""
    skip = set(skip)
    return [
        name
        for name, module in model.named_modules()
        if is_plain_linear(module) and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]


class LinearsToFourBit:
    """Quantizes a model's linear layers one by one as a streamed load reads their weights
    (`graftlm.models.weights.load_weights_streamed`'s `take`): called with each tensor read from
    the files, in full precision, it replaces the layer whose weight it is by its 4-bit form and
    says so (True), and the load skips the copy into the layer's own weight, whose pages, never
    written, never become resident. A QLoRA run on a bf16 base so peaks below the base's size in
    bf16 instead of above it (bench/results/qlora_speed.txt).

    The layers are the ones `quantize_model_linears` would make after a full load, bit for bit:

    - `look_for_grids`: try each weight's own 4-bit grid (`find_q4_grid`) before NF4, as
      `quantize_model_linears` does on an fp32 base, or as `grids_in_files` reads them for a
      GGUF conversion loaded in bf16;
    - `stop_at_first_miss`: a model whose first linear weight is off a grid has none
      (`grids_in_files`' rule: the other weights are not searched);
    - an NF4 layer quantizes the weight cast to the layer's dtype first (the weight a full
      load would have held).

    A bias keeps its own Parameter (the load may copy it before or after the weight).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        look_for_grids: bool,
        stop_at_first_miss: bool,
        skip: Iterable[str] = ("lm_head",),
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.look_for_grids, self.stop_at_first_miss = look_for_grids, stop_at_first_miss
        self.compute_dtype = compute_dtype
        self.layers = {f"{name}.weight": name for name in _targets(model, skip)}
        self.replaced: list[str] = []

    def __call__(self, key: str, tensor: torch.Tensor) -> bool:
        name = self.layers.get(key)
        if name is None:
            return False
        linear = self.model.get_submodule(name)
        grid = find_q4_grid(tensor) if self.look_for_grids else None
        if grid is None and self.stop_at_first_miss and not self.replaced:
            self.look_for_grids = False
        weight = tensor if grid is not None else tensor.to(linear.weight.dtype)
        layer = four_bit_layer(name, weight, None, grid, compute_dtype=self.compute_dtype)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)
        self.replaced.append(name)
        return True


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
    # names only: a list of the modules would keep every full-precision weight alive until the
    # last layer is quantized, all of them beside all the 4-bit layers (a float32 QLoRA load
    # peaked 0.24 GB higher in some runs); here each weight is freed once its layer is replaced
    targets = _targets(model, skip)
    replaced, params, before, after, on_grid = [], 0, 0, 0, 0
    for name in targets:
        linear = model.get_submodule(name)
        grid = find_q4_grid(linear.weight) if grids is None else grids.get(name)
        layer = four_bit_layer(
            name, linear.weight, None if linear.bias is None else linear.bias.detach(), grid,
            compute_dtype=compute_dtype, blocksize=blocksize, double_quant=double_quant,
        )  # fmt: skip
        on_grid += grid is not None
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
