"""LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, in PEFT's layout.

::

        x ──► conv W (frozen, [out, in, *k]) ───────────────────────────┐
        │                                                                (+) ──► y
        └──► dropout ──► A: conv [r, in, *k] ──► B: 1x1 conv [out, r, 1..] ┘ x scale

A has the base's kernel, stride, padding, dilation and padding mode and produces r channels, so
its output has the base output's spatial shape; B mixes those r channels per position. The
update is therefore a conv whose weight is `ΔW[o, i, *k] = scale · Σ_r B[o, r] · A[r, i, *k]`,
which is what merging adds to W (PEFT computes the same tensor as a conv of A by B). The saved
keys and shapes are PEFT's (`...conv1.lora_A.weight` `[r, in, *k]`, `...lora_B.weight`
`[out, r, 1, ...]`), so PEFT and diffusers load them.

PEFT 0.21 builds A without the base's dilation: on a dilated conv its A sees another receptive
field than W (usually a shape error), and its merge does not equal its unmerged output. graftlm
gives A the dilation, so merge equals unmerged; on undilated convs (every diffusers UNet conv)
both compute the same numbers. Grouped convs (`groups > 1`) are refused: PEFT gives B the groups
and cannot merge them, a layout not worth copying.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.errors import GraftError
from graftlm.methods.lora.layer import LoraLayerBase

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the functional conv for a weight of that many dimensions ([out, in, *k])
_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def is_conv(module: nn.Module) -> bool:
    """A plain N-d convolution LoRA can adapt (not a transposed one)."""
    return isinstance(module, CONV_TYPES)


class LoraConv(LoraLayerBase):
    """LoRA on a 1-, 2- or 3-d convolution, keeping the base's `weight`/`bias` Parameters.

    Args:
        base: the `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` to adapt; its Parameters are reused.

    Raises:
        GraftError: a grouped conv (`groups > 1`).

    Shapes: input `(batch, in_channels, *spatial)`, output `(batch, out_channels, *spatial')`.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if base.groups != 1:
            raise GraftError(
                f"LoRA on a grouped {type(base).__name__} (groups={base.groups}) is not supported; "
                "leave this layer out of the targets"
            )
        self.weight = base.weight
        self.bias = base.bias
        self.base_class = type(base)
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self.padding_mode = base.padding_mode
        # what nn.ConvNd pads with for a padding_mode other than "zeros" (reflect, circular, ...)
        self.mode_padding = base._reversed_padding_repeated_twice
        self.conv_fn = _CONV_FN[base.weight.dim()]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def _adapter_containers(self):
        return [self.lora_A, self.lora_B, self.lora_dropout]

    def add(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        """Create adapter `name` of the given rank; `init` is kaiming or gaussian (PEFT's)."""
        if name in self.ranks:
            raise GraftError(f"adapter {name!r} already exists on this layer")
        if init not in ("kaiming", "gaussian"):
            raise GraftError(
                f"init={init!r} is not defined for conv layers; use 'kaiming' or 'gaussian', "
                "or target linear layers only"
            )
        device = self.weight.device
        ones = (1,) * len(self.kernel_size)
        lora_a = self.base_class(
            self.in_features,
            rank,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=False,
            padding_mode=self.padding_mode,
            device=device,
            dtype=torch.float32,
        )
        lora_b = self.base_class(
            rank, self.out_features, ones, ones, bias=False, device=device, dtype=torch.float32
        )
        if init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranks[name] = rank
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """The fp32 update `[out, in, *k]`: scale · Σ_r B[o, r] A[r, i, *k]."""
        lora_a = self.lora_A[name].weight.detach().float()  # [r, in, *k]
        lora_b = self.lora_B[name].weight.detach().float().flatten(1)  # [out, r]
        delta = (lora_b @ lora_a.flatten(1)).view(self.weight.shape)
        return delta * self.scaling[name]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen conv alone."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self.mode_padding, mode=self.padding_mode)
            return self.conv_fn(x, self.weight, self.bias, self.stride, 0, self.dilation)
        return self.conv_fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.disabled:
            return result
        return self._add_adapter_outputs(result, x)

    def to_plain(self) -> nn.Module:
        """A plain conv of the base's class holding the (possibly merged) weight and bias."""
        plain = self.base_class(
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return (
            f"{self.base_class.__name__} in={self.in_features}, out={self.out_features}, "
            f"kernel={self.kernel_size}, adapters={self.ranks}"
        )
