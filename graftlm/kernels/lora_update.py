"""A LoRA layer of a bf16 training step on the CPU as one autograd function.

The plain form, `base(x) + lora_B(lora_A(x)) * scale`, runs as separate torch ops under
autocast: the adapter's fp32 `A` and `B` are cast to bf16 in every call, the scale is a
multiplication over the `(tokens, out)` update, the sum a second pass over it; in the
backward, autograd multiplies the gradient by the scale again and adds the adapter's share
of `dx` to the base's in one more pass. Here the update is added into the base output by the
matrix product itself, and the backward does the same with `dx`:

    forward:   out = x @ W^T (+ b)          t = x @ A^T            out += scale * t @ B^T
    backward:  u = g @ B                    dx = g @ W,  dx += scale * u @ A
               dA = scale * u^T @ x         dB = scale * g^T @ t      (fp32, as A and B are)

Every product is bf16 on the matrix units with fp32 accumulation, as autocast runs them;
the update is rounded once (into `out`) instead of three times, so results agree with the
plain form to bf16 rounding (tests/kernels/test_lora_update.py), not bit for bit.

`LoraLinear` takes this path only inside `enabled()` (entered by `fused_ops.fused_forwards`,
graftlm's training loop with fused kernels on) and where `applies` says so: CPU tensors,
a frozen bf16 base weight, bf16 autocast on, gradients wanted. CUDA, float32, inference and
everything else keep the plain form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# a plain module global, not a ContextVar: torch.compile traces reads of globals (it guards on
# their values) but breaks its graph at every `ContextVar.get`, twice per LoRA layer
_enabled = False


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Let LoRA layers inside this block take `LoraUpdateFunction` where `applies`."""
    global _enabled
    before, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = before


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `LoraUpdateFunction` computes this layer's training forward: inside `enabled()`,
    gradients on, bf16 autocast on the CPU, `x` and a frozen `weight` (and `bias`) bf16 CPU
    tensors."""
    if not _enabled or not torch.is_grad_enabled():
        return False
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    frozen = [weight] if bias is None else [weight, bias]
    return (
        x.dim() >= 2
        and x.device.type == "cpu"
        and x.dtype is torch.bfloat16
        and all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for t in frozen)
        and not any(t.requires_grad for t in frozen)
    )


class LoraUpdateFunction(torch.autograd.Function):
    """`x @ W^T + b + scale * (x @ A^T) @ B^T` for x `(..., in)`, W `(out, in)` and b frozen
    (bf16), A `(r, in)` and B `(out, r)` trained (any float dtype; their gradients come back
    in it). Saves x, `x @ A^T` `(tokens, r)` and the bf16 copies of A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        a16, b16 = lora_a.to(torch.bfloat16), lora_b.to(torch.bfloat16)
        out = F.linear(flat, weight, bias)  # (tokens, out)
        after_a = flat @ a16.t()  # (tokens, r)
        out.addmm_(after_a, b16.t(), alpha=scale)  # the update summed inside the product
        ctx.save_for_backward(flat, weight, a16, b16, after_a)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, a16, b16, after_a = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)  # (tokens, out)
        u = g @ b16  # (tokens, r): the gradient of x @ A^T, before the scale
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (tokens, in)
            grad_x.addmm_(u, a16, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = (u.t() @ flat).to(ctx.dtypes[0]).mul_(ctx.scale)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ after_a).to(ctx.dtypes[1]).mul_(ctx.scale)
        return grad_x, None, None, grad_a, grad_b, None
