"""A base that is already 4-bit (GGUF Q4_1) is kept on its own grid for QLoRA, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graftlm.kernels import nf4_dequant
from graftlm.quant.base_linears import dequantize_model_linears, quantize_model_linears
from graftlm.quant.nf4_linear import NF4Linear
from graftlm.quant.q4_grid import Q4GridLinear, find_q4_grid

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def q4_1_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight as GGUF's own Q4_1 quantizer and dequantizer (gguf-py) leave it."""
    rng = np.random.default_rng(seed)
    original = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    packed = gguf_quants.quantize(original, GGMLQuantizationType.Q4_1)
    return torch.from_numpy(gguf_quants.dequantize(packed, GGMLQuantizationType.Q4_1).copy())


def test_a_gguf_q4_1_weight_is_found_on_its_grid_and_rebuilt_exactly():
    weight = q4_1_weight(48, 96)
    grid = find_q4_grid(weight)
    assert grid is not None
    assert grid.packed.numel() == weight.numel() // 2
    assert grid.nbytes() == weight.numel() // 2 + 2 * 4 * weight.numel() // 32
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(grid.dequantize(dtype), weight.to(dtype))
    # the same bits into a reused buffer
    buffer = torch.empty(weight.numel(), dtype=torch.bfloat16)
    assert torch.equal(grid.dequantize(torch.bfloat16, out=buffer), weight.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_torch_paths_give_the_same_bits(monkeypatch, dtype):
    weight = q4_1_weight(64, 160, seed=1)
    grid = find_q4_grid(weight)
    with_kernel = grid.dequantize(dtype)
    monkeypatch.setenv(nf4_dequant.DISABLE_VAR, "0")
    nf4_dequant.clear_cache()
    try:
        in_torch = grid.dequantize(dtype)
    finally:
        monkeypatch.delenv(nf4_dequant.DISABLE_VAR)
        nf4_dequant.clear_cache()
    bits = torch.int32 if dtype is torch.float32 else torch.int16
    assert torch.equal(with_kernel.view(bits), in_torch.view(bits))


def test_weights_off_a_grid_are_not_taken_for_one():
    assert find_q4_grid(torch.randn(16, 64)) is None  # full precision
    weight = q4_1_weight(16, 64, seed=2)
    weight[3, 17] += 1e-4  # one value off its block's grid
    assert find_q4_grid(weight) is None
    assert find_q4_grid(q4_1_weight(4, 64).to(torch.bfloat16)) is None  # rounded to bf16
    assert find_q4_grid(torch.zeros(4, 48)) is None  # rows not made of 32-value blocks


def test_quantize_model_linears_keeps_grid_layers_and_rounds_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(q4_1_weight(32, 64, seed=3))
    x = torch.randn(5, 64)
    expected_first = model[0](x)
    summary = quantize_model_linears(model, compute_dtype=torch.float32)
    assert summary["count"] == 2 and summary["kept_on_grid"] == 1
    assert type(model[0]) is Q4GridLinear and type(model[1]) is NF4Linear
    assert torch.equal(model[0](x), expected_first)  # the same weights: the same products
    grad_input = torch.randn(5, 64, requires_grad=True)
    model[0](grad_input).sum().backward()  # backward dequantizes again
    assert torch.allclose(grad_input.grad, model[0].dequantized_weight().sum(0).expand(5, -1))
    assert dequantize_model_linears(model) == 2
    assert type(model[0]) is nn.Linear and torch.equal(model[0](x), expected_first)


@pytest.mark.slow
def test_qlora_on_the_builtin_q4_1_model_computes_what_its_bf16_base_does():
    """The built-in model's linear weights are all Q4_1: QLoRA keeps every one on its grid, read
    from the fp32 files, so the 4-bit base gives the very logits of the bf16 base LoRA trains on."""
    from graftlm.adapters.base_model import quantize_base
    from graftlm.models.load import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    quantize_base(model)
    linears = [m for m in model.modules() if getattr(m, "is_quantized_linear", False)]
    assert len(linears) == 30 * 7 and all(type(m) is Q4GridLinear for m in linears)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    # quantized as it is read (QLoRA's training load): the same layers, the same logits
    read, _ = load_model("smollm2-135m-instruct", dtype=torch.bfloat16, quantize="nf4")
    assert [type(m) for m in read.modules() if getattr(m, "is_quantized_linear", False)] == [
        type(m) for m in linears
    ]
    with torch.no_grad():
        assert torch.equal(read(ids).logits, expected)
