"""`NF4Linear`: a frozen linear layer whose weight is stored in NF4.

Split from `graftlm.quant.nf4` (the NF4 format itself) so the format stays small. `NF4Linear`
computes `x @ dequant(W).T` with a custom autograd function that dequantizes again in backward,
so the full-precision weight lives only for one matmul. `graftlm.quant.q4_grid.Q4GridLinear`
is the same layer over a weight kept on its own 4-bit grid; `graftlm.quant.base_linears` swaps
a model's linear layers to and from these layers in place.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from graftlm.quant.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, NF4Tensor, quantize_nf4

__all__ = ["NF4Linear"]


class _NF4Matmul(torch.autograd.Function):
    """`x @ dequant(W).T` that keeps nothing large for backward: W is dequantized again there.
    `q` is any packed weight with `dequantize(dtype, out=)`, `numel` and `packed` (NF4Tensor,
    Q4GridTensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype
        return nn.functional.linear(x.to(dtype), dequantized(q, dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantized(ctx.q, ctx.dtype)  # (out, in)
            grad_x = (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None


class _Scratch(threading.local):
    """This thread's dequantization buffers: one flat buffer per dtype and device, as large as
    the largest weight dequantized into it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


_scratch = _Scratch()


def dequantized(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q.dequantize(dtype)`, into a buffer this thread reuses for every weight, where nothing
    can keep the result (autograd off: inside `_NF4Matmul`, or inference).

    The weight lives for one matrix product. A fresh tensor for each would be a large block
    allocated and freed for every layer, pass and backward: with glibc serving such blocks from
    their own mappings (`--low-memory`) each costs page faults, and on its heap they leave holes
    that raise a run's peak (docs/measurements.md, "QLoRA's recipe"). The buffer is the size of
    the largest weight, which a fresh tensor would take at its peak anyway.
    """
    if torch.is_grad_enabled():  # the product might save the weight: give it its own tensor
        return q.dequantize(dtype)
    key, n = (dtype, q.packed.device), q.numel
    buffer = _scratch.buffers.get(key)
    if buffer is None or buffer.numel() < n:
        _scratch.buffers[key] = None  # free the smaller one before allocating the larger
        buffer = _scratch.buffers[key] = torch.empty(n, dtype=dtype, device=q.packed.device)
    return q.dequantize(dtype, out=buffer[:n])


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: `y = x @ dequant(W).T + b`.

    The weight lives in buffers (so `state_dict`, `load_state_dict` and `.to(device)` work, and
    optimizers never see it); `model.to(torch.bfloat16)` casts the bias but leaves the fp32 scales
    alone. Each call dequantizes into a temporary; backward dequantizes again instead of keeping it.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to keep a (frozen) bias.
        compute_dtype: dtype of the matmul; None means the input's dtype. Inside an autocast
            region the autocast dtype wins.
        blocksize: values per NF4 scale.
        double_quant: whether the scales are 8-bit double-quantized.
        device: where to allocate the (empty) buffers.

    Shapes:
        input `(..., in_features)` -> output `(..., out_features)`, in the input's dtype (or the
        autocast dtype).
    """

    is_quantized_linear = True  # how graftlm.methods.lora.inject recognises a quantized base layer
    fp32_buffers = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.blocksize = compute_dtype, blocksize
        self.weight_dtype = torch.float32  # dtype of the weight before quantization
        n = in_features * out_features
        nb = -(-n // blocksize)
        self.register_buffer(
            "weight_packed", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device)
        )
        if double_quant:
            groups = -(-nb // NESTED_BLOCKSIZE)
            self.register_buffer("weight_absmax", torch.zeros(nb, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax_scale", torch.zeros(groups, device=device))
            self.register_buffer("weight_absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(nb, device=device))
            self.register_buffer("weight_absmax_scale", None)
            self.register_buffer("weight_absmax_offset", None)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> NF4Linear:
        """Quantize an `nn.Linear` (its weight and bias are copied, the original is untouched).

        Raises:
            ValueError: as `quantize_nf4` (bad dtype, NaN/inf weights).
        """
        q = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_nf4(q, bias, compute_dtype=compute_dtype)

    @classmethod
    def from_nf4(
        cls,
        q: NF4Tensor,
        bias: torch.Tensor | None = None,
        *,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> NF4Linear:
        """Wrap an existing 2-D NF4Tensor `(out_features, in_features)` and optional bias `(out,)`.

        Raises:
            ValueError: if `q` is not 2-D or the bias has the wrong length.
        """
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out, in), got shape {tuple(q.shape)}")
        out_f, in_f = q.shape
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        layer = cls(
            in_f,
            out_f,
            bias is not None,
            compute_dtype=compute_dtype,
            blocksize=q.blocksize,
            double_quant=q.double_quant,
            device="meta",  # placeholders only; replaced by q's tensors below
        )
        layer.weight_dtype = q.dtype
        layer.weight_packed = q.packed
        layer.weight_absmax = q.absmax
        layer.weight_absmax_scale = q.absmax_scale
        layer.weight_absmax_offset = q.absmax_offset
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return layer

    @property
    def nf4(self) -> NF4Tensor:
        """The quantized weight as an NF4Tensor (sharing this layer's buffers)."""
        return NF4Tensor(
            self.weight_packed,
            self.weight_absmax,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
        )

    def quantized(self) -> NF4Tensor:
        """The packed weight the matrix products dequantize (here the NF4 codes)."""
        return self.nf4

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh full-precision copy of the weight, `(out_features, in_features)`.

        Args:
            dtype: output dtype; None means the dtype the weight had before quantization.
        """
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_with(x, None)

    def linear_with(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        # `weight` given: use it (a merged full-precision weight) with this layer's dtype rules
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.compute_dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if weight is None:
                out = _NF4Matmul.apply(x, self.quantized(), dtype)
            else:
                out = nn.functional.linear(x.to(dtype), weight.to(dtype))
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out if autocast else out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer; the scales must stay fp32 or dequantized
        # values change. Keep the device move, undo the dtype cast.
        kept = self.fp32_buffers
        before = {k: self._buffers[k] for k in kept if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        dq = self.weight_absmax_scale is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, double_quant={dq}, "
            f"compute_dtype={self.compute_dtype}"
        )
