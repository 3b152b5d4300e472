"""RMSNorm (alone and after a residual add), SwiGLU, the rotary embedding and the loss's
cross-entropy of a training step as C kernels on the CPU, in bf16 and in float32.

`fused_ops.py`'s autograd functions are single functions, but each still runs as several torch
ops, each a pass over a `tokens x hidden` tensor; in bf16, transformers' RMSNorm also casts the
whole activation to fp32 and back. Where the matrix units are fast (AVX-512 BF16 / AMX), those
passes are a large share of the step (bench/results/fusion.txt); on an AVX2-only CPU, which
trains in float32, they are the part of the step that is not a matrix product.
`kernels/fused_cpu.c` does each forward and each backward in one pass: bf16 or fp32 in and out,
fp32 in registers and in the row sums. The functions here are the autograd functions over those
kernels, used by `fused_ops.py` where `applies` says so: CPU tensors all bf16 or all float32,
on a CPU with AVX2 + FMA and a C compiler, unless `GRAFTLM_FUSED_CPU_KERNELS=0`. Everywhere
else, and on CUDA, the torch path runs unchanged. The float32 kernels give torch's values up to
a few ulp (the order of the row sums, the exponential's polynomial), not bit for bit: the torch
path is the one `GRAFTLM_FUSED_CPU_KERNELS=0` keeps, and the golden files pin.

Rows are split across `torch.get_num_threads()` threads of torch's own OpenMP pool where torch
runs on GNU OpenMP (as `nf4_dequant.py` does), else the calling thread does them all.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from graftlm.kernels import build
from graftlm.kernels.nf4_dequant import torch_uses_libgomp

logger = logging.getLogger("graftlm")

SOURCE = Path(__file__).with_name("fused_cpu.c")
DISABLE_VAR = "GRAFTLM_FUSED_CPU_KERNELS"
AVX512_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma")
AVX512_CPU = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}
# -fopenmp-simd: the vectorized reductions of the pragmas, with or without threads
COMMON_FLAGS = (
    "-fopenmp-simd",
    # FP operations never trap here: without it gcc keeps the clamps and selects of exp_approx as
    # branches and leaves the SwiGLU loops scalar (values are the same either way)
    "-fno-trapping-math",
    "-mprefer-vector-width=512",
    "-shared",
    "-fPIC",
)
# below this many values per thread, waking a thread costs more than it saves
MIN_VALUES_PER_THREAD = 1 << 14

_LONG, _PTR, _INT, _FLOAT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# the element-wise kernels, each built for bf16 (this name) and float32 (the name + "_f32")
_ELEMENTWISE = {
    "graftlm_rms_norm_forward": [_PTR, _PTR, _PTR, _PTR, _LONG, _LONG, _FLOAT, _INT],
    "graftlm_rms_norm_backward": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _LONG, _LONG, _INT],
    "graftlm_add_rms_norm_forward": [*[_PTR] * 6, _LONG, _LONG, _FLOAT, _INT],
    "graftlm_add_rms_norm_backward": [*[_PTR] * 7, _LONG, _LONG, _INT],
    "graftlm_swiglu_forward": [_PTR, _PTR, _PTR, _LONG, _INT],
    "graftlm_swiglu_backward": [_PTR, _PTR, _PTR, _PTR, _PTR, _LONG, _INT],
    "graftlm_rotary": [_PTR, _PTR, _PTR, _PTR, *[_LONG] * 4, _PTR, _PTR, _PTR, _INT, _INT],
    "graftlm_cross_entropy": [_PTR, _PTR, _PTR, _LONG, _LONG, _INT],
}
_SIGNATURES = {
    **_ELEMENTWISE,
    **{f"{name}_f32": argtypes for name, argtypes in _ELEMENTWISE.items()},
    # the causal softmax of causal_attention.py (bf16 only)
    "graftlm_causal_softmax": [_PTR, _PTR, _PTR, _LONG, _LONG, _LONG, _FLOAT, _INT],
    "graftlm_causal_softmax_backward": [*[_PTR] * 6, _LONG, _LONG, _LONG, _FLOAT, _INT],
    "graftlm_row_dot": [_PTR, _PTR, _PTR, _LONG, _LONG, _INT],
}
# the element types the element-wise kernels are built for
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def applies(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """Whether the C kernels take these tensors: CPU tensors of one dtype among `dtypes`
    (bf16 or float32 for the element-wise kernels), and the kernels built."""
    dtype = tensors[0].dtype
    return (
        dtype in dtypes
        and all(t.dtype is dtype and t.device.type == "cpu" for t in tensors)
        and library() is not None
    )


def kernel(name: str, dtype: torch.dtype):
    """The element-wise kernel `name` built for `dtype` (bf16 or float32)."""
    return getattr(library(), name if dtype is torch.bfloat16 else f"{name}_f32")


class RMSNormFunction(torch.autograd.Function):
    """`weight * round(x * rsqrt(mean(x^2) + eps))` over the last dimension, `(..., n)` bf16
    (rounded to bf16 before the weight, as transformers does) or float32; saves `x` and one fp32
    `rsqrt` value per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        out = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32)
        fn = kernel("graftlm_rms_norm_forward", x.dtype)
        fn(_ptr(x), _ptr(weight.contiguous()), _ptr(out), _ptr(rstd), rows, n, eps, _threads(x))
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        threads = _threads(x)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        partial = torch.zeros(threads, n) if ctx.needs_input_grad[1] else None
        kernel("graftlm_rms_norm_backward", x.dtype)(
            _ptr(grad), _ptr(x), _ptr(weight.contiguous()), _ptr(rstd), _ptr(grad_x),
            _ptr(partial), rows, n, threads,
        )  # fmt: skip
        grad_weight = None if partial is None else partial.sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class AddRMSNormFunction(torch.autograd.Function):
    """A decoder layer's residual add and the RMSNorm after it, `(..., n)` bf16 or float32:
    `h = residual + x` and `weight * round(h * rsqrt(mean(h^2) + eps))`, both returned; the same
    values as the add followed by `RMSNormFunction`, in one pass. Saves `h` and one fp32 value
    per row. The backward is one pass too: the gradient of `residual` and of `x` (one tensor)
    is the gradient that reaches `h` directly plus the norm's backward, rounded once."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        residual, x = residual.contiguous(), x.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        h, out = torch.empty_like(x), torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32)
        kernel("graftlm_add_rms_norm_forward", x.dtype)(
            _ptr(residual), _ptr(x), _ptr(weight.contiguous()), _ptr(h), _ptr(out), _ptr(rstd),
            rows, n, eps, _threads(x),
        )  # fmt: skip
        ctx.save_for_backward(h, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused h or output: no zero tensor to add
        return h, out

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor | None, grad: torch.Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        if grad is None:
            return grad_h, grad_h, None, None
        grad = grad.contiguous()
        grad_h = None if grad_h is None else grad_h.contiguous()
        n = h.shape[-1]
        rows = h.numel() // n
        threads = _threads(h)
        needs_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(h) if needs_dx else None
        partial = torch.zeros(threads, n) if ctx.needs_input_grad[2] else None
        kernel("graftlm_add_rms_norm_backward", h.dtype)(
            _ptr(grad_h), _ptr(grad), _ptr(h), _ptr(weight.contiguous()), _ptr(rstd),
            _ptr(grad_x), _ptr(partial), rows, n, threads,
        )  # fmt: skip
        grad_weight = None if partial is None else partial.sum(0).to(weight.dtype)
        return grad_x, grad_x, grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """`round(silu(gate)) * up` for `gate` and `up` of one shape, bf16 (SiLU's output rounded
    to bf16, as transformers' is) or float32; saves `gate` and `up`."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        kernel("graftlm_swiglu_forward", gate.dtype)(
            _ptr(gate), _ptr(up), _ptr(out), gate.numel(), _threads(gate)
        )
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        kernel("graftlm_swiglu_backward", gate.dtype)(
            _ptr(grad), _ptr(gate), _ptr(up), _ptr(grad_gate), _ptr(grad_up), gate.numel(),
            _threads(gate),
        )  # fmt: skip
        return grad_gate, grad_up


class RotaryFunction(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin` for x `(batch, heads, seq, dim)` (any strides but a
    contiguous last dimension) and cos, sin `(batch or 1, 1, seq, dim)`, all bf16 or all
    float32. The output is contiguous, read by the attention without a copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = _rotary_table(cos), _rotary_table(sin)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, backward=True), None, None


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of bf16 or float32 `logits` `(rows, vocab)` (contiguous) against
    int64 `targets` `(rows,)`, in fp32; `logits` is overwritten with the loss's gradient
    `softmax(logits) - onehot(targets)`, in its own dtype. The caller checks `applies(logits)`."""
    assert logits.is_contiguous() and targets.dtype is torch.int64, "contiguous logits, int64"
    rows, vocab = logits.shape
    loss = torch.empty(rows)
    targets = targets.contiguous()
    kernel("graftlm_cross_entropy", logits.dtype)(
        _ptr(logits), _ptr(targets), _ptr(loss), rows, vocab, _threads(logits)
    )
    return loss


def rotary_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `RotaryFunction` takes these shapes (besides `applies`' dtype and device):
    x 4-D with an even last dimension, cos/sin broadcast over the heads only."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() != 4:
        return False
    batch, _, seq, dim = x.shape
    return cos.shape[1] == 1 and cos.shape[0] in (1, batch) and cos.shape[2:] == (seq, dim)


def _rotary_table(table: torch.Tensor) -> torch.Tensor:
    # (batch or 1, 1, seq, dim) -> contiguous (batch or 1, seq, dim)
    return table[:, 0].contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    if x.stride(-1) != 1:
        x = x.contiguous()
    # contiguous (batch, heads, seq, dim), whatever x's layout (transformers' q and k are
    # transposed views): what the attention's matrix products read without a copy
    out = torch.empty(x.shape, dtype=x.dtype)
    batch, heads, seq, dim = x.shape
    cs_strides = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1))
    kernel("graftlm_rotary", x.dtype)(
        _ptr(x), _ptr(cos), _ptr(sin), _ptr(out), batch, heads, seq, dim,
        _strides(x.stride()[:3]), _strides(out.stride()[:3]), _strides(cs_strides),
        int(backward), _threads(x),
    )  # fmt: skip
    return out


def _strides(values) -> ctypes.Array:
    return (_LONG * len(values))(*values)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(t: torch.Tensor) -> int:
    return max(1, min(torch.get_num_threads(), t.numel() // MIN_VALUES_PER_THREAD))


def compile_flags() -> tuple[str, ...] | None:
    """The compiler flags for this CPU (AVX-512, with its BF16 intrinsics where it has them, else
    AVX2 + FMA; `GRAFTLM_KERNEL_ISA=avx2` caps them at AVX2, `build.py`), without OpenMP; None
    where the kernels cannot run (the reason is logged)."""
    avx512 = build.missing_requirement(AVX512_CPU) is None
    reason = None if avx512 else build.missing_requirement({"avx2", "fma"})
    if reason:
        logger.info("fused element-wise kernels run in torch: %s", reason)
        return None
    if not avx512:
        return (*build.AVX2_FLAGS[:-2], *(f for f in COMMON_FLAGS if "vector-width" not in f))
    flags = (*AVX512_FLAGS, *COMMON_FLAGS)
    if build.missing_requirement({"avx512_bf16"}) is None:
        flags = (*flags, "-mavx512bf16")  # the intrinsic kernels (fused_cpu.c says why)
    return flags


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their C signatures bound, or None where they cannot run here
    (the reason is logged once)."""
    if os.environ.get(DISABLE_VAR, "1") == "0":
        return None
    flags = compile_flags()
    if flags is None:
        return None
    lib = None
    # -fopenmp only where the library would share torch's libgomp (nf4_dequant.py says why)
    if torch_uses_libgomp():
        lib = build.load_library(SOURCE, (*flags, "-fopenmp"))
    lib = lib or build.load_library(SOURCE, flags)
    if lib is None:
        logger.info("fused element-wise kernels run in torch: the C kernels did not build")
        return None
    for name, argtypes in _SIGNATURES.items():
        build.bind(lib, name, argtypes, None)
    return lib


def clear_cache() -> None:
    """Forget the loaded kernels (after changing `GRAFTLM_FUSED_CPU_KERNELS`,
    `GRAFTLM_KERNEL_ISA` or `CC`)."""
    library.cache_clear()
