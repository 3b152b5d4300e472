"""`LoraNF4Linear`: LoRA adapters over a frozen NF4 base layer (QLoRA).

Kept apart from `graftlm.quant` so that quantization never imports the LoRA method: this module
imports `graftlm.quant.nf4_linear.NF4Linear` and subclasses `LoraLinear`, not the other way round.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from graftlm.errors import GraftError
from graftlm.kernels import lora_update
from graftlm.methods.lora.layer import LoraLayerBase, LoraLinear
from graftlm.quant.nf4_linear import NF4Linear, dequantized

__all__ = ["LoraNF4Linear"]


class LoraNF4Linear(LoraLinear):
    """LoRA over a frozen NF4 base (QLoRA): `y = NF4Linear(x) + sum_a scale_a * B_a(A_a(x))`.

    The NF4 layer is kept whole as `base_layer` (PEFT's name); its bias is also exposed as
    `bias`, the same Parameter, so bias training and PEFT's `...base_layer.bias` keys work as for
    `LoraLinear`. `weight` is the packed uint8 codes, like bitsandbytes' `Linear4bit.weight`:
    good for `.device` and identity checks, not for arithmetic.

    Merging cannot write into 4-bit codes without re-rounding the update away, so a merge keeps
    `dequant(W) + sum of merged deltas` as an fp32 `merged_weight` (full size, while merged);
    unmerging the last adapter drops it, giving back the exact NF4 base. `to_plain()` returns an
    `nn.Linear` with that full-precision weight, so `merge_and_unload` yields a plain model.

    Args:
        base: the NF4Linear to adapt (reused, not copied).

    Shapes: input `(..., in_features)`, output `(..., out_features)`.
    """

    DENSE_BASE = False  # the weight is NF4 codes: the decode-step kernel cannot read it

    def __init__(self, base: NF4Linear) -> None:
        LoraLayerBase.__init__(self)
        self.fan_in_fan_out = False
        self.bias = base.bias  # registered before base_layer: named_parameters() says `bias`
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_class = nn.Linear
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.register_buffer("merged_weight", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight_packed

    def _fused_update_weight(self, x: torch.Tensor, name: str):
        """Where a CPU training step runs this layer as `kernels/lora_update.py`'s one
        autograd function (one adapter, plain LoRA without dropout, nothing merged, a product
        in x's dtype): the 4-bit weight as a function that dequantizes it into the reused
        buffer, called for each product as `_NF4Matmul` does; else None."""
        fused = (
            self.merged_weight is None
            and self.base_layer.compute_dtype in (None, x.dtype)
            and self._plain_lora_without_dropout([name])  # in training: no dropout module
            and lora_update.applies(x, None, self.bias)
        )
        if not fused:
            return None
        return functools.partial(dequantized, self.base_layer.quantized(), x.dtype)

    def add(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        """Create adapter `name`; as `LoraLinear.add`, except that PiSSA is refused.

        Raises:
            GraftError: `init="pissa"` (it rewrites the base weight, which is 4-bit here), or
                the name exists.
        """
        if init == "pissa":
            raise GraftError(
                "init='pissa' rewrites the base weight, which is NF4 here; use init='kaiming' or "
                "'gaussian' with quantize='nf4', or PiSSA without quantization"
            )
        super().add(name, rank, scaling, dropout, init)

    def _weight_for_merge(self) -> torch.Tensor:
        """An fp32 copy of the base (with the updates merged so far): NF4 stays as it is."""
        if self.merged_weight is not None:
            return self.merged_weight
        return self.base_layer.dequantized_weight(torch.float32)

    def _store_merged(self, merged: torch.Tensor) -> None:
        self.merged_weight = merged

    def unmerge(self, names: list[str] | None = None) -> None:
        """Take merged updates out again; with none left the exact NF4 base is used again."""
        names = list(reversed(self.merged_adapters)) if names is None else names
        for name in names:
            if name not in self.merged_adapters:
                continue
            self.merged_adapters.remove(name)
            if self.merged_adapters:
                self.merged_weight = self.weight_without(name, self.merged_weight)
            else:
                self.lora_magnitude_vector.merged_scale.pop(name, None)
                self.merged_weight = None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone (with any merged updates): `x @ W.T + b`."""
        return self.base_layer.linear_with(x, self.merged_weight)

    def to_plain(self) -> nn.Module:
        """An `nn.Linear` holding `dequant(W)` plus merged updates, in the base's original dtype."""
        weight = self.merged_weight
        if weight is None:
            weight = self.base_layer.dequantized_weight(torch.float32)
        dtype = self.base_layer.weight_dtype
        plain = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(weight)
        plain.weight.requires_grad_(False)
        if self.bias is not None:
            plain.bias = self.bias
        return plain
