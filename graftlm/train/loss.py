"""Causal-LM cross-entropy fused with the output projection, only where there is a label.

A 135M model's vocabulary projection is 49,152 x 576: full fp32 logits for a batch of 8 x 256
tokens take 400 MB, and most of them (system prompts, user turns, padding) carry no loss. So:

1. keep only the positions whose *next* token has a label (`labels != -100` after the shift);
2. project those hidden states to the vocabulary in chunks of `chunk_size` rows;
3. compute each chunk's loss and its gradient (softmax − one-hot) right away, so backward
   is one stored `[n, hidden]` gradient instead of `[n, vocab]` logits.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from graftlm.kernels import fused_cpu

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(h @ W.T, y); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, with_grads):
        # hidden: (n, d), weight: (V, d), targets: (n,); `with_grads` False: the loss alone (an
        # evaluation: no gradient products, no gradient buffers, whatever requires grad)
        need_hidden_grad = with_grads and hidden.requires_grad
        need_weight_grad = with_grads and weight.requires_grad
        w = weight.detach().to(compute_dtype)
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            if need_hidden_grad
            else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight_grad
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_size = min(chunk_size, getattr(_workspace, "max_rows", None) or chunk_size)
        rows = min(chunk_size, hidden.shape[0])
        # the C kernel works over the buffer seen as the compute dtype: bf16 needs half the bytes
        kernel = fused_cpu.applies(w)  # a CPU weight; each chunk is cast to w's dtype
        per_value = w.element_size() if kernel else 4
        buffer = _logits_buffer(-(-rows * weight.shape[0] * per_value // 4), hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].detach().to(compute_dtype)
            y = targets[start : start + chunk_size]
            if kernel:
                # on the CPU: the C kernel's one pass (no separate passes of the softmax), in
                # bf16 over the buffer's memory seen as bf16 (no fp32 copy of the logits)
                n = h.shape[0] * weight.shape[0]
                logits = buffer.view(h.dtype)[:n].view(h.shape[0], weight.shape[0])
                torch.matmul(h, w.T, out=logits)
                total += fused_cpu.cross_entropy_(logits, y).sum()
                grad_logits = logits
            else:
                logits = buffer[: h.shape[0] * weight.shape[0]].view(h.shape[0], weight.shape[0])
                if compute_dtype == torch.float32:
                    torch.matmul(h, w.T, out=logits)  # (c, V)
                else:
                    logits.copy_(h @ w.T)
                chunk_loss, grad_logits = _cross_entropy_(logits, y, compute_dtype)
                total += chunk_loss
            if need_hidden_grad:
                grad_hidden[start : start + chunk_size] = (grad_logits @ w).to(hidden.dtype)
            if need_weight_grad:
                grad_weight += (grad_logits.T @ h).float()
        if not getattr(_workspace, "scopes", 0):  # outside a training run: nothing is kept
            release_logits_buffer()
        empty = torch.empty(0)
        ctx.save_for_backward(
            grad_hidden if need_hidden_grad else empty, grad_weight if need_weight_grad else empty
        )
        ctx.need_hidden_grad, ctx.need_weight_grad = need_hidden_grad, need_weight_grad
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.need_hidden_grad else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.need_weight_grad else None
        return gh, gw, None, None, None, None


def _cross_entropy_(logits: torch.Tensor, y: torch.Tensor, compute_dtype: torch.dtype):
    """The summed loss of fp32 `logits` against `y`, and d(loss)/d(logits) = softmax - onehot
    in `compute_dtype`, computed in place over `logits`: logsumexp's own temporaries cost as much
    again as the buffer, and allocating them is a sizable share of the loss's time
    (docs/measurements.md, "The fused loss")."""
    target_logits = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    sums = probs.sum(dim=-1, keepdim=True)
    loss = (top.squeeze(1) + sums.log().squeeze(1) - target_logits).sum()
    probs.div_(sums)
    probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
    return loss, probs.to(compute_dtype)


_workspace = threading.local()


def _logits_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer of at least `numel` values, kept between calls on this thread.

    Every micro-batch projects to the vocabulary; a fresh `[rows, vocab]` tensor each time is
    hundreds of MB the allocator maps and the kernel zero-fills again (with `--low-memory`'s
    allocator setting, every time). Inside `logits_buffer_scope()` the buffer is kept until
    `release_logits_buffer()` or the end of the scope.
    """
    held = getattr(_workspace, "logits", None)
    if held is None or held.numel() < numel or held.device != device:
        _workspace.logits = held = None  # drop the old one before allocating the new one
        _workspace.logits = held = torch.empty(numel, dtype=torch.float32, device=device)
    return held


def release_logits_buffer() -> None:
    """Free this thread's logits buffer."""
    _workspace.logits = None


@contextlib.contextmanager
def logits_buffer_scope(max_rows: int | None = None) -> Iterator[None]:
    """Reuse one logits buffer inside the block (a training run) and free it on the way out;
    outside such a block every loss call frees its buffer when done.

    `max_rows`: project at most this many rows at once inside the block, whatever a call asks
    (a `--low-memory` run: a smaller buffer, the same products in more pieces)."""
    _workspace.scopes = getattr(_workspace, "scopes", 0) + 1
    outer_rows = getattr(_workspace, "max_rows", None)
    if max_rows is not None:
        _workspace.max_rows = max_rows
    try:
        yield
    finally:
        _workspace.scopes -= 1
        _workspace.max_rows = outer_rows
        if not _workspace.scopes:
            release_logits_buffer()


def select_labelled(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift for next-token prediction and keep labelled positions.

    Args:
        hidden: `(batch, seq, d)` final hidden states.
        labels: `(batch, seq)` token ids, IGNORE_INDEX where no loss.

    Returns:
        `(n, d)` hidden states that predict a labelled token, and the `(n,)` targets.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return hidden[:, :-1][mask], targets[mask]


def fused_lm_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of `hidden @ weight.T` over labelled positions.

    Args:
        hidden: `(batch, seq, d)` final hidden states (after the last norm).
        weight: `(vocab, d)` output projection (no bias).
        labels: `(batch, seq)`, IGNORE_INDEX where no loss; shifted here.
        chunk_size: rows projected at once (memory ~ chunk_size x vocab x 4 bytes).
        compute_dtype: matmul dtype (bf16 is much faster on CPUs with AVX-512 BF16 / AMX
            units, emulated and slow elsewhere); default the weight's dtype.

    Returns:
        (sum of losses as a 0-d fp32 tensor, number of labelled tokens). Divide by the
        token count of the whole optimizer step for a mean that does not depend on how the
        step was split into micro-batches.
    """
    h, y = select_labelled(hidden, labels)
    if y.numel() == 0:
        return hidden.sum() * 0.0, 0
    dtype = compute_dtype or weight.dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        # the gradients are computed in the forward: only where a backward can follow
        with_grads = torch.is_grad_enabled()
        loss = _FusedLinearCrossEntropy.apply(h, weight, y, chunk_size, dtype, with_grads)
    return loss, int(y.numel())


def head_lm_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, *, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Like `fused_lm_loss_sum` for an arbitrary head module (an adapted or biased lm_head).

    Only labelled positions are projected, chunk by chunk; autograd keeps each chunk's logits.
    """
    h, y = select_labelled(hidden, labels)
    if y.numel() == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        logits = head(h[start : start + chunk_size]).float()
        total = total + F.cross_entropy(logits, y[start : start + chunk_size], reduction="sum")
    return total, int(y.numel())
