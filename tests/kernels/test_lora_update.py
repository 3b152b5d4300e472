"""The fused LoRA update of a training step (kernels/lora_update.py) against the plain form:
same forward and gradients up to bf16 rounding (bf16 autocast) or fp32 rounding (float32),
taken only where it applies."""

from __future__ import annotations

import contextlib
import json

import helpers
import pytest
import torch

from graftlm.kernels import lora_update
from graftlm.kernels.lora_update import LoraUpdateFunction
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject
from graftlm.train.loop import train

BF16 = torch.bfloat16


def _model(dropout: float = 0.0, dtype: torch.dtype = BF16, targets="q_proj,v_proj", quantize=None):
    model = helpers.tiny_llama().to(dtype)  # the base in bf16, as graftlm trains it there
    config = LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout, quantize=quantize)
    inject(model, config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 adapter, as graftlm trains it
            if "lora_B" in name:  # B = 0 at init would hide A's gradients
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def _forward_backward(model, ids, fused: bool, autocast: bool = True):
    model.zero_grad(set_to_none=True)
    scope = lora_update.enabled() if fused else contextlib.nullcontext()
    with scope, torch.autocast("cpu", dtype=BF16, enabled=autocast):
        logits = model(input_ids=ids).logits
        kinds = {
            type(node).__name__
            for node in _graph_nodes(logits.grad_fn)
            if "LoraUpdateFunction" in type(node).__name__
        }
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, bool(kinds)


def _graph_nodes(node, seen=None):
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return seen
    seen.add(node)
    for parent, _ in node.next_functions:
        _graph_nodes(parent, seen)
    return seen


def test_fused_model_matches_the_plain_form_forward_and_backward():
    model = _model()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    )
    logits, grads, used = _forward_backward(model, ids, fused=True)
    expected_logits, expected, plain_used = _forward_backward(model, ids, fused=False)
    assert used and not plain_used
    torch.testing.assert_close(logits, expected_logits, rtol=2e-2, atol=2e-2)
    assert grads.keys() == expected.keys() and sum("lora_A" in n for n in grads) == 4
    assert all(g.dtype is torch.float32 for g in grads.values())
    _assert_bf16_gradients_close(grads, expected, 5e-2)  # seen: up to 2.5% over 60 inits


def _assert_bf16_gradients_close(grads: dict, expected: dict, tolerance: float) -> None:
    """Each bf16 gradient within `tolerance` of the plain form's, relative to its norm. The
    models here are drawn from the global generator, so each test sees other weights by suite
    order; bf16 then moves a few elements of a gradient summed over tokens by several of its
    steps (seen: up to 4-7% of the matrix's largest element, over 60 draws), while a wrong
    product moves the whole matrix."""
    for name in grads:
        error = (grads[name] - expected[name]).float().norm() / expected[name].float().norm()
        assert error <= tolerance, (name, error.item())


def test_float32_model_matches_the_plain_form_to_fp32_rounding():
    model = _model(dtype=torch.float32)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    )
    logits, grads, used = _forward_backward(model, ids, fused=True, autocast=False)
    expected_logits, expected, plain_used = _forward_backward(
        model, ids, fused=False, autocast=False
    )
    assert used and not plain_used
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys() and sum("lora_A" in n for n in grads) == 4
    for name in grads:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["float32", "bf16"])
def test_4bit_base_takes_the_fused_update_and_keeps_no_full_precision_weight(dtype):
    """QLoRA's layers: the update inside the product of the weight dequantized for it (forward
    and again in backward), the same numbers as the plain form (`_NF4Matmul` plus the
    adapter's ops), and no (out, in) weight saved for the backward."""
    model = _model(dtype=dtype, targets="all-linear", quantize="nf4")
    autocast = dtype is BF16
    ids = torch.randint(
        0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    )
    weight_shapes = {
        (m.out_features, m.in_features) for m in model.modules() if hasattr(m, "base_layer")
    }
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, grads, used = _forward_backward(model, ids, fused=True, autocast=autocast)
    assert used and not weight_shapes & set(saved_shapes)
    expected_logits, expected, plain_used = _forward_backward(
        model, ids, fused=False, autocast=autocast
    )
    assert not plain_used
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2  # bf16: as the dense test above
    torch.testing.assert_close(logits, expected_logits, rtol=tolerance, atol=tolerance)
    assert grads.keys() == expected.keys() and sum("lora_A" in n for n in grads) == 14
    if dtype is BF16:
        # the plain form rounds the update three times, the fused one once (seen: up to 4.4%)
        _assert_bf16_gradients_close(grads, expected, 1e-1)
        return
    for name in grads:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5 * scale)


def test_float32_function_matches_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=generator).requires_grad_()
    weight, b = torch.randn(20, 24, generator=generator), torch.randn(20, generator=generator)
    a = torch.randn(4, 24, generator=generator).requires_grad_()
    lb = torch.randn(20, 4, generator=generator).requires_grad_()
    grad = torch.randn(2, 7, 20, generator=generator)
    out = LoraUpdateFunction.apply(x, weight, b, a, lb, 2.0)
    out.backward(grad)
    wide = [t.detach().double().requires_grad_() for t in (x, a, lb)]
    reference = wide[0] @ weight.double().t() + b.double()
    reference = reference + 2.0 * (wide[0] @ wide[1].t()) @ wide[2].t()
    reference.backward(grad.double())
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip((x.grad, a.grad, lb.grad), (w.grad for w in wide)):
        assert got.dtype is torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_function_matches_float64(bias):
    generator = torch.Generator().manual_seed(0)
    tokens, d_in, d_out, rank, scale = 13, 24, 20, 4, 2.0
    x = torch.randn(1, tokens, d_in, generator=generator).to(BF16).requires_grad_()
    weight = torch.randn(d_out, d_in, generator=generator).to(BF16)
    b = torch.randn(d_out, generator=generator).to(BF16) if bias else None
    a = torch.randn(rank, d_in, generator=generator).requires_grad_()
    lb = torch.randn(d_out, rank, generator=generator).requires_grad_()
    grad = torch.randn(1, tokens, d_out, generator=generator).to(BF16)
    out = LoraUpdateFunction.apply(x, weight, b, a, lb, scale)
    out.backward(grad)
    # A and B as the products see them: rounded to bf16, as autocast rounds them
    wide = [t.detach().to(BF16).double().requires_grad_() for t in (x, a, lb)]
    reference = wide[0] @ weight.double().t() + scale * (wide[0] @ wide[1].t()) @ wide[2].t()
    if bias:
        reference = reference + b.double()
    reference.backward(grad.double())
    # each product's output is rounded to bf16 once (2^-9 relative), the sum of two twice
    size = reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-2, atol=1e-2 * size)
    for got, want in zip((x.grad, a.grad, lb.grad), (w.grad for w in wide)):
        assert got.dtype is (BF16 if got is x.grad else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max())


def test_applies_only_to_a_cpu_training_step_inside_the_scope():
    x = torch.randn(2, 3, 8).to(BF16)
    weight = torch.randn(4, 8).to(BF16)
    with lora_update.enabled():  # weight None: a 4-bit weight dequantized to x's dtype
        assert lora_update.applies(x.float(), None, None)
        assert not lora_update.applies(x.float(), None, weight)  # a bf16 bias
        assert not lora_update.applies(x.double(), None, None)
    with torch.autocast("cpu", dtype=BF16):
        assert not lora_update.applies(x, weight, None)  # outside enabled()
    with lora_update.enabled():
        assert not lora_update.applies(x, weight, None)  # bf16 tensors without autocast
        # float32 throughout, no autocast: the float32 step
        assert lora_update.applies(x.float(), weight.float(), None)
        assert not lora_update.applies(x.float(), weight, None)
        assert not lora_update.applies(x.double(), weight.double(), None)
        with torch.autocast("cpu", dtype=BF16):
            assert lora_update.applies(x, weight, None)
            assert not lora_update.applies(x.float(), weight, None)  # float32 input
            # only CPU tensors: other devices (CUDA) keep the plain form
            assert not lora_update.applies(x.to("meta"), weight.to("meta"), None)
            assert not lora_update.applies(x, weight.float(), None)
            assert not lora_update.applies(x, weight.clone().requires_grad_(), None)
            with torch.no_grad():
                assert not lora_update.applies(x, weight, None)  # inference
    assert not lora_update.applies(x, weight, None)  # the scope is closed again


def test_dropout_keeps_the_plain_form():
    model = _model(dropout=0.1)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0)
    )
    _, _, used = _forward_backward(model, ids, fused=True)
    assert not used


def _losses(tmp_path, model_dir, name, **overrides):
    (tmp_path / name).mkdir()
    cfg = helpers.base_cfg(
        tmp_path / name, model_dir, dtype="bfloat16", steps=3, save_every=100, lr=5e-3,
        targets="q_proj,v_proj", **overrides,
    )  # fmt: skip
    train(cfg, progress=False)
    rows = [
        json.loads(r) for r in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    return [r["loss"] for r in rows if "loss" in r]


def test_bf16_training_with_the_fused_update_matches_without_and_under_checkpointing(
    tmp_path, monkeypatch
):
    model_dir = helpers.save_tiny_model_dir(tmp_path / "model")
    calls = []
    forward = LoraUpdateFunction.forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    monkeypatch.setattr(LoraUpdateFunction, "forward", staticmethod(counted))
    fused = _losses(tmp_path, model_dir, "fused")
    assert calls  # graftlm's training loop takes the fused update
    plain = _losses(tmp_path, model_dir, "plain", fused_kernels=False)
    # checkpointed layers recompute the forward in the backward: the same function again
    recomputed = _losses(tmp_path, model_dir, "recomputed", activation_checkpointing=True)
    assert len(fused) == 3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-2, atol=0)
    torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(fused), rtol=1e-3, atol=0)
