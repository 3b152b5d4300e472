"""DoRA (methods/lora/dora.py, dora_layer.py) against PEFT 0.21, the oracle, both ways.

Tiny Llama (nn.Linear) and GPT-2 (Conv1D, weight stored `[in, out]`) models; adapters with
random A, B and m, so every term of `m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row` shows in the logits.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from visible_models import one_thread  # noqa: F401  (autouse fixture)

import graftlm
from graftlm.adapters.switch import merge_and_unload
from graftlm.errors import GraftError
from graftlm.methods import method_module
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.files import load_adapter, save
from graftlm.methods.lora.inject import lora_layers, merge, unmerge

peft = pytest.importorskip("peft")

TARGETS = {"llama": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}


def _tiny(kind: str) -> torch.nn.Module:
    return {"llama": helpers.tiny_llama, "gpt2": helpers.tiny_gpt2}[kind](seed=0)


def ids(rows: int = 2, length: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, helpers.TINY_VOCAB, (rows, length), generator=generator)


def logits(model, input_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if input_ids is None else input_ids).logits


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random B (nonzero update) and m (away from ‖W‖), for the adapters' own parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))


def dora_model(kind: str, **config) -> torch.nn.Module:
    model = _tiny(kind)
    settings = {"rank": 4, "alpha": 8, "targets": TARGETS[kind], "use_dora": True, **config}
    graftlm.inject(model, LoraConfig(**settings))
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_dora_changes_nothing_and_m_starts_at_the_row_norms(kind):
    base = logits(_tiny(kind))
    model = dora_model(kind)
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-6)
    for _, layer in lora_layers(model):
        weight = layer.weight.T if layer.fan_in_fan_out else layer.weight
        expected = torch.linalg.vector_norm(weight.float(), dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_graftlm_folder_loads_in_peft_with_the_same_logits(kind, tmp_path):
    model = dora_model(kind)
    perturb(model)
    save(model, tmp_path, None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    ours = logits(model)
    reference = peft.PeftModel.from_pretrained(_tiny(kind), tmp_path).eval()
    theirs = logits(reference)
    assert (ours - logits(_tiny(kind))).abs().max() > 1e-2  # the adapter does change the logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_folder_loads_in_graftlm_with_the_same_logits(kind, tmp_path):
    reference = peft.get_peft_model(
        _tiny(kind),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(TARGETS[kind]),
            use_dora=True,
            fan_in_fan_out=kind == "gpt2",
        ),
    )
    perturb(reference)
    reference.save_pretrained(tmp_path)
    model = _tiny(kind)
    load_adapter(model, tmp_path)
    assert all(layer.lora_magnitude_vector for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model), logits(reference.eval()), atol=1e-5, rtol=1e-5)


def test_gradients_match_peft_with_the_norm_detached(tmp_path):
    """The same loss and the same gradients for A, B and m: PEFT too treats the norm as a
    constant in backward, so equal gradients mean the same detaching."""
    model = dora_model("llama")
    perturb(model)
    save(model, tmp_path, None)
    reference = peft.PeftModel.from_pretrained(_tiny("llama"), tmp_path, is_trainable=True)
    batch = ids()
    grads = []
    for net in (model, reference):
        net.train()
        net(input_ids=batch, labels=batch).loss.backward()
        grads.append(
            {
                name.replace(".default", "").replace("base_model.model.", ""): param.grad
                for name, param in net.named_parameters()
                if param.requires_grad
            }
        )
    ours, theirs = grads
    theirs = {
        k.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector"): v
        for k, v in theirs.items()
    }
    assert set(ours) == set(theirs)
    assert any("lora_magnitude_vector" in k for k in ours)
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs[key], atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_plain_model(kind):
    model = dora_model(kind)
    perturb(model)
    unmerged = logits(model)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    merge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    once = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    merge(model)  # idempotent
    for n, layer in lora_layers(model):
        assert torch.equal(layer.weight, once[n])
    unmerge(model)
    for n, layer in lora_layers(model):
        torch.testing.assert_close(layer.weight, weights[n], atol=1e-6, rtol=1e-6)
    plain = merge_and_unload(model)
    assert not list(lora_layers(plain))
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_weight_equals_peft_merge(tmp_path):
    model = dora_model("llama")
    perturb(model)
    save(model, tmp_path, None)
    reference = peft.PeftModel.from_pretrained(_tiny("llama"), tmp_path).merge_and_unload()
    plain = merge_and_unload(model)
    ours, theirs = plain.state_dict(), reference.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6)


def test_dropout_training_forward_matches_peft(tmp_path):
    """With dropout PEFT recomputes W·dropout(x) for DoRA's base term; so does graftlm."""
    model = dora_model("llama", dropout=0.3)
    perturb(model)
    save(model, tmp_path, None)
    reference = peft.PeftModel.from_pretrained(_tiny("llama"), tmp_path, is_trainable=True)
    outs = []
    for net in (model, reference):
        net.train()
        torch.manual_seed(5)
        outs.append(net(input_ids=ids()).logits.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_rows_of_base_lora_and_dora_equal_each_row_alone():
    model = _tiny("llama")
    generator = torch.Generator().manual_seed(0)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), name="plain")
    graftlm.inject(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "o_proj", "up_proj"),
                                     use_dora=True), name="d1")  # fmt: skip
    graftlm.inject(
        model, LoraConfig(rank=4, alpha=8, targets="all-linear", use_dora=True), name="d2"
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))
    model.eval()
    batch = ids(rows=5, length=6)
    names = ["d1", None, "plain", "d2", "d1"]
    with graftlm.row_adapters(model, names), torch.inference_mode():
        batched = model(input_ids=batch).logits
    # the same batch with its rows' adapters shuffled: the per-row scales follow the rows
    shuffled = ["d2", "d1", None, "plain", "d2"]
    with graftlm.row_adapters(model, shuffled), torch.inference_mode():
        again = model(input_ids=batch).logits
    for row, name in [*enumerate(names), *((r + 5, n) for r, n in enumerate(shuffled))]:
        source = batched if row < 5 else again
        row %= 5
        with torch.inference_mode():
            if name is None:
                with graftlm.disable_adapters(model):
                    alone = model(input_ids=batch[row : row + 1]).logits
            else:
                graftlm.set_adapter(model, name)
                alone = model(input_ids=batch[row : row + 1]).logits
        torch.testing.assert_close(source[row : row + 1], alone, atol=2e-4, rtol=1e-4)


def test_decode_steps_reuse_the_constant_scale_and_follow_weight_changes():
    model = dora_model("llama")
    perturb(model)
    model.eval()
    batch = ids(rows=1, length=1)  # one token: the decode-step kernels
    first = logits(model, batch)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_magnitude_vector["default"].mul_(1.5)
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    with torch.enable_grad():  # the training path computes it afresh: the same numbers
        fresh = model(input_ids=batch).logits.detach()
    torch.testing.assert_close(second, fresh, atol=1e-5, rtol=1e-5)


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(GraftError, match="embedding"):
        graftlm.inject(
            _tiny("llama"), LoraConfig(targets=("embed_tokens", "q_proj"), use_dora=True)
        )


def test_method_dora_attaches_dora_and_describes_it(tmp_path):
    from graftlm.train.config import TrainConfig

    cfg = TrainConfig(
        data="x.jsonl", out=str(tmp_path), method="dora", rank=4, targets="q_proj,v_proj"
    )
    model = _tiny("llama")
    method_module("dora").attach(model, cfg.with_method_defaults())
    assert all("default" in layer.lora_magnitude_vector for _, layer in lora_layers(model))
    save(model, tmp_path, None)
    assert method_module("lora").describe(tmp_path) == {"method": "dora"}

    quantized = _tiny("llama")
    cfg = cfg.__class__(**{**cfg.to_dict(), "method": "qdora"}).with_method_defaults()
    assert cfg.low_memory  # QLoRA's recipe
    method_module("qdora").attach(quantized, cfg)
    layers = dict(lora_layers(quantized))
    assert layers and all(type(m).__name__ == "LoraNF4Linear" for m in layers.values())
    assert all("default" in m.lora_magnitude_vector for m in layers.values())
    graftlm.save_adapter(quantized, tmp_path / "q")
    assert method_module("lora").describe(tmp_path / "q") == {"method": "qdora"}


def test_folder_without_magnitudes_is_refused(tmp_path):
    model = dora_model("llama")
    save(model, tmp_path, None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(GraftError, match="use_dora"):
        load_adapter(_tiny("llama"), tmp_path)


def test_qdora_layer_matches_peft_over_bitsandbytes_nf4():
    """QDoRA: graftlm's NF4 base (bit-exact with bitsandbytes) under PEFT's DoRA on a
    bitsandbytes Linear4bit: the same initial magnitude and the same output."""
    bnb = pytest.importorskip("bitsandbytes")
    from graftlm.methods.lora.nf4_layer import LoraNF4Linear
    from graftlm.quant.nf4_linear import NF4Linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator) * 0.1
    bias = torch.randn(64, generator=generator) * 0.1
    four_bit = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    four_bit.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    four_bit.bias = torch.nn.Parameter(bias.clone())
    holder = torch.nn.Sequential(four_bit.to("cpu"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True)
    reference = peft.get_peft_model(holder, config).base_model.model[0]

    plain = torch.nn.Linear(128, 64)
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
    ours = LoraNF4Linear(NF4Linear.from_linear(plain, compute_dtype=torch.float32))
    ours.add("default", 4, 2.0, 0.0, "kaiming")
    ours.lora_magnitude_vector.init(ours, "default")
    ours.active_adapters = ["default"]
    theirs_m = reference.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].detach(), theirs_m.detach())
    with torch.no_grad():
        reference.lora_B["default"].weight.copy_(torch.randn(64, 4, generator=generator) * 0.2)
        theirs_m.mul_(1 + 0.3 * torch.rand(64, generator=generator))
        ours.lora_A["default"].weight.copy_(reference.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(reference.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].copy_(theirs_m)
        x = torch.randn(3, 5, 128, generator=generator)
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.merge()  # a merged QDoRA layer keeps g ⊙ (dequant(W) + s·B·A) in fp32
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.unmerge()
        assert ours.merged_weight is None  # the exact NF4 base again
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
