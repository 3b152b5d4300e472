"""Causal self-attention of a bf16 training step on the CPU, on the matrix units.

SDPA's CPU flash kernel is slow to differentiate in bf16: for the built-in model (9 heads of
64, rows of 256) its backward took ~6x its forward, and together a third of graftlm's bf16 step
(bench/results/fusion.txt). Here the attention is five matrix products in bf16 (oneDNN, AMX
where the CPU has it) around two C kernels (`fused_cpu.c`: the causal softmax, its backward):

    forward:   S = q @ k^T (fp32)   P = softmax(scale * S, causal) (bf16; the row's lse kept)
               out = P @ v
    backward:  S again from q, k    dP = g @ v^T    dS = scale * P * (dP - rowsum(g * out))
               dv = P^T @ g   dq = dS @ k   dk = dS^T @ q

The scores are computed in fp32 from the bf16 q and k (a bf16 product would round the logits
to 8 bits, which flash does not), everything after them is bf16 with fp32 inside the kernels.
Like flash, only `out` and one log-sum-exp per row are kept for the backward; the score
matrices (heads x rows x rows) are temporaries, made one chunk of heads at a time. Grouped-query
heads share their key/value head without `repeat_kv`: a group's query rows stack on one matrix.

`attention_forward` takes the place of transformers' "sdpa" attention under
`fused_ops.fused_forwards` where `applies` says so (bf16 CPU tensors, causal, no mask, no
dropout, no cache, gradients wanted), and calls transformers' own otherwise.
"""

from __future__ import annotations

import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from graftlm.kernels import fused_cpu

# score values in one chunk of heads: ~12 bytes each in the backward's temporaries (48 MiB)
MAX_SCORES_PER_CHUNK = 1 << 22


def applies(query, key, value, attention_mask, dropout: float, is_causal: bool, kwargs) -> bool:
    """Whether `CausalAttentionFunction` computes what transformers' sdpa attention would."""
    if attention_mask is not None or dropout or not is_causal or not torch.is_grad_enabled():
        return False
    if any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sliding_window")):
        return False
    if query.dim() != 4 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        return False
    (batch, heads, seq, _), kv_heads = query.shape, key.shape[1]
    if seq < 2 or key.shape[0] != batch or key.shape[2] != seq or heads % kv_heads:
        return False
    fits = heads // kv_heads * seq * seq <= MAX_SCORES_PER_CHUNK
    return fits and fused_cpu.applies(query, key, value, dtypes=(torch.bfloat16,))


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention interface: (batch, heads, seq, dim) in, (batch, seq, heads,
    dim) out, and no attention weights."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not applies(query, key, value, attention_mask, dropout, causal, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    out = CausalAttentionFunction.apply(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


class CausalAttentionFunction(torch.autograd.Function):
    """`softmax(scale * q @ k^T, causal) @ v` for bf16 q `(batch, heads, seq, dim)` and k, v
    `(batch, kv_heads, seq, dim)`; heads a multiple of kv_heads."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        group_rows = heads // kv_heads * seq
        # (batch, heads, seq, dim) -> (batch * kv_heads, group * seq, dim): a group's rows stack
        qg = q.contiguous().view(batch * kv_heads, group_rows, dim)
        kc = k.contiguous().view(batch * kv_heads, seq, dim)
        vc = v.contiguous().view(batch * kv_heads, seq, dim)
        out = torch.empty_like(qg)
        lse = torch.empty(batch * kv_heads, group_rows)
        softmax = fused_cpu.library().graftlm_causal_softmax
        for part in _chunks(qg.shape[0], group_rows * seq):
            n = part.stop - part.start
            scores = _scores(qg[part], kc[part])
            p = _scratch("p", (n, group_rows, seq), torch.bfloat16)
            softmax(
                scores.data_ptr(), p.data_ptr(), lse[part].data_ptr(), n, group_rows, seq,
                scale, _threads(scores),
            )  # fmt: skip
            torch.bmm(p, vc[part], out=out[part])
        ctx.save_for_backward(qg, kc, vc, out, lse)
        ctx.scale, ctx.q_shape, ctx.kv_shape = scale, q.shape, k.shape
        return out.view(batch, heads, seq, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qg, kc, vc, out, lse = ctx.saved_tensors
        mats, group_rows, _ = qg.shape
        seq = kc.shape[1]
        g = grad.contiguous().view_as(out)
        # rowsum(dP * P) = rowsum(g * out), in fp32
        delta = torch.empty(mats, group_rows)
        fused_cpu.library().graftlm_row_dot(
            g.data_ptr(), out.data_ptr(), delta.data_ptr(), mats * group_rows, out.shape[-1], 1
        )
        dq, dk, dv = torch.empty_like(qg), torch.empty_like(kc), torch.empty_like(vc)
        softmax_backward = fused_cpu.library().graftlm_causal_softmax_backward
        for part in _chunks(mats, group_rows * seq):
            n = part.stop - part.start
            scores = _scores(qg[part], kc[part])
            shape = scores.shape
            dp = torch.bmm(g[part], vc[part].transpose(1, 2), out=_scratch("dp", shape))
            p, ds = _scratch("p", shape), _scratch("ds", shape)
            softmax_backward(
                scores.data_ptr(), lse[part].data_ptr(), dp.data_ptr(), delta[part].data_ptr(),
                p.data_ptr(), ds.data_ptr(), n, group_rows, seq, ctx.scale, _threads(scores),
            )  # fmt: skip
            torch.bmm(p.transpose(1, 2), g[part], out=dv[part])
            torch.bmm(ds, kc[part], out=dq[part])
            torch.bmm(ds.transpose(1, 2), qg[part], out=dk[part])
        return dq.view(ctx.q_shape), dk.view(ctx.kv_shape), dv.view(ctx.kv_shape), None


# Temporaries of the size of the score matrices, kept from one call to the next: fresh ones
# (tens of MB, mapped anew by the allocator every call) page-faulted for longer than the
# softmax took. At most MAX_SCORES_PER_CHUNK values each; training calls these one at a time.
_SCRATCH: dict[str, torch.Tensor] = {}


def _scratch(name: str, shape, dtype=torch.bfloat16) -> torch.Tensor:
    numel = math.prod(shape)
    buffer = _SCRATCH.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype is not dtype:
        buffer = _SCRATCH[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`q @ k^T` in fp32 from bf16 q and k, into the scratch scores."""
    shape = (q.shape[0], q.shape[1], k.shape[1])
    return torch.bmm(q.float(), k.float().transpose(1, 2), out=_scratch("s", shape, torch.float32))


def _chunks(mats: int, scores_per_mat: int):
    per_chunk = max(1, MAX_SCORES_PER_CHUNK // scores_per_mat)
    return [slice(start, min(start + per_chunk, mats)) for start in range(0, mats, per_chunk)]


def _threads(scores: torch.Tensor) -> int:
    return max(1, min(torch.get_num_threads(), scores.numel() // fused_cpu.MIN_VALUES_PER_THREAD))
