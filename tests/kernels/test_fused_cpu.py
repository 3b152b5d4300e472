"""The C kernels of a training step (RMSNorm, SwiGLU, rotary, the loss's cross-entropy in bf16
and float32; causal attention in bf16) against float64 references, and a few training steps of
a tiny Llama with and without them."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from graftlm.kernels import causal_attention, fused_cpu
from graftlm.kernels.fused_ops import apply_rotary_pos_emb, fused_forwards
from graftlm.train.loop import train
from graftlm.train.loss import fused_lm_loss_sum

pytestmark = pytest.mark.skipif(
    fused_cpu.library() is None, reason="no C compiler or no AVX2 here: the torch path runs"
)

BF16 = torch.bfloat16
DTYPES = [BF16, torch.float32]
# bf16 keeps 8 significant bits: one rounding is 2^-9 relative; a forward rounds twice
TOL = dict(rtol=2e-2, atol=2e-2)
# float32: the row sums' order and the exponential's polynomial, a few ulp
FP32_TOL = dict(rtol=2e-5, atol=2e-5)


def _tol(dtype: torch.dtype) -> dict:
    return TOL if dtype is BF16 else FP32_TOL


def _randn(*shape, seed=0, dtype=BF16):
    """Standard normal values from `seed`, in `dtype` (bf16 unless a float32 test asks)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _reference_grads(fn, inputs, grad):
    """fn over float64 copies of `inputs`; its output and the gradients of `(out * grad).sum()`."""
    wide = [_leaf(t.double()) for t in inputs]
    out = fn(*wide)
    out.backward(grad.double())
    return out.detach(), [w.grad for w in wide]


def _rms_norm(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (5, 17), (3, 576), (64, 600)])
def test_rms_norm_forward_and_backward_match_float64(rows, n, dtype):
    x = _randn(rows, n, seed=1, dtype=dtype)
    w = (1 + 0.1 * _randn(n, seed=2).float()).to(dtype)
    grad = _randn(rows, n, seed=3, dtype=dtype)
    xs, ws = _leaf(x), _leaf(w)
    out = fused_cpu.RMSNormFunction.apply(xs, ws, 1e-5)
    out.backward(grad)
    expected, (gx, gw) = _reference_grads(_rms_norm, [x, w], grad)
    assert out.dtype is dtype and xs.grad.dtype is dtype and ws.grad.dtype is dtype
    tol = _tol(dtype)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(xs.grad.double(), gx, **tol)
    # dweight sums `rows` products: its error grows with the sum's size
    torch.testing.assert_close(ws.grad.double(), gw, rtol=tol["rtol"], atol=tol["atol"] * rows**0.5)


def test_rms_norm_forward_is_transformers_bf16_up_to_one_rounding():
    x, w = _randn(4, 9, 96, seed=4), _randn(96, seed=5)
    hidden = x.float()
    expected = w * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16)
    got = fused_cpu.RMSNormFunction.apply(x, w, 1e-6)
    # the same roundings; only the fp32 row sums' order may move a value by one bf16 step
    ulp = expected.float().abs() * 2**-7 + 1e-30
    assert ((got.float() - expected.float()).abs() <= ulp).all()
    assert (got == expected).float().mean() > 0.97


def test_rms_norm_takes_a_non_contiguous_input():
    wide, w = _randn(6, 2 * 40, seed=6), _randn(40, seed=7)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    got = fused_cpu.RMSNormFunction.apply(x, w, 1e-6)
    assert torch.equal(got, fused_cpu.RMSNormFunction.apply(x.contiguous(), w, 1e-6))


def test_rms_norm_threads_split_rows_without_changing_results():
    x, w, grad = _randn(64, 576, seed=8), _randn(576, seed=9), _randn(64, 576, seed=10)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            xs, ws = _leaf(x), _leaf(w)
            fused_cpu.RMSNormFunction.apply(xs, ws, 1e-6).backward(grad)
            results.append((xs.grad, ws.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])  # rows are independent
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-2, atol=1e-2)


def _swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7, 37), (2, 4100)])
def test_swiglu_forward_and_backward_match_float64(shape, dtype):
    gate = 3 * _randn(*shape, seed=11, dtype=dtype)
    up, grad = _randn(*shape, seed=12, dtype=dtype), _randn(*shape, seed=13, dtype=dtype)
    gs, us = _leaf(gate), _leaf(up)
    out = fused_cpu.SwiGLUFunction.apply(gs, us)
    out.backward(grad)
    expected, (gg, gu) = _reference_grads(_swiglu, [gate, up], grad)
    assert out.dtype is dtype and gs.grad.dtype is dtype
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))
    torch.testing.assert_close(gs.grad.double(), gg, **_tol(dtype))
    torch.testing.assert_close(us.grad.double(), gu, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_extremes_and_nan(dtype):
    values = [-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("nan")]
    gate = torch.tensor(values).to(dtype)
    up = torch.ones_like(gate)
    got = fused_cpu.SwiGLUFunction.apply(gate, up).float()
    expected = _swiglu(gate.double(), up.double()).float()
    rtol = 1e-2 if dtype is BF16 else 1e-5
    torch.testing.assert_close(got[:-1], expected[:-1], rtol=rtol, atol=1e-6)
    assert torch.isnan(got[-1])


def _rotary_tables(batch, seq, dim, seed, equal_halves=True, dtype=BF16):
    if equal_halves:  # transformers' tables: cat(freqs, freqs)
        angles = torch.arange(seq)[:, None] * torch.rand(dim // 2, generator=_gen(seed))
        angles = torch.cat([angles, angles], -1).expand(batch, seq, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (
        _randn(batch, seq, dim, seed=seed, dtype=dtype),
        _randn(batch, seq, dim, seed=seed + 1, dtype=dtype),
    )


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_batch", [1, 2])
@pytest.mark.parametrize("dim,equal_halves", [(64, True), (6, True), (10, False)])
def test_rotary_forward_and_backward_match_float64(table_batch, dim, equal_halves, dtype):
    batch, heads, seq = 2, 3, 5
    cos, sin = _rotary_tables(table_batch, seq, dim, 14, equal_halves, dtype)
    cos, sin = cos[:, None], sin[:, None]  # (batch or 1, 1, seq, dim)
    # transformers' q: (batch, seq, heads, dim) projected, viewed as (batch, heads, seq, dim)
    x = _randn(batch, seq, heads, dim, seed=16, dtype=dtype).transpose(1, 2)
    grad = _randn(batch, heads, seq, dim, seed=17, dtype=dtype)
    assert fused_cpu.rotary_applies(x, cos, sin)
    xs = _leaf(x)
    out = fused_cpu.RotaryFunction.apply(xs, cos, sin)
    assert out.is_contiguous() and not x.is_contiguous()  # what the attention reads
    out.backward(grad)

    def reference(a, c, s):
        return a * c + _rotate_half(a) * s

    expected, (gx, _, _) = _reference_grads(reference, [x, cos, sin], grad)
    assert out.dtype is dtype and xs.grad.dtype is dtype
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))
    torch.testing.assert_close(xs.grad.double(), gx, **_tol(dtype))


def test_rotary_refuses_shapes_it_does_not_take():
    x = _randn(1, 2, 3, 7)  # odd dim
    cos = _randn(1, 1, 3, 7)
    assert not fused_cpu.rotary_applies(x, cos, cos)
    x = _randn(1, 2, 3, 8)
    assert not fused_cpu.rotary_applies(x, _randn(1, 2, 3, 8), _randn(1, 2, 3, 8))  # per head


def test_fused_forwards_dispatch_bf16_and_float32_to_the_c_kernels_and_float64_to_torch(
    monkeypatch,
):
    calls = []
    original = fused_cpu.SwiGLUFunction.apply
    monkeypatch.setattr(
        fused_cpu.SwiGLUFunction, "apply", lambda *a: calls.append(1) or original(*a)
    )
    model = helpers.tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    for dtype, expected in ((torch.float64, False), (torch.float32, True), (BF16, True)):
        calls.clear()
        model.to(dtype)
        hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)
        with fused_forwards(model):
            normed = model.model.norm(hidden)
            model.model.layers[0].mlp(hidden)
            table = torch.ones(1, 6, 8, dtype=dtype)
            q, _ = apply_rotary_pos_emb(
                torch.ones(1, 2, 6, 8, dtype=dtype, requires_grad=True),
                torch.ones(1, 2, 6, 8, dtype=dtype),
                table,
                table,
            )
        for out in (normed, q):
            function = getattr(out.grad_fn, "_forward_cls", None)  # None: torch's own ops
            assert (getattr(function, "__module__", None) == fused_cpu.__name__) is expected
        assert bool(calls) is expected


@pytest.mark.parametrize("dtype,rtol", [("bfloat16", 1e-2), ("float32", 1e-5)])
def test_training_losses_match_with_and_without_the_kernels(tmp_path, monkeypatch, dtype, rtol):
    model_dir = helpers.save_tiny_model_dir(tmp_path / "model")
    losses = {}
    for kernels in ("1", "0"):
        monkeypatch.setenv(fused_cpu.DISABLE_VAR, kernels)
        fused_cpu.clear_cache()
        (tmp_path / kernels).mkdir()
        cfg = helpers.base_cfg(
            tmp_path / kernels, model_dir, dtype=dtype, steps=4, save_every=100, lr=5e-3
        )
        train(cfg, progress=False)
        rows = (tmp_path / kernels / "out" / "metrics.jsonl").read_text().splitlines()
        losses[kernels] = [json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]
    fused_cpu.clear_cache()
    assert len(losses["1"]) == 4
    torch.testing.assert_close(
        torch.tensor(losses["1"]), torch.tensor(losses["0"]), rtol=rtol, atol=0
    )


def _attention_inputs(batch, heads, kv_heads, seq, dim, seed):
    q = _randn(batch, seq, heads, dim, seed=seed).transpose(1, 2)  # transformers' layout
    k = _randn(batch, kv_heads, seq, dim, seed=seed + 1)
    v = _randn(batch, kv_heads, seq, dim, seed=seed + 2)
    return q, k, v, _randn(batch, heads, seq, dim, seed=seed + 3)


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 10), (1, 3, 3, 33, 16), (2, 6, 2, 64, 64)])
@pytest.mark.parametrize("chunk", [None, 1])
def test_causal_attention_matches_float64(shape, chunk, monkeypatch):
    batch, heads, kv_heads, seq, dim = shape
    if chunk:  # one (batch, kv head) matrix per chunk
        monkeypatch.setattr(causal_attention, "MAX_SCORES_PER_CHUNK", heads // kv_heads * seq**2)
    q, k, v, grad = _attention_inputs(*shape, seed=20)
    leaves = [_leaf(t) for t in (q, k, v)]
    out = causal_attention.CausalAttentionFunction.apply(*leaves, dim**-0.5)
    out.backward(grad)

    def reference(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    expected, expected_grads = _reference_grads(reference, [q, k, v], grad)
    torch.testing.assert_close(out.double(), expected, **TOL)
    for leaf, wanted in zip(leaves, expected_grads):
        assert leaf.grad.dtype is BF16 and leaf.grad.shape == wanted.shape
        torch.testing.assert_close(leaf.grad.double(), wanted, rtol=3e-2, atol=3e-2)


def _uses_causal_kernel(out: torch.Tensor) -> bool:
    nodes, seen = [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "_forward_cls", None) is causal_attention.CausalAttentionFunction:
            return True
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return False


def test_attention_forward_leaves_masks_no_grad_and_float32_to_sdpa():
    module = torch.nn.Module()
    q, k, v, _ = _attention_inputs(1, 2, 2, 5, 8, seed=30)
    q.requires_grad_(True)
    ours, _ = causal_attention.attention_forward(module, q, k, v, None)
    assert _uses_causal_kernel(ours)
    assert ours.shape == (1, 5, 2, 8)  # (batch, seq, heads, dim), as transformers' sdpa
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    for args, kwargs in (
        ((q, k, v, mask), {}),  # a mask: padding, shared prefixes
        ((q, k, v, None), {"dropout": 0.1}),
        ((q.detach(), k, v, None), {}),
        ((q.float(), k.float(), v.float(), None), {}),
        ((q[:, :, :4], k, v, None), {}),  # fewer queries than keys (a cache)
    ):
        out, _ = causal_attention.attention_forward(module, *args, **kwargs)
        assert not _uses_causal_kernel(out)
    with torch.no_grad():
        expected, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(ours.detach(), expected, rtol=2e-2, atol=2e-2)


def test_fused_forwards_swap_sdpa_for_the_causal_kernel_and_back():
    model = helpers.tiny_llama()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with fused_forwards(model):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is causal_attention.attention_forward
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 5), (7, 1000), (3, 49157)])
def test_cross_entropy_and_its_gradient_in_place_match_float64(rows, vocab, dtype):
    logits = (4 * _randn(rows, vocab, seed=40).float()).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=_gen(41))
    wide = logits.double().requires_grad_(True)
    expected = F.cross_entropy(wide, targets, reduction="none")
    expected.sum().backward()
    work = logits.clone()
    loss = fused_cpu.cross_entropy_(work, targets)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    # the gradient overwrote the logits, rounded once to their dtype
    assert work.dtype is dtype
    close = dict(rtol=1e-2, atol=1e-3) if dtype is BF16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(work.double(), wide.grad, **close)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_loss_matches_the_torch_path(monkeypatch, dtype):
    hidden = _randn(1, 41, 32, seed=42, dtype=dtype).requires_grad_(True)
    weight = _randn(300, 32, seed=43, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, 300, (1, 41), generator=_gen(44))
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv(fused_cpu.DISABLE_VAR, kernels)
        fused_cpu.clear_cache()
        hidden.grad = weight.grad = None
        total, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=16)
        total.backward()
        results.append((total.detach(), hidden.grad.clone(), weight.grad.clone()))
    fused_cpu.clear_cache()
    (loss, *grads), (expected_loss, *expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4 if dtype is BF16 else 1e-6, atol=0)
    close = dict(rtol=2e-2, atol=2e-3) if dtype is BF16 else dict(rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, **close)
