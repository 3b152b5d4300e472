"""Linear layers for decode steps: a small C kernel for `x @ W.T` when x has only a few rows.

A decode step multiplies every weight matrix by one row per running request. For 2-16 rows
MKL's sgemm packs the weight on each call and streams it well below the memory's bandwidth, so
the step costs about twice what reading the weights does. `kernels/small_batch_linear.c` reads
each weight row once, with a software prefetch, and meets all rows of x while the weight row is
in L1 (AVX2 + FMA, fp32, one thread), which makes such steps faster; at one row MKL's gemv is as
fast, and the kernel is used there too for the property below. Timings:
docs/measurements.md, "The decode-step kernel".

It is batch-invariant: every output element is summed in the same order whatever the number of
rows, so a decode step gives a request the same numbers whatever shares its batch.

`use_small_batch_kernel(model)` turns a model's `nn.Linear` layers into `SmallBatchLinear`,
which takes the kernel only without autograd, on CPU fp32, for at most `MAX_ROWS` rows of one
token each (decode steps), and otherwise is `nn.Linear` itself (prompts, training, bf16).
A LoRA layer with one adapter runs its decode step as one call, `lora_linear` (base product,
bias and update); with several adapters, or a per-row bank, it calls `linear` for its base
product and `add_lora` for the updates. The kernel is compiled on first use with the system's
C compiler into graftlm's cache; without a compiler, on a CPU without AVX2/FMA, or with
`GRAFTLM_SMALL_BATCH_KERNEL=0`, every call stays on torch (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.kernels import build

logger = logging.getLogger("graftlm")

SOURCE = Path(__file__).with_name("small_batch_linear.c")
COMPILE_FLAGS = build.AVX2_FLAGS
CPU_FLAGS = {"avx2", "fma"}
# above 16 rows MKL's packing pays for itself (docs/measurements.md, "The decode-step kernel")
MAX_ROWS = 16
DISABLE_VAR = "GRAFTLM_SMALL_BATCH_KERNEL"
_F32 = torch.float32


class SmallBatchLinear(nn.Linear):
    """`nn.Linear` whose inference forward with at most `MAX_ROWS` rows runs the C kernel.

    Same parameters, state-dict keys and results (up to float rounding) as `nn.Linear`; with
    autograd on, on other devices or dtypes, or with more rows it is `nn.Linear.forward`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`F.linear(x, weight, bias)`, through the kernel where it applies: no autograd, CPU,
    fp32, a contiguous weight `(out, in)` and at most `MAX_ROWS` rows in x `(..., in)`, one
    token per sequence if x is `(batch, tokens, in)`.

    Prompts (several tokens per sequence) always go through torch, so a prompt's prefill is
    computed the same way however many prompts share it; decode steps always go through the
    kernel, which gives a row the same result whatever its batch.
    """
    if kernel_takes(x, weight.shape[-1]) and _f32_contiguous(weight):
        return _run(kernel(), x, weight, bias)
    return F.linear(x, weight, bias)


def kernel_takes(x: torch.Tensor, in_features: int) -> bool:
    """x `(..., in_features)` is a decode step the kernel runs: it is available, autograd is
    off, x is CPU fp32 with 1 to `MAX_ROWS` rows, one token per sequence if `(batch, tokens,
    in)`. Callers check this before preparing operands only the kernel needs."""
    return (
        not torch.is_grad_enabled()
        and x.dtype is _F32
        and x.device.type == "cpu"
        and 0 < x.numel() <= MAX_ROWS * in_features
        and (x.dim() < 3 or x.shape[-2] == 1)  # one token per sequence: a decode step
        and kernel() is not None
    )


def _f32_contiguous(*tensors: torch.Tensor) -> bool:
    """Every tensor is fp32 and contiguous: what the C functions read through a bare pointer.

    A loop, not `all(...)` over a generator: it runs for every adapted layer at every decode
    step.
    """
    for t in tensors:
        if t.dtype is not _F32 or not t.is_contiguous():
            return False
    return True


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x `(..., in_features)` as a `(R, in_features)` matrix whose rows the kernels read with
    one stride: a view for the usual `(batch, 1, in)` decode input, a copy only where the last
    dimension is strided."""
    rows = x.reshape(-1, in_features)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def is_plain_linear(module: nn.Module | type) -> bool:
    """`nn.Linear` itself or a `SmallBatchLinear` (not a quantized or adapter subclass); a
    module or a class."""
    cls = module if isinstance(module, type) else type(module)
    return cls in (nn.Linear, SmallBatchLinear)


def use_small_batch_kernel(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` in `model` into a `SmallBatchLinear`, in place.

    Weights are not copied (the module's class changes, nothing else), so merging, adapters
    and state dicts work as before. Returns how many layers changed; 0 where the kernel is not
    available (nothing is changed then).
    """
    if kernel() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            count += 1
    return count


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the kernel: x `(..., in)`, weight `(out, in)`.

    Raises:
        RuntimeError: the kernel is not available here (see the module docstring).
    """
    function = kernel()
    if function is None:
        raise RuntimeError("the small-batch linear kernel is not available on this machine")
    return _run(function, x, weight.contiguous(), bias)


def _run(function, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    in_features = weight.shape[1]
    rows = _rows(x, in_features)
    out = torch.empty((rows.shape[0], weight.shape[0]), dtype=_F32)
    function(
        rows.data_ptr(),
        rows.shape[0],
        in_features,
        rows.stride(0),
        weight.data_ptr(),
        weight.shape[0],
        out.data_ptr(),
    )
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def add_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> bool:
    """Add LoRA updates into `out` in place through the kernel; False (nothing done) where it
    does not apply (autograd on, not CPU fp32, more than `MAX_ROWS` rows, several tokens per
    sequence, no kernel), as for `linear`.

    Args:
        x: layer input `(..., in)`, R rows once flattened.
        a: `(n, r, in)` stacked A matrices (a bank padded to rank r), or one `(r, in)`.
        b_t: `(n, r, out)` stacked B matrices transposed, or one `(r, out)` (the kernel runs
            its vectors along the outputs: no sum across lanes per output).
        scales: `(n,)` fp32 scale per bank slot (`scale_tensor` makes a cached one).
        out: the base output `(..., out)`, contiguous; row i gets
            `(scales[s] * x_i @ a[s].T) @ b_t[s]` with `s = slots[i]`.
        slots: `(R,)` int64 bank slot per row, -1 for rows without an update; None: slot 0.
    """
    # every adapted layer runs this at every decode step: cheap checks first, no generators
    in_features = a.shape[-1]
    if not (kernel_takes(x, in_features) and _f32_contiguous(a, b_t, out, scales)):
        return False
    function = add_lora_kernel()
    if function is None:
        return False
    rows = _rows(x, in_features)
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
        assert slots.shape == (rows.shape[0],), "one slot per flattened row"
    failed = function(
        rows.data_ptr(),
        rows.shape[0],
        in_features,
        rows.stride(0),
        a.data_ptr(),
        a.shape[-2],
        b_t.data_ptr(),
        b_t.shape[-1],
        None if slots is None else slots.data_ptr(),
        scales.data_ptr(),
        out.data_ptr(),
    )
    if failed:
        raise MemoryError("graftlm_add_lora could not allocate its work buffers")
    return True


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b_t: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """`F.linear(x, weight, bias) + scale·(x·Aᵀ)·Bᵀ` in one C call: a layer with one LoRA
    adapter at a decode step. Equal bit for bit to `linear` followed by `add_lora`; None (nothing
    done) where the kernel does not apply, as for `linear`.

    Args:
        x: layer input `(..., in)`.
        weight: `(out, in)` contiguous fp32 base weight; bias: `(out,)` or None.
        a: `(r, in)` contiguous; b_t: B transposed, `(r, out)` contiguous.
        scale: the adapter's scaling.
    """
    # the one-adapter decode step of every adapted layer: one call, the fewest checks
    in_features = weight.shape[1]
    if not (
        kernel_takes(x, in_features)
        and _f32_contiguous(weight, a, b_t)
        and (bias is None or _f32_contiguous(bias))
    ):
        return None
    function = lora_linear_kernel()
    if function is None:
        return None
    rows = _rows(x, in_features)
    out_features = weight.shape[0]
    out = torch.empty((rows.shape[0], out_features), dtype=_F32)
    failed = function(
        rows.data_ptr(),
        rows.shape[0],
        in_features,
        rows.stride(0),
        weight.data_ptr(),
        out_features,
        None if bias is None else bias.data_ptr(),
        a.data_ptr(),
        a.shape[0],
        b_t.data_ptr(),
        scale,
        out.data_ptr(),
    )
    if failed:
        raise MemoryError("graftlm_lora_linear could not allocate its work buffers")
    return out.view(*x.shape[:-1], out_features)


@functools.lru_cache(maxsize=256)
def scale_tensor(scale: float) -> torch.Tensor:
    """A cached `(1,)` fp32 tensor holding `scale`, for `add_lora` (read-only)."""
    return torch.tensor([scale], dtype=torch.float32)


_LONG, _PTR, _FLOAT = ctypes.c_long, ctypes.c_void_p, ctypes.c_float


@functools.lru_cache(maxsize=1)
def add_lora_kernel():
    """The compiled LoRA-update function (see `add_lora`), or None."""
    argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR, _LONG, _PTR, _PTR, _PTR]
    return _function("graftlm_add_lora", argtypes, ctypes.c_int)


@functools.lru_cache(maxsize=1)
def lora_linear_kernel():
    """The compiled one-adapter layer function (see `lora_linear`), or None."""
    argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR, _LONG, _PTR, _FLOAT, _PTR]
    return _function("graftlm_lora_linear", argtypes, ctypes.c_int)


@functools.lru_cache(maxsize=1)
def kernel():
    """The compiled kernel as a ctypes function, or None where it cannot run here."""
    argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR]
    return _function("graftlm_small_batch_linear", argtypes, None)


def _function(name: str, argtypes: list, restype):
    return build.bind(_library(), name, argtypes, restype)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get(DISABLE_VAR, "1") == "0":
        return None
    reason = build.missing_requirement(CPU_FLAGS)
    library = None if reason else build.load_library(SOURCE, COMPILE_FLAGS)
    if library is None:
        logger.info("decode steps use torch's kernels: %s", reason or "the C kernel did not build")
    return library


def clear_cache() -> None:
    """Forget the loaded library (after changing `GRAFTLM_SMALL_BATCH_KERNEL` or `CC`)."""
    for cached in (_library, kernel, add_lora_kernel, lora_linear_kernel):
        cached.cache_clear()
