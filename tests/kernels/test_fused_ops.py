"""The fused RMSNorm / rotary / SwiGLU kernels against transformers' own modules: the torch
functions of `fused_ops.py` (what runs where the C kernels do not) bit for bit in float32, and
the C kernels of `fused_cpu.py` (what a float32 CPU step runs) to fp32 rounding."""

from __future__ import annotations

import helpers
import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from graftlm.kernels import fused_cpu
from graftlm.kernels.fused_ops import (
    RMSNormFunction,
    RotaryFunction,
    SwiGLUFunction,
    apply_rotary_pos_emb,
    fused_forwards,
)
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject


@pytest.fixture
def torch_path(monkeypatch):
    """The torch functions of fused_ops.py instead of the C kernels, for this test."""
    monkeypatch.setenv(fused_cpu.DISABLE_VAR, "0")
    fused_cpu.clear_cache()
    yield
    monkeypatch.delenv(fused_cpu.DISABLE_VAR)
    fused_cpu.clear_cache()


def test_functions_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-6), (x, weight))
    cos, sin = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: RotaryFunction.apply(a, cos, sin), (x,))
    up = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x, up))


def test_rotary_forward_is_bit_identical_to_transformers(torch_path):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kernels", ["torch", "c"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_model_matches_transformers(kind, kernels, monkeypatch):
    if kernels == "torch":
        monkeypatch.setenv(fused_cpu.DISABLE_VAR, "0")
    elif fused_cpu.library() is None:
        pytest.skip("no C compiler or no AVX2 here: the torch path runs")
    fused_cpu.clear_cache()
    model = helpers.tiny_model_factory(kind, seed=3)
    inject(model, LoraConfig(rank=4, alpha=8))
    for name, param in model.named_parameters():  # B = 0 at init would hide gradients of A
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    reference_logits, reference = _loss_and_grads(model, ids)
    with fused_forwards(model) as switched:
        # the layer, its two norms and its MLP, plus the final norm
        assert switched == 4 * model.config.num_hidden_layers + 1
        logits, grads = _loss_and_grads(model, ids)
    fused_cpu.clear_cache()
    if kernels == "torch":  # transformers' formulas in the same order
        assert torch.equal(logits, reference_logits)
    else:  # the row sums in another order, the exponential's polynomial
        torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forwards_restores_everything_on_exit():
    model = helpers.tiny_llama()
    original_rope = modeling_llama.apply_rotary_pos_emb
    with fused_forwards(model):
        assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
        assert "forward" in model.model.norm.__dict__
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_unrecognised_architecture_runs_unchanged():
    model = helpers.tiny_gpt2()
    with fused_forwards(model) as switched:
        assert switched == 0
