"""A base that is already 4-bit: weights found on a 4-bit affine grid, kept on it for QLoRA.

The built-in model is a GGUF Q4_1 file: every linear weight is stored in blocks of 32 values,
each block `m + d * q` with 4-bit codes `q` and fp16 `d`, `m`. Loaded, those weights are floats
that sit exactly on their blocks' grids. Rounding them again to NF4 for QLoRA stacks a second
4-bit rounding error on the first (bench/results/double_rounding.txt) and costs held-out accuracy
(bench/results/zoo.md). `find_q4_grid` recovers the codes, scales and offsets from the float
weight and checks that they give back every value bit for bit; `Q4GridTensor` holds them in
about as little memory as NF4 (4-bit codes, one fp32 scale and offset per 32 values: 0.75 bytes
a weight against NF4's 0.52) and dequantizes to the very same values, so a QLoRA base kept on
its grid computes what a LoRA base does. A weight not on such a grid (any full-precision model)
gets None, and QLoRA rounds it to NF4 as before (`graftlm.quant.nf4_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graftlm.kernels import nf4_dequant
from graftlm.quant.nf4_linear import NF4Linear

GRID_BLOCK = 32
"""Values per block of the grids recognised (GGUF's Q4_1 blocks)."""

LEVELS = torch.arange(16, dtype=torch.float32)
"""The code values: the kernel's `levels[code] * scale (+ offset)` is then `d * q + m`."""


@dataclass
class Q4GridTensor:
    """A weight as 4-bit codes on per-block affine grids: `value = scale[b] * code + offset[b]`,
    products and sums in fp32 (the order GGUF's own dequantization uses).

    Attributes:
        packed: uint8 `(numel / 2,)`, two codes per byte, the first in the high nibble (as NF4).
        scale: fp32 `(numel / 32,)`, each an fp16 value.
        offset: fp32 `(numel / 32,)`, each an fp16 value.
        shape: the weight's shape.
        dtype: the weight's dtype before it was packed.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = GRID_BLOCK

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight, `scale * code + offset` in fp32, then cast once to `dtype` (None: the
        original dtype); into `out` (a contiguous tensor of `numel` values) where given. The C
        kernel of `graftlm.kernels.nf4_dequant` does it in one pass where it applies; the torch
        path gives the same bits."""
        dtype = self.dtype if dtype is None else dtype
        flat = None if out is None else out.view(-1)
        values = nf4_dequant.dequantize(
            self.packed, LEVELS, self.numel, self.blocksize, dtype,
            absmax=self.scale, block_offsets=self.offset, out=flat,
        )  # fmt: skip
        if values is not None:
            return values.view(self.shape)
        codes = torch.stack((self.packed >> 4, self.packed & 15), dim=1).view(-1, self.blocksize)
        # two fp32 roundings, as the kernel and GGUF's dequantization: the product, then the sum
        fp32 = codes.float().mul_(self.scale[:, None]).add_(self.offset[:, None])
        if out is None:
            return fp32.to(dtype).view(self.shape)
        return out.view(-1, self.blocksize).copy_(fp32).view(self.shape)


def find_q4_grid(weight: torch.Tensor) -> Q4GridTensor | None:
    """The weight's own 4-bit grid, if every block of 32 values lies exactly on one; else None.

    Each block's offset is its smallest value and its scale the spread over 15, both rounded to
    fp16 (how GGUF's Q4_1 stores them); each code is the nearest step. The grid is accepted only
    if `scale * code + offset` rebuilds every value of the weight exactly (in fp32), so a weight
    that merely looks coarse is never changed.

    Args:
        weight: an fp32 tensor whose last dimension is a multiple of 32 (blocks never straddle
            rows); any other is None.
    """
    # fp32 only: a grid's values (fp32 sums of fp16 products) rarely survive a bf16 or fp16 cast
    if weight.dtype != torch.float32 or weight.dim() == 0 or weight.shape[-1] % GRID_BLOCK:
        return None
    values = weight.detach().float().reshape(-1, GRID_BLOCK)
    if not torch.isfinite(values).all():
        return None
    low, high = values.min(dim=1).values, values.max(dim=1).values
    offset = low.half().float()
    scale = ((high - low) / 15).half().float()
    if not torch.equal(offset, low):
        return None
    steps = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    codes = torch.round((values - offset[:, None]) / steps).clamp_(0, 15)
    rebuilt = codes * scale[:, None] + offset[:, None]
    if not torch.equal(rebuilt, values):
        return None
    codes = codes.to(torch.uint8).view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return Q4GridTensor(packed.contiguous(), scale, offset, weight.shape, weight.dtype)


class Q4GridLinear(NF4Linear):
    """A frozen linear layer whose weight is kept on its own 4-bit grid (`Q4GridTensor`): the
    same layer as `NF4Linear` (matrix products, dtype rules, LoRA on top), with another packing.

    `find_q4_grid` says whether a weight has a grid.
    """

    fp32_buffers = ("weight_scale", "weight_offset")

    def __init__(
        self, grid: Q4GridTensor, bias: torch.Tensor | None = None, *,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)  # not NF4Linear's buffers: this layer holds a grid
        if len(grid.shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out, in), got shape {tuple(grid.shape)}")
        self.out_features, self.in_features = grid.shape
        self.compute_dtype, self.blocksize = compute_dtype, grid.blocksize
        self.weight_dtype = grid.dtype
        self.register_buffer("weight_packed", grid.packed)
        self.register_buffer("weight_scale", grid.scale)
        self.register_buffer("weight_offset", grid.offset)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    @property
    def nf4(self):
        raise AttributeError("a Q4GridLinear holds a 4-bit grid, not NF4 codes: use quantized()")

    def quantized(self) -> Q4GridTensor:
        """The packed weight the matrix products dequantize (codes, scales, offsets)."""
        return Q4GridTensor(
            self.weight_packed, self.weight_scale, self.weight_offset,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, grid=4-bit affine per {self.blocksize}, "
            f"compute_dtype={self.compute_dtype}"
        )
