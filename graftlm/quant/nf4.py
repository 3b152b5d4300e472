"""NF4 4-bit base weights with double-quantized scales (the QLoRA base), in plain PyTorch.

A weight is flattened and cut into blocks of 64 values. Each block keeps one scale, its absolute
maximum, and each value becomes the index (0..15) of the nearest of 16 NormalFloat levels::

    w[i] ~= NF4_CODE[code[i]] * absmax[i // 64]

Two codes share a byte, the first value of each pair in the high nibble. With double quantization
the fp32 block scales are themselves compressed: their mean is subtracted, and the centred scales
are quantized to 8 bits in groups of 256 with bitsandbytes' dynamic map, keeping one fp32 scale per
group::

    absmax[j] = DYNAMIC_CODE[absmax_q[j]] * absmax_scale[j // 256] + absmax_offset

That is 0.5 + 1/64 + 4/(64 * 256) ~= 0.516 bytes per weight. The arithmetic (rounding, ties, the
padding of the last block, the dtype of every product) mirrors bitsandbytes 0.50 on CPU, so packed
codes, scales and dequantized tensors are bit-identical to `bitsandbytes.functional.quantize_4bit(
w, quant_type="nf4", compress_statistics=True)` and `dequantize_4bit`. bitsandbytes is not imported.

`NF4Linear` holds such a weight as buffers and computes `x @ dequant(W).T` with a custom autograd
function that dequantizes again in backward, so the full-precision weight lives only for the length
of one matmul. `LoraNF4Linear` puts LoRA adapters on top (QLoRA); `quantize_model_linears` swaps a
model's linear layers for `NF4Linear` in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftlm.errors import GraftError
from graftlm.kernels.small_batch_linear import is_plain_linear
from graftlm.methods.lora.layer import LoraLayerBase, LoraLinear

__all__ = [
    "NF4_CODE",
    "LoraNF4Linear",
    "NF4Linear",
    "NF4Tensor",
    "dequantize_nf4",
    "dynamic_code",
    "quantize_model_linears",
    "quantize_nf4",
]

# The NormalFloat levels of QLoRA, exactly as bitsandbytes stores them (fp32, sorted).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Block sizes bitsandbytes accepts; we accept the same so every NF4Tensor converts to a QuantState.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # group size of the double quantization (fixed in bitsandbytes)

_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _cache:
        _cache[key] = build().to(device)
    return _cache[key]


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map bitsandbytes uses to quantize scales (`create_dynamic_map()`).

    Args:
        device: where the map should live.

    Returns:
        fp32 tensor of shape `(256,)`, sorted ascending, from -0.99297 to 1.0.
    """
    return _cached("dynamic", torch.device(device), _build_dynamic_code)


def _build_dynamic_code() -> torch.Tensor:
    # Same operations, in the same dtypes, as bitsandbytes.functional.create_dynamic_map(signed=True,
    # max_exponent_bits=7, total_bits=8), so every level is the identical fp32 number.
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nf4_bounds(device: torch.device) -> torch.Tensor:
    # Midpoints between neighbouring levels, in fp32; `bucketize(right=False)` sends a value that
    # sits exactly on a midpoint to the lower level, as bitsandbytes does.
    return _cached("nf4_bounds", device, lambda: (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)


def _nf4_pair_lut(device: torch.device) -> torch.Tensor:
    # byte -> (level of high nibble, level of low nibble), each pair viewed as one int64 so that a
    # single 1-D index_select unpacks and looks up both nibbles (several times faster than shifts
    # plus a gather, or an embedding lookup, on CPU). Integer view: the bits are copied untouched.
    def build():
        b = torch.arange(256)
        pairs = torch.stack([NF4_CODE[b >> 4], NF4_CODE[b & 0xF]], dim=1)  # (256, 2) fp32
        return pairs.view(torch.int64).view(256)

    return _cached("nf4_pairs", device, build)


def _dynamic_index_lut(device: torch.device) -> torch.Tensor:
    # bitsandbytes' CPU kernel does not search the 256 levels per value: it maps the normalised
    # value to one of 65536 evenly spaced bins and looks the bin up in a table built from the bin
    # centres. Near a midpoint between levels this can differ from the true nearest level, so we
    # build the same table to stay bit-exact.
    def build():
        code = _build_dynamic_code()
        mid = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
        return torch.bucketize(centres, mid, right=False).to(torch.uint8)  # #midpoints < centre

    return _cached("dynamic_lut", device, build)


@dataclass(repr=False)
class NF4Tensor:
    """A weight in NF4: packed 4-bit codes plus per-block scales (double-quantized or fp32).

    Attributes:
        packed: uint8 `(ceil(n / 2),)`, two codes per byte, element `2k` in the high nibble of byte
            `k`; when `n` is odd the last low nibble is padding (code 7, the level 0.0).
        absmax: per-block scales, `(ceil(n / blocksize),)`: uint8 codes into `dynamic_code()` with
            double quantization, else fp32 scales.
        absmax_scale: fp32 `(ceil(n_blocks / 256),)`, the scale of each group of 256 block codes,
            or None without double quantization.
        absmax_offset: fp32 0-d tensor, the mean that was subtracted from the block scales before
            they were quantized, or None without double quantization.
        shape: the original weight's shape (`n` is its number of elements).
        dtype: the original weight's dtype (the default dtype of `dequantize`).
        blocksize: values per scale (64 in QLoRA).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype = torch.float32
    blocksize: int = 64

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, nbytes={self.nbytes()}, device={self.packed.device})"
        )

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized to 8 bits."""
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        """Number of quantized values, `prod(shape)`."""
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of every block, `(ceil(n / blocksize),)`, decoded when double-quantized."""
        if not self.double_quant:
            return self.absmax
        nb = self.absmax.numel()
        code = dynamic_code(self.absmax.device)[self.absmax.long()]  # (nb,)
        groups = self.absmax_scale.numel()
        code = nn.functional.pad(code, (0, groups * NESTED_BLOCKSIZE - nb))
        scaled = (code.view(groups, NESTED_BLOCKSIZE) * self.absmax_scale[:, None]).view(-1)[:nb]
        return scaled + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rebuild the weight: `NF4_CODE[code] * absmax[block]` in fp32, then cast once.

        Args:
            dtype: output dtype; None means the original weight's dtype.

        Returns:
            Tensor of `self.shape` and `dtype`, on the device of `packed`.
        """
        dtype = self.dtype if dtype is None else dtype
        n, bs = self.numel, self.blocksize
        absmax = self.block_absmax()
        lut = _nf4_pair_lut(self.packed.device)
        values = lut.index_select(0, self.packed.int()).view(torch.float32)  # (2 * ceil(n/2),)
        # fp32 products, rounded once into the output dtype, as bitsandbytes computes them;
        # `out=` fuses the cast into the multiply.
        out = torch.empty(n, dtype=dtype, device=self.packed.device)
        full = n - n % bs
        torch.mul(
            values[:full].view(-1, bs), absmax[: full // bs, None], out=out[:full].view(-1, bs)
        )
        if full < n:  # partial last block
            torch.mul(values[full:n], absmax[-1], out=out[full:])
        return out.view(self.shape)

    def nbytes(self) -> int:
        """Bytes the quantized weight occupies: codes, block scales, group scales and offset."""
        tensors = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on `device` (codes and scales keep their dtypes)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(
            move(self.packed),
            move(self.absmax),
            move(self.absmax_scale),
            move(self.absmax_offset),
            self.shape,
            self.dtype,
            self.blocksize,
        )

    def to_bnb(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The packed weight and quant state in bitsandbytes' layout, without importing it.

        Returns:
            `(weight, qs_dict)`: `weight` is uint8 `(ceil(n / 2), 1)` (the data of a
            `bnb.nn.Params4bit`), and `qs_dict` is what `QuantState.as_dict()` returns, so
            `QuantState.from_dict(qs_dict, device)` rebuilds bitsandbytes' state.
        """
        qs: dict[str, Any] = {
            "quant_type": "nf4",
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": NF4_CODE.to(self.packed.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": tuple(self.shape),
        }
        if self.double_quant:
            qs.update(
                nested_absmax=self.absmax_scale,
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_quant_map=dynamic_code(self.packed.device).clone(),
                nested_dtype="float32",
                nested_offset=self.absmax_offset.item(),
            )
        return self.packed.view(-1, 1), qs

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, qs_dict: dict[str, Any]) -> NF4Tensor:
        """Build from bitsandbytes' packed weight and quant-state fields.

        Args:
            weight: uint8 packed codes, any shape with `ceil(n / 2)` elements (bitsandbytes uses
                `(ceil(n / 2), 1)`).
            qs_dict: `QuantState.as_dict()`, or the state-dict entries bitsandbytes saves next to
                a 4-bit weight (`absmax`, `quant_map`, `nested_absmax`, `nested_quant_map` and the
                packed `quant_state.bitsandbytes__nf4` tensor), with or without a key prefix.

        Returns:
            The equivalent NF4Tensor.

        Raises:
            ValueError: if the state is not NF4, a field is missing, or sizes do not agree.
        """
        import json

        qs = {k.split(".")[-1] if "bitsandbytes__" not in k else k: v for k, v in qs_dict.items()}
        for key in [k for k in qs if "bitsandbytes__" in k]:
            packed_meta = qs.pop(key)
            qs.update(json.loads(bytes(packed_meta.tolist()).decode("utf-8")))
        missing = [
            k for k in ("quant_type", "absmax", "blocksize", "dtype", "shape") if k not in qs
        ]
        if missing:
            raise ValueError(f"bitsandbytes quant state lacks {missing}; got keys {sorted(qs)}")
        if qs["quant_type"] != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {qs['quant_type']!r}")
        if "quant_map" in qs and not torch.equal(qs["quant_map"].cpu().float(), NF4_CODE):
            raise ValueError("quant_map differs from the NF4 levels; refusing to reinterpret codes")
        nested_map = qs.get("nested_quant_map")
        if nested_map is not None and not torch.equal(nested_map.cpu().float(), dynamic_code()):
            raise ValueError(
                "nested_quant_map is not bitsandbytes' dynamic map; cannot decode scales"
            )
        nested = "nested_absmax" in qs
        if nested and qs.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be 256, got {qs['nested_blocksize']!r}")
        device = weight.device
        packed = weight.reshape(-1)
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype
            packed = packed.view(torch.uint8)
        offset = None
        if nested:
            offset = torch.tensor(float(qs["nested_offset"]), dtype=torch.float32, device=device)
        q = cls(
            packed=packed,
            absmax=qs["absmax"].to(device),
            absmax_scale=qs["nested_absmax"].to(device, torch.float32) if nested else None,
            absmax_offset=offset,
            shape=torch.Size(qs["shape"]),
            dtype=getattr(torch, qs["dtype"]),
            blocksize=int(qs["blocksize"]),
        )
        _check_sizes(q)
        return q


def _check_sizes(q: NF4Tensor) -> None:
    n, nb = q.numel, -(-q.numel // q.blocksize)
    problems = []
    if q.packed.numel() != -(-n // 2):
        problems.append(f"packed has {q.packed.numel()} bytes, expected {-(-n // 2)}")
    if q.absmax.numel() != nb:
        problems.append(f"absmax has {q.absmax.numel()} entries, expected {nb}")
    want = torch.uint8 if q.double_quant else torch.float32
    if q.absmax.dtype != want:
        problems.append(f"absmax has dtype {q.absmax.dtype}, expected {want}")
    if q.double_quant and q.absmax_scale.numel() != -(-nb // NESTED_BLOCKSIZE):
        problems.append(
            f"nested_absmax has {q.absmax_scale.numel()} entries, expected {-(-nb // NESTED_BLOCKSIZE)}"
        )
    if problems:
        raise ValueError(
            f"inconsistent NF4 state for shape {tuple(q.shape)}: " + "; ".join(problems)
        )


def _quantize_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map quantization in groups of 256, as bitsandbytes' CPU kernel does it.

    Returns `(codes uint8 (n,), group absmax fp32 (ceil(n / 256),))`.
    """
    n, bs = x.numel(), NESTED_BLOCKSIZE
    groups = -(-n // bs)
    xg = nn.functional.pad(x, (0, groups * bs - n)).view(groups, bs)  # zeros leave the max alone
    absmax = xg.abs().amax(dim=1)
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scaled = (xg * inv[:, None]).clamp(-1.0, 1.0)
    # the kernel's bin index: uint16((v + 1) * 0.5 * 65535 + 0.5), truncated, in fp32
    bins = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_index_lut(x.device)[bins]
    codes[absmax == 0] = 0  # the kernel writes code 0 for an all-zero group
    return codes.view(-1)[:n], absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a weight to NF4, bit-identical to bitsandbytes' `quantize_4bit(quant_type="nf4")`.

    The tensor is flattened (row-major); blocks run across row boundaries and the last block may
    be partial. bf16/fp16 inputs are widened to fp32 first, exactly as bitsandbytes does.

    Args:
        w: weight of any shape with at least one element, dtype fp32, bf16 or fp16.
        blocksize: values per scale; one of 32, 64 (QLoRA), 128, ..., 4096.
        double_quant: quantize the block scales to 8 bits (bitsandbytes'
            `compress_statistics=True`); saves ~0.047 bytes per weight.

    Returns:
        The NF4Tensor, on `w`'s device, remembering `w.shape` and `w.dtype`.

    Raises:
        ValueError: on an unsupported dtype or blocksize, an empty tensor, or NaN/inf values.
    """
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantizes float32, bfloat16 or float16 weights, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()

    # Same ops, same order as bitsandbytes (backends/default/ops.py): full blocks are scaled by
    # the fp32 reciprocal of their absmax, the partial last block is divided by its absmax.
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).view(-1)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if not torch.isfinite(absmax).all():  # amax propagates NaN and inf: one check per block
        raise ValueError(
            f"weight of shape {tuple(w.shape)} contains NaN or inf; NF4 needs finite values"
        )
    if n % 2:
        scaled = nn.functional.pad(scaled, (0, 1))  # pads with 0.0 -> code 7
    codes = torch.bucketize(scaled, _nf4_bounds(flat.device), out_int32=True).to(torch.uint8)
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]  # first of each pair in the high nibble

    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    absmax_q, absmax_scale = _quantize_scales(absmax - offset)
    return NF4Tensor(packed, absmax_q, absmax_scale, offset, w.shape, w.dtype, blocksize)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild a weight from NF4, bit-identical to bitsandbytes' `dequantize_4bit`.

    Args:
        q: the quantized weight.
        dtype: output dtype (fp32, bf16, fp16); None means the original dtype.

    Returns:
        Tensor of `q.shape`.
    """
    return q.dequantize(dtype)


class _NF4Matmul(torch.autograd.Function):
    """`x @ dequant(W).T` that keeps nothing large for backward: W is dequantized again there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype
        return nn.functional.linear(x.to(dtype), q.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.q.dequantize(ctx.dtype)  # (out, in)
            grad_x = (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None


_FP32_BUFFERS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")


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

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh full-precision copy of the weight, `(out_features, in_features)`.

        Args:
            dtype: output dtype; None means the dtype the weight had before quantization.
        """
        return self.nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
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
                out = _NF4Matmul.apply(x, self.nf4, dtype)
            else:
                out = nn.functional.linear(x.to(dtype), weight.to(dtype))
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out if autocast else out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer; the scales must stay fp32 or dequantized
        # values change. Keep the device move, undo the dtype cast.
        before = {k: self._buffers[k] for k in _FP32_BUFFERS if self._buffers.get(k) is not None}
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

    def merge(self, names: list[str] | None = None) -> None:
        """Add the updates of `names` (default: active adapters) to an fp32 copy of the base.

        Raises:
            GraftError: the merged weight would contain NaN or inf (nothing changes then).
        """
        names = self.active_adapters if names is None else names
        for name in names:
            if name in self.merged_adapters or name not in self.ranks:
                continue
            base = self.merged_weight
            if base is None:
                base = self.base_layer.dequantized_weight(torch.float32)
            merged = base + self.delta_weight(name).to(base.device)
            if not torch.isfinite(merged).all():
                raise GraftError(f"merging adapter {name!r} would put NaN/inf into the base weight")
            self.merged_weight = merged
            self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Take merged updates out again; with none left the exact NF4 base is used again."""
        names = list(self.merged_adapters) if names is None else names
        for name in names:
            if name not in self.merged_adapters:
                continue
            self.merged_adapters.remove(name)
            if self.merged_adapters:
                self.merged_weight = self.merged_weight - self.delta_weight(name)
            else:
                self.merged_weight = None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone (with any merged updates): `x @ W.T + b`."""
        return self.base_layer._linear(x, self.merged_weight)

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


def quantize_model_linears(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, Any]:
    """Replace every `nn.Linear` of `model` by an `NF4Linear`, in place.

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

    Returns:
        Summary dict: `replaced` (module names), `count`, `params` (quantized weights),
        `bytes_before` (those weights at their original dtype), `bytes_after` (their NF4 form,
        codes + all scales), `bytes_per_param` (`bytes_after / params`).
    """
    skip = set(skip)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if is_plain_linear(module) and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]
    replaced, params, before, after = [], 0, 0, 0
    for name, linear in targets:
        layer = NF4Linear.from_linear(
            linear, compute_dtype=compute_dtype, blocksize=blocksize, double_quant=double_quant
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced.append(name)
        params += linear.weight.numel()
        before += linear.weight.numel() * linear.weight.element_size()
        after += layer.nf4.nbytes()
    return {
        "replaced": replaced,
        "count": len(replaced),
        "params": params,
        "bytes_before": before,
        "bytes_after": after,
        "bytes_per_param": after / params if params else float("nan"),
    }


def dequantize_model_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every remaining `NF4Linear` by a plain `nn.Linear` holding its dequantized weight.

    Used when writing a merged QLoRA model: layers without an adapter still hold 4-bit codes,
    which a plain transformers checkpoint cannot express.

    Returns:
        The number of layers replaced.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is NF4Linear:
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
