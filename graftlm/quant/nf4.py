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


`graftlm.quant.nf4_linear` holds the `NF4Linear` layer built on this format, and
`graftlm.methods.lora.nf4_layer` the LoRA layer over it (QLoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftlm.kernels import nf4_dequant

__all__ = [
    "NF4_CODE",
    "NF4Tensor",
    "dequantize_nf4",
    "dynamic_code",
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

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        use_kernel: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rebuild the weight: `NF4_CODE[code] * absmax[block]` in fp32, then cast once.

        Args:
            dtype: output dtype; None means the original weight's dtype.
            use_kernel: take the C kernel (`graftlm.kernels.nf4_dequant`) where it applies (CPU,
                fp32 or bf16 out); its result is the same bits as the torch path's.
            out: a contiguous tensor of `self.numel` values of `dtype`, on the device of `packed`,
                to write into (a reused buffer); None: a new tensor.

        Returns:
            Tensor of `self.shape` and `dtype`, on the device of `packed` (a view of `out` if
            given).
        """
        dtype = self.dtype if dtype is None else dtype
        n, bs = self.numel, self.blocksize
        if use_kernel:
            scales = {"absmax": self.absmax}
            if self.double_quant:  # the kernel decodes the scales as block_absmax does
                scales = {
                    "absmax_codes": self.absmax,
                    "dynamic_code": dynamic_code(self.packed.device),
                    "group_scales": self.absmax_scale,
                    "offset": self.absmax_offset,
                }
            flat = None if out is None else out.view(-1)
            values = nf4_dequant.dequantize(self.packed, NF4_CODE, n, bs, dtype, **scales, out=flat)
            if values is not None:
                return values.view(self.shape)
        absmax = self.block_absmax()
        lut = _nf4_pair_lut(self.packed.device)
        values = lut.index_select(0, self.packed.int()).view(torch.float32)  # (2 * ceil(n/2),)
        # fp32 products, rounded once into the output dtype, as bitsandbytes computes them;
        # `out=` fuses the cast into the multiply.
        if out is None:
            out = torch.empty(n, dtype=dtype, device=self.packed.device)
        out = out.view(-1)
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
