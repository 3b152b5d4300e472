"""The decode-step linear kernel: equal to F.linear, batch-invariant, used only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftlm.kernels import build
from graftlm.kernels import small_batch_linear as sbl
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject, lora_layers, merge, unmerge
from tests.helpers import tiny_llama

needs_kernel = pytest.mark.skipif(
    sbl.kernel() is None, reason="no C compiler or no AVX2/FMA on this machine"
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("shape", [(96, 64), (37, 61), (5, 8), (1, 3)])
def test_kernel_matches_f_linear(rows, shape):
    generator = torch.Generator().manual_seed(rows)
    out_features, in_features = shape
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    got = sbl.small_batch_linear(x, weight)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sbl.small_batch_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5
    )


@needs_kernel
def test_kernel_takes_leading_dims_and_strided_rows():
    x = torch.randn(4, 1, 70)
    weight = torch.randn(33, 70)
    got = sbl.small_batch_linear(x, weight)
    assert got.shape == (4, 1, 33)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    wide = torch.randn(3, 140)
    view = wide[:, ::2]  # last-dim stride 2: copied first
    torch.testing.assert_close(
        sbl.small_batch_linear(view, weight), F.linear(view, weight), rtol=1e-5, atol=1e-5
    )
    rows = wide[:, :70]  # row stride 140, last-dim stride 1: read in place
    torch.testing.assert_close(
        sbl.small_batch_linear(rows, weight), F.linear(rows, weight), rtol=1e-5, atol=1e-5
    )


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 203, generator=generator)
    weight = torch.randn(77, 203, generator=generator)
    full = sbl.small_batch_linear(x, weight)
    for rows in range(1, 17):
        assert torch.equal(sbl.small_batch_linear(x[:rows], weight), full[:rows]), rows
        assert torch.equal(
            sbl.small_batch_linear(x[rows - 1 : rows], weight), full[rows - 1 : rows]
        )


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_add_lora_matches_torch_per_row_slots(rows):
    generator = torch.Generator().manual_seed(rows)
    slots_n, rank, in_features, out_features = 3, 6, 37, 45
    a = torch.randn(slots_n, rank, in_features, generator=generator)
    b = torch.randn(slots_n, out_features, rank, generator=generator)
    scales = torch.tensor([0.5, 2.0, -1.0])
    x = torch.randn(rows, 1, in_features, generator=generator)
    base = torch.randn(rows, 1, out_features, generator=generator)
    slots = torch.randint(-1, slots_n, (rows,), generator=generator)
    want = base.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want[i] += scales[slot] * (x[i] @ a[slot].T @ b[slot].T)
    got = base.clone()
    b_t = b.transpose(1, 2).contiguous()
    with torch.no_grad():
        assert sbl.add_lora(x, a, b_t, scales, got, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    one = base.clone()  # one adapter for every row: (r, in) and (out, r), no slots
    with torch.no_grad():
        assert sbl.add_lora(x, a[1], b_t[1], sbl.scale_tensor(2.0), one)
    torch.testing.assert_close(one, base + 2.0 * (x @ a[1].T @ b[1].T), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_add_lora_rows_do_not_depend_on_their_batch():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, 40, generator=generator)
    b = torch.randn(2, 24, 8, generator=generator)
    scales = torch.tensor([1.5, 0.25])
    x = torch.randn(12, 40, generator=generator)
    slots = torch.tensor([0, 1] * 6)
    b_t = b.transpose(1, 2).contiguous()
    full = torch.zeros(12, 24)
    with torch.no_grad():
        sbl.add_lora(x, a, b_t, scales, full, slots)
        for row in range(12):
            alone = torch.zeros(1, 24)
            sbl.add_lora(x[row : row + 1], a, b_t, scales, alone, slots[row : row + 1])
            assert torch.equal(alone, full[row : row + 1]), row


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_equals_linear_then_add_lora(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    rank, in_features, out_features = 7, 53, 41
    x = torch.randn(rows, 1, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    a = torch.randn(rank, in_features, generator=generator)
    b_t = torch.randn(rank, out_features, generator=generator)
    with torch.no_grad():
        want = sbl.linear(x, weight, bias)
        assert sbl.add_lora(x, a, b_t, sbl.scale_tensor(0.75), want)
        got = sbl.lora_linear(x, weight, bias, a, b_t, 0.75)
        assert torch.equal(got, want)  # the same operations in the same order
        first = sbl.lora_linear(x[:1], weight, bias, a, b_t, 0.75)
        assert torch.equal(first, got[:1])  # and a row's result does not depend on its batch
    plain = F.linear(x, weight, bias) + 0.75 * (x @ a.T @ b_t)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-4)
    assert sbl.lora_linear(x, weight, bias, a, b_t, 0.75) is None  # autograd on: torch's job
    with torch.no_grad():
        prompt = torch.randn(2, 3, in_features)  # several tokens per sequence
        assert sbl.lora_linear(prompt, weight, bias, a, b_t, 0.75) is None


@needs_kernel
def test_lora_layer_decode_step_is_one_call_and_equals_torch(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 40))
    sbl.use_small_batch_kernel(layer)
    inject(layer, LoraConfig(rank=4, alpha=8, targets=("0",)))
    lora = layer[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    x = torch.randn(3, 1, 24)
    with torch.no_grad():
        base = F.linear(x, lora.weight, lora.bias)
        update = x @ lora.lora_A["default"].weight.T @ lora.lora_B["default"].weight.T
    want = base + lora.scaling["default"] * update
    calls = []
    real = sbl.lora_linear
    monkeypatch.setattr(sbl, "lora_linear", lambda *a: calls.append(1) or real(*a))
    lora.eval()
    with torch.inference_mode():
        got = layer(x)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the cached B transposed follows an in-place edit of B
        lora.lora_B["default"].weight.mul_(2)
        again = layer(x)
    torch.testing.assert_close(again - base, 2 * (want - base), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_add_lora_declines_where_torch_should_run():
    a, b, scale = torch.randn(4, 8), torch.randn(6, 4), sbl.scale_tensor(1.0)
    out = torch.zeros(2, 6)
    assert not sbl.add_lora(torch.randn(2, 8), a, b, scale, out)  # autograd on
    with torch.no_grad():
        assert not sbl.add_lora(torch.randn(sbl.MAX_ROWS + 1, 8), a, b, scale, torch.zeros(17, 6))
        assert not sbl.add_lora(torch.randn(2, 8).double(), a, b, scale, out)
        assert not sbl.add_lora(torch.randn(2, 8), a, b, scale, torch.zeros(6, 2).t())
    assert torch.equal(out, torch.zeros(2, 6))


@needs_kernel
def test_linear_dispatch_keeps_autograd_and_large_batches_on_torch(monkeypatch):
    calls = []
    real = sbl._run
    monkeypatch.setattr(sbl, "_run", lambda *a: calls.append(1) or real(*a))
    weight = torch.randn(8, 16)
    x = torch.randn(4, 16)
    with torch.no_grad():
        sbl.linear(x, weight)
        sbl.linear(torch.randn(sbl.MAX_ROWS + 1, 16), weight)  # prefill-sized: torch
        sbl.linear(x.bfloat16(), weight.bfloat16())  # not fp32: torch
        sbl.linear(x, weight.t().contiguous().t())  # not contiguous: torch
        sbl.linear(torch.randn(2, 3, 16), weight)  # a prompt (3 tokens per sequence): torch
    assert len(calls) == 1
    with torch.no_grad():
        sbl.linear(torch.randn(5, 1, 16), weight)  # a decode step of 5 sequences
    assert len(calls) == 2
    leaf = torch.randn(8, 16, requires_grad=True)
    out = sbl.linear(x, leaf)  # autograd on: torch, and the gradient flows
    out.sum().backward()
    assert len(calls) == 2 and leaf.grad is not None


@needs_kernel
def test_model_with_kernel_generates_what_it_did_without():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    inject(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.5)
    plain = copy.deepcopy(model)
    changed = sbl.use_small_batch_kernel(model)
    assert changed == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.inference_mode():
        want = plain.generate(ids, max_new_tokens=12, do_sample=False)
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)
        step = ids[:, :1]
        torch.testing.assert_close(model(step).logits, plain(step).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, want)
    merge(model)  # merging rewrites the weight the kernel reads
    with torch.inference_mode():
        merged = model.generate(ids, max_new_tokens=12, do_sample=False)
    unmerge(model)
    assert torch.equal(merged, want)
    # training is untouched: gradients reach the adapter through the kernel-ready layers
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(
        b.weight.grad is not None for _, layer in lora_layers(model) for b in layer.lora_B.values()
    )


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(sbl.DISABLE_VAR, "0")
    sbl.clear_cache()
    try:
        assert sbl.kernel() is None
        model = nn.Sequential(nn.Linear(4, 4))
        assert sbl.use_small_batch_kernel(model) == 0
        assert type(model[0]) is nn.Linear
        with pytest.raises(RuntimeError, match="not available"):
            sbl.small_batch_linear(torch.randn(1, 4), torch.randn(4, 4))
    finally:
        monkeypatch.delenv(sbl.DISABLE_VAR)
        sbl.clear_cache()


def test_a_failed_compile_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAFTLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(build.shutil, "which", lambda name: "/bin/false")
    sbl.clear_cache()
    try:
        assert sbl.kernel() is None
        assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left
        with torch.no_grad():
            out = sbl.linear(torch.ones(2, 3), torch.ones(4, 3))
        assert torch.equal(out, torch.full((2, 4), 3.0))
    finally:
        sbl.clear_cache()
