"""NF4 dequantization in C: packed 4-bit codes and block scales to an fp32 or bf16 weight.

QLoRA's base layers dequantize their weight for every matrix product that needs it (forward,
backward, and the recomputation of a checkpointed layer). In torch that is a table gather and a
multiply, several passes over the weight, plus the decoding of double-quantized scales in a few
more ops; `kernels/nf4_dequant.c` decodes the scales, the codes, multiplies and rounds in one
pass (AVX2 + FMA CPUs). Its output is bit-identical to the torch path in `graftlm.quant.nf4`:
every value is the fp32 product of its level and its block's scale, written as fp32 or rounded
once to bf16 (to nearest even, as torch casts). Timings: docs/measurements.md, "NF4
dequantization".

Large weights are split across `torch.get_num_threads()` threads of torch's own OpenMP pool:
where torch runs on GNU OpenMP (its libgomp is loaded), the library is built with -fopenmp and
binds to that same libgomp, so the split neither starts threads nor competes with torch's idle
workers (threads of our own did: they waited for cores that torch's workers spun on). Elsewhere
it runs on the calling thread. The kernel is compiled on first use into graftlm's cache;
without a compiler, on a CPU without AVX2/FMA, or with `GRAFTLM_NF4_KERNEL=0`, `dequantize`
returns None and the caller stays on torch (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from graftlm.kernels import build

logger = logging.getLogger("graftlm")

SOURCE = Path(__file__).with_name("nf4_dequant.c")
COMPILE_FLAGS = (*build.AVX2_FLAGS, "-ffp-contract=off")
OPENMP_FLAGS = (*COMPILE_FLAGS, "-fopenmp")
CPU_FLAGS = {"avx2", "fma"}
DISABLE_VAR = "GRAFTLM_NF4_KERNEL"
# below this many values per thread, waking a thread costs more than it saves
# (docs/measurements.md, "NF4 dequantization")
MIN_VALUES_PER_THREAD = 1 << 15
OUT_DTYPES = (torch.float32, torch.bfloat16)


def dequantize(
    packed: torch.Tensor,
    levels: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
    *,
    absmax: torch.Tensor | None = None,
    absmax_codes: torch.Tensor | None = None,
    dynamic_code: torch.Tensor | None = None,
    group_scales: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    block_offsets: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`levels[code[i]] * scale[i // blocksize]` for the n packed codes, in `dtype`, plus
    `block_offsets[i // blocksize]` where given (added after the product); None (nothing
    done) where the kernel does not apply: not on CPU, `dtype` not fp32 or bf16, a block size
    that is not a multiple of 16, or no kernel here.

    The block scales are `absmax`, or (double quantization) decoded as
    `(dynamic_code[absmax_codes[j]] * group_scales[j // 256]) + offset`.

    Args:
        packed: uint8 `(ceil(n / 2),)`, two codes per byte, the first in the high nibble.
        levels: fp32 `(16,)`, the value of every code.
        n: number of values.
        blocksize: values per scale.
        dtype: torch.float32 or torch.bfloat16.
        absmax: fp32 `(ceil(n / blocksize),)`, the scale of every block; or None and:
        absmax_codes: uint8, one code per block; dynamic_code: fp32 `(256,)`;
        group_scales: fp32, one per 256 blocks; offset: fp32, one value.
        block_offsets: fp32 `(ceil(n / blocksize),)` or None: the 4-bit affine grids of
            `graftlm.quant.q4_grid`, `levels` then being 0..15.
        out: where to write, a contiguous CPU tensor of n values of `dtype`; None: a new one.

    Returns:
        The n values (`out`, or a new 1-D tensor), or None.
    """
    if dtype not in OUT_DTYPES or packed.device.type != "cpu" or blocksize % 16 or n <= 0:
        return None
    function = kernel()
    if function is None:
        return None
    blocks = -(-n // blocksize)
    assert packed.dtype is torch.uint8 and packed.numel() == -(-n // 2), "ceil(n / 2) codes"
    assert levels.dtype is torch.float32 and levels.numel() == 16, "16 fp32 levels"
    if absmax is not None:
        assert absmax.dtype is torch.float32 and absmax.numel() == blocks, "fp32 block scales"
        scales = (absmax.contiguous(), None, None, None, None)
    else:
        assert absmax_codes.dtype is torch.uint8 and absmax_codes.numel() == blocks, "codes"
        assert dynamic_code.dtype is torch.float32 and dynamic_code.numel() == 256, "8-bit map"
        assert group_scales.dtype is torch.float32 and group_scales.numel() == -(-blocks // 256)
        assert offset.dtype is torch.float32 and offset.numel() == 1, "one fp32 offset"
        scales = (None, absmax_codes, dynamic_code, group_scales, offset)
    if block_offsets is not None:
        assert block_offsets.dtype is torch.float32 and block_offsets.numel() == blocks, "offsets"
    scales = (*scales, block_offsets)
    pointers = [None if t is None else t.contiguous().data_ptr() for t in scales]
    if out is None:
        out = torch.empty(n, dtype=dtype)
    assert out.dtype is dtype and out.numel() == n and out.is_contiguous(), "out: n values"
    assert out.device.type == "cpu", "out: on the CPU"
    threads = max(1, min(torch.get_num_threads(), n // MIN_VALUES_PER_THREAD))
    function(
        packed.contiguous().data_ptr(),
        *pointers,
        levels.contiguous().data_ptr(),
        n,
        blocksize,
        int(dtype is torch.bfloat16),
        out.data_ptr(),
        threads,
    )
    return out


_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


@functools.lru_cache(maxsize=1)
def kernel():
    """The compiled function as a ctypes function, or None where it cannot run here."""
    if os.environ.get(DISABLE_VAR, "1") == "0":
        return None
    reason = build.missing_requirement(CPU_FLAGS)
    library = None
    if not reason:
        # -fopenmp only where the library would share torch's libgomp (see the module docstring)
        if torch_uses_libgomp():
            library = build.load_library(SOURCE, OPENMP_FLAGS)
        library = library or build.load_library(SOURCE, COMPILE_FLAGS)
    if library is None:
        logger.info("NF4 weights dequantize in torch: %s", reason or "the C kernel did not build")
        return None
    argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _LONG, _LONG, _INT, _PTR, _INT]
    return build.bind(library, "graftlm_nf4_dequantize", argtypes, None)


def torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP's runtime loaded (torch's, on Linux wheels)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def clear_cache() -> None:
    """Forget the loaded kernel (after changing `GRAFTLM_NF4_KERNEL` or `CC`)."""
    kernel.cache_clear()
