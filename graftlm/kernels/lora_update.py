"""A LoRA layer of a CPU training step (bf16 autocast or float32) as one autograd function.

The plain form, `base(x) + lora_B(lora_A(x)) * scale`, runs as separate torch ops (under
autocast the adapter's fp32 `A` and `B` are cast to bf16 in every call): the scale is a
multiplication over the `(tokens, out)` update, the sum a second pass over it; in the
backward, autograd multiplies the gradient by the scale again and adds the adapter's share
of `dx` to the base's in one more pass. Here the update is added into the base output by the
matrix product itself, and the backward does the same with `dx`:

    forward:   out = x @ W^T (+ b)          t = x @ A^T            out += scale * t @ B^T
    backward:  u = g @ B                    dx = g @ W,  dx += scale * u @ A
               dA = scale * u^T @ x         dB = scale * g^T @ t      (fp32, as A and B are)

In bf16 every product is bf16 on the matrix units with fp32 accumulation, as autocast runs
them; the update is rounded once (into `out`) instead of three times, so results agree with the
plain form to bf16 rounding (tests/kernels/test_lora_update.py), not bit for bit. In float32
the products are the plain form's, summed in another order (agreement to fp32 rounding).

Over a 4-bit base (QLoRA: `LoraNF4Linear`) the weight comes in as a function that
dequantizes it into the thread's scratch buffer (`quant/nf4_linear.py: dequantized`), called in
the forward and again in the backward, so the full-precision weight is never kept, as in
`_NF4Matmul`; the plain form there is `_NF4Matmul` plus the adapter's separate ops.

`LoraLinear` takes this path only inside `enabled()` (entered by `fused_ops.fused_forwards`,
graftlm's training loop with fused kernels on) and where `applies` says so: CPU tensors,
a frozen base weight, gradients wanted, and either bf16 autocast with a bf16 base or float32
throughout with autocast off (where `fused_cpu`'s kernels are on: `GRAFTLM_FUSED_CPU_KERNELS=0`
keeps the float32 plain form). CUDA, inference and everything else keep the plain form.

When a checkpointed decoder layer is replayed for its backward (`replaying_layer`, entered by
`train/checkpointing.py`), the layer's last product (`last_product_of_layer`, around a Llama
MLP's `down_proj`: `fused_ops.swiglu_mlp_forward_ending_layer`) is not computed: its output is
the layer's output, which the backward never reads, and torch's non-reentrant checkpoint ends
the replay ("early stop") as soon as the tensors saved by that last function are back. Only
`x @ A^T` is recomputed there. That product is a quarter of a Llama layer's multiply-adds, so
the replay costs ~25% less (and, over a 4-bit base, skips one dequantization of `down_proj`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from graftlm.kernels import fused_cpu

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


class _Replay:
    """One replay of a checkpointed layer: whether it skipped the layer's last product."""

    skipped = False


# set by `replaying_layer` and `last_product_of_layer`; module globals, as `_enabled` above
_replay: _Replay | None = None
_last_product = False


@contextlib.contextmanager
def replaying_layer() -> Iterator[_Replay]:
    """The replay of a checkpointed decoder layer for its backward, under torch's early stop.

    Yields the replay's record: if `skipped` is set and the replay still returns, the early stop
    did not end it at the layer's last product (e.g. `set_checkpoint_early_stop(False)`, or a
    layer that computes more after its MLP), and the caller must fail: what followed was
    computed from an output that was never filled in."""
    global _replay
    before, _replay = _replay, _Replay()
    try:
        yield _replay
    finally:
        _replay = before


@contextlib.contextmanager
def last_product_of_layer() -> Iterator[None]:
    """Around the decoder layer's last product (whose output only the layer's residual add
    reads): inside `replaying_layer`, `LoraUpdateFunction` saves its tensors without the
    product."""
    global _last_product
    before, _last_product = _last_product, True
    try:
        yield
    finally:
        _last_product = before


def applies(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `LoraUpdateFunction` computes this layer's training forward: inside `enabled()`,
    gradients on, `x` and a frozen `weight` (and `bias`) CPU tensors, either all bf16 under bf16
    autocast or all float32 without autocast. `weight` None: a packed 4-bit weight that is
    dequantized to x's dtype for each product."""
    if not _enabled or not torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return False
    elif fused_cpu.library() is None:
        # float32 takes this path with the rest of the float32 kernels, and keeps the plain
        # form (bit for bit the earlier float32 step) where they are off
        return False
    else:
        dtype = torch.float32
    frozen = [t for t in (weight, bias) if t is not None]
    return (
        x.dim() >= 2
        and x.device.type == "cpu"
        and x.dtype is dtype
        and all(t.dtype is dtype and t.device.type == "cpu" for t in frozen)
        and not any(t.requires_grad for t in frozen)
    )


class LoraUpdateFunction(torch.autograd.Function):
    """`x @ W^T + b + scale * (x @ A^T) @ B^T` for x `(..., in)`, W `(out, in)` and b frozen
    (all bf16 or all float32), A `(r, in)` and B `(out, r)` trained (any float dtype; their
    gradients come back in it). Saves x, `x @ A^T` `(tokens, r)` and A and B in x's dtype, and W
    when it is a tensor; `weight` may instead be a function that returns it (a 4-bit weight
    dequantized into a reused buffer), called again in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # float32: the parameters themselves
        after_a = flat @ a.t()  # (tokens, r)
        if _replay is not None and _last_product:
            # the replay ends when this function's saved tensors are back (`replaying_layer`):
            # the output is never read, so it is neither computed nor filled in
            _replay.skipped = True
            out = flat.new_empty(flat.shape[0], b.shape[0])
        else:
            dense = weight() if callable(weight) else weight
            out = F.linear(flat, dense, bias)  # (tokens, out)
            out.addmm_(after_a, b.t(), alpha=scale)  # the update summed inside the product
        if callable(weight):
            ctx.weight_source = weight
            ctx.save_for_backward(flat, a, b, after_a)
        else:
            ctx.weight_source = None
            ctx.save_for_backward(flat, a, b, after_a, weight)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, a, b, after_a, *saved_weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)  # (tokens, out)
        u = g @ b  # (tokens, r): the gradient of x @ A^T, before the scale
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = saved_weight[0] if saved_weight else ctx.weight_source()
            grad_x = g @ weight  # (tokens, in)
            grad_x.addmm_(u, a, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = (u.t() @ flat).to(ctx.dtypes[0]).mul_(ctx.scale)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ after_a).to(ctx.dtypes[1]).mul_(ctx.scale)
        return grad_x, None, None, grad_a, grad_b, None
