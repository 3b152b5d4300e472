"""LoftQ initialisation of QLoRA adapters: NF4(W) + scale·B·A is closer to W than NF4(W) alone,
and the update is the one PEFT's LoftQ computes from bitsandbytes' NF4 of the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import graftlm
from graftlm.errors import GraftError
from graftlm.methods.lora.nf4_layer import LoraNF4Linear
from graftlm.models.load import load_model


def _qlora(model_dir, init: str):
    model, _ = load_model(model_dir)
    graftlm.inject(
        model, graftlm.LoraConfig(rank=4, alpha=8, targets="all-linear", quantize="nf4", init=init)
    )
    return model


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraNF4Linear)}


def test_loftq_lowers_the_quantization_error_and_matches_peft(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    model = _qlora(tiny_model_dir, "loftq")
    layers = _layers(model)
    assert len(layers) == 14  # 7 linears in each of 2 blocks
    for name, layer in layers.items():
        w = weights[f"{name}.weight"].float()
        q = layer.base_layer.dequantized_weight(torch.float32)
        update = layer.delta_weight("default")  # scale · B · A
        # the residual loses exactly its top-4 singular values' energy (Eckart-Young)
        top = torch.linalg.svdvals(w - q)[:4]
        before, after = torch.linalg.norm(w - q), torch.linalg.norm(w - (q + update))
        assert after < before, name
        torch.testing.assert_close(after**2, before**2 - (top**2).sum(), rtol=1e-3, atol=1e-7)
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        q_bnb = bnb.functional.dequantize_4bit(packed, state).float()
        torch.testing.assert_close(q, q_bnb, rtol=0, atol=0)  # the same 4-bit base
        peft = _low_rank_decomposition(w - q_bnb, reduced_rank=4)
        torch.testing.assert_close(update, peft["L"] @ peft["R"], rtol=1e-4, atol=1e-5)


def test_default_init_starts_at_zero_and_loftq_needs_a_4bit_base(tiny_model_dir):
    for layer in _layers(_qlora(tiny_model_dir, "kaiming")).values():
        assert not layer.delta_weight("default").any()
    with pytest.raises(GraftError, match="loftq.*nf4"):
        graftlm.LoraConfig(rank=4, init="loftq")


def test_loftq_adapter_saves_as_a_plain_peft_folder(tmp_path, tiny_model_dir):
    import json

    model = _qlora(tiny_model_dir, "loftq")
    graftlm.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT loads it without re-running LoftQ
    again, _ = load_model(tiny_model_dir)
    graftlm.load_adapter(again, tmp_path / "a")
    for (_, ours), (_, loaded) in zip(_layers(model).items(), _layers(again).items()):
        torch.testing.assert_close(ours.delta_weight("default"), loaded.delta_weight("default"))


def test_loftq_leaves_a_layer_already_on_a_4bit_grid_at_the_default_start(tiny_model_dir):
    """A base weight that is already 4-bit (GGUF Q4_1) is kept exactly: no rounding error for
    LoftQ to start from, so A keeps its kaiming start and B its zeros (A = B = 0 could not
    train); the other layers still get LoftQ's start."""
    from safetensors.torch import save_file

    from graftlm.quant.q4_grid import Q4GridLinear

    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    path = tiny_model_dir / "model.safetensors"
    weights = load_file(str(path))
    name = "model.layers.0.mlp.up_proj"
    packed = gguf_quants.quantize(weights[f"{name}.weight"].numpy(), GGMLQuantizationType.Q4_1)
    on_grid = gguf_quants.dequantize(packed, GGMLQuantizationType.Q4_1).copy()
    weights[f"{name}.weight"] = torch.from_numpy(on_grid)
    save_file(weights, str(path), metadata={"format": "pt"})
    layers = _layers(_qlora(tiny_model_dir, "loftq"))
    kept = layers[name]
    assert isinstance(kept.base_layer, Q4GridLinear)
    assert torch.equal(kept.base_layer.dequantized_weight(torch.float32), weights[f"{name}.weight"])
    assert kept.lora_A["default"].weight.abs().sum() > 0
    assert not kept.lora_B["default"].weight.any()
    others = [layer for n, layer in layers.items() if n != name]
    assert all(type(layer.base_layer) is not Q4GridLinear for layer in others)
    assert all(layer.delta_weight("default").any() for layer in others)
