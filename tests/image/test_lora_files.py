"""diffusers and kohya LoRA files on a tiny UNet2DConditionModel + CLIPTextModel, with diffusers
0.36 (and PEFT underneath it) as the oracle."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_diffusers import pipeline as _pipeline
from tiny_diffusers import text_encoder as _text_encoder
from tiny_diffusers import unet as _unet
from torch.testing import assert_close

import graftlm
from graftlm.cli import main as cli_main
from graftlm.errors import GraftError
from graftlm.image.lora_files import (
    WEIGHTS_NAME,
    load_lora_weights,
    read_lora_file,
    save_lora_weights,
)
from graftlm.image.presets import TEXT_ENCODER_ATTENTION, UNET_ATTENTION, UNET_CONVS
from graftlm.methods.lora.conv_layer import LoraConv
from graftlm.methods.lora.inject import lora_layers


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    hidden = torch.randn(2, 5, 32, generator=gen)
    ids = torch.randint(3, 1000, (2, 7), generator=gen)
    return sample, torch.tensor([10, 500]), hidden, ids


def _unet_out(unet, sample, t, hidden):
    with torch.no_grad():
        return unet(sample, t, hidden).sample


def _te_out(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def test_graftlm_file_loads_in_diffusers_pipeline(tmp_path):
    """graftlm -> pytorch_lora_weights.safetensors -> pipe.load_lora_weights: same outputs."""
    unet, text_encoder = _unet(), _text_encoder()
    graftlm.inject(unet, graftlm.LoraConfig(rank=4, alpha=6, targets=UNET_ATTENTION + UNET_CONVS))
    graftlm.inject(
        text_encoder, graftlm.LoraConfig(rank=2, alpha=8, targets=TEXT_ENCODER_ATTENTION)
    )
    _perturb(unet, seed=2)
    _perturb(text_encoder, seed=3)
    path = save_lora_weights(tmp_path, {"unet": unet, "text_encoder": text_encoder})
    assert path.name == WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys

    sample, t, hidden, ids = _inputs()
    pipe = _pipeline(_unet(), _text_encoder())
    base_unet = _unet_out(pipe.unet, sample, t, hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(tmp_path), weight_name=WEIGHTS_NAME)
    theirs_unet = _unet_out(pipe.unet, sample, t, hidden)
    assert not torch.allclose(theirs_unet, base_unet, atol=1e-3)  # the LoRA is applied
    assert_close(_unet_out(unet, sample, t, hidden), theirs_unet, rtol=1e-5, atol=1e-5)
    assert_close(_te_out(text_encoder, ids), _te_out(pipe.text_encoder, ids), rtol=1e-5, atol=1e-5)

    # ... and back into fresh graftlm models, as the same numbers
    unet2, te2 = _unet(), _text_encoder()
    configs = load_lora_weights(tmp_path, {"unet": unet2, "text_encoder": te2})
    assert configs["unet"].rank == 4 and configs["unet"].alpha == 6
    assert configs["text_encoder"].alpha == 8
    assert_close(_unet_out(unet2, sample, t, hidden), theirs_unet, rtol=1e-5, atol=1e-5)
    # merge equals unmerged on the UNet (convs and linears)
    graftlm.merge(unet2)
    assert_close(_unet_out(unet2, sample, t, hidden), theirs_unet, rtol=1e-4, atol=1e-5)


def _kohya_file(path, unet, seed: int, alphas=None):
    """A kohya file written by hand: random down/up per module (rank 2 or 4), alpha 3 on every
    module or `alphas(i)` on the i-th; returns the modules it adapts and their tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = [
        n
        for n, m in unet.named_modules()
        if n.endswith(("attn1.to_q", "attn2.to_k", "to_out.0", "resnets.0.conv1", "proj_in"))
    ]
    for i, name in enumerate(modules):
        module = unet.get_submodule(name)
        rank = 4 if i % 3 else 2
        weight = module.weight  # [out, in] or [out, in, k, k]
        down = torch.randn((rank, weight.shape[1], *weight.shape[2:]), generator=gen) * 0.2
        up = torch.randn((weight.shape[0], rank, *(1,) * (weight.dim() - 2)), generator=gen) * 0.2
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(3.0 if alphas is None else alphas(i)).half()
    save_file(tensors, str(path))
    return modules, tensors


def test_kohya_file_matches_diffusers(tmp_path):
    """A hand-written kohya file: graftlm's UNet output equals diffusers' (its own converter).

    One alpha for every module, as kohya's trainer writes: diffusers 0.36 drops the alphas of
    attention layers that differ from the most common one (its converter files them under
    "...processor.to_q_lora.down.weight.alpha", which matches no module), so per-module alphas
    are checked against kohya's rule directly below."""
    path = tmp_path / "style.safetensors"
    modules, _ = _kohya_file(path, _unet(), seed=4)
    lora = read_lora_file(path)
    assert lora.format == "kohya" and set(lora.parts) == {"unet"}

    sample, t, hidden, _ = _inputs()
    pipe = _pipeline(_unet(), _text_encoder())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    theirs = _unet_out(pipe.unet, sample, t, hidden)

    ours = _unet()
    configs = load_lora_weights(path, {"unet": ours})
    assert sorted(n for n, _ in lora_layers(ours)) == sorted(modules)
    assert configs["unet"].alpha == 3 and configs["unet"].rank_pattern  # ranks 2 and 4
    assert_close(_unet_out(ours, sample, t, hidden), theirs, rtol=1e-5, atol=1e-5)
    with graftlm.disable_adapters(ours):
        assert not torch.allclose(_unet_out(ours, sample, t, hidden), theirs, atol=1e-3)


def test_kohya_alpha_per_module(tmp_path):
    """kohya's rule, module by module: the update is alpha / r · up @ down (convs included)."""
    path = tmp_path / "alphas.safetensors"
    modules, tensors = _kohya_file(path, _unet(), seed=7, alphas=lambda i: float(1 + i % 4))
    ours = _unet()
    config = load_lora_weights(path, {"unet": ours})["unet"]
    assert config.alpha_pattern
    layers = dict(lora_layers(ours))
    for name in modules:
        key = "lora_unet_" + name.replace(".", "_")
        down = tensors[f"{key}.lora_down.weight"].float()
        up = tensors[f"{key}.lora_up.weight"].float()
        scale = tensors[f"{key}.alpha"].float() / down.shape[0]
        expected = (up.flatten(1) @ down.flatten(1)).view(layers[name].weight.shape) * scale
        assert_close(layers[name].delta_weight("default"), expected, rtol=1e-5, atol=1e-6)


def test_kohya_text_encoder_and_scale(tmp_path):
    """lora_te_ keys (with CLIP's "text_model_" that transformers 5 dropped) land on the text
    encoder with scale alpha / r: the merged weight is W + alpha/r · up @ down."""
    te = _text_encoder()
    weight = te.get_submodule("encoder.layers.1.self_attn.v_proj").weight.detach().clone()
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(3, 32, generator=gen), torch.randn(32, 3, generator=gen)
    key = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    path = tmp_path / "te.safetensors"
    save_file(
        {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(6.0),
        },
        str(path),
    )
    load_lora_weights(path, {"text_encoder": te})
    graftlm.merge(te)
    merged = te.get_submodule("encoder.layers.1.self_attn.v_proj").weight
    assert_close(merged, weight + 2.0 * up @ down, rtol=1e-5, atol=1e-5)


def test_bad_files(tmp_path):
    unet = _unet()
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nope_to_q.lora_down.weight": torch.zeros(2, 3),
               "lora_unet_nope_to_q.lora_up.weight": torch.zeros(3, 2)}, str(bad))  # fmt: skip
    with pytest.raises(
        GraftError, match=r"bad\.safetensors: unet has no module\(s\) \['nope_to_q'\]"
    ):
        load_lora_weights(bad, {"unet": unet})
    half = tmp_path / "half.safetensors"
    save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 64)}, str(half))
    with pytest.raises(GraftError, match="module 'mid_block.attentions.0.proj_in' has no lora_B"):
        read_lora_file(half)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(GraftError, match="kohya keys graftlm cannot read"):
        read_lora_file(loha)
    good = tmp_path / "good.safetensors"
    _kohya_file(good, unet, seed=6)
    with pytest.raises(
        GraftError, match=r"holds LoRA weights for \['unet'\], which were not given"
    ):
        load_lora_weights(good, {"text_encoder": _text_encoder()})
    not_st = tmp_path / "x.safetensors"
    not_st.write_text("hello")
    with pytest.raises(GraftError, match="not a readable safetensors file"):
        read_lora_file(not_st)
    with pytest.raises(GraftError, match="diffusers' LoRA files hold only"):
        save_lora_weights(tmp_path / "o", {"vae": unet})


def test_header_holds_each_parts_config(tmp_path):
    unet = _unet()
    graftlm.inject(unet, graftlm.LoraConfig(rank=4, alpha=2, targets=UNET_ATTENTION))
    path = save_lora_weights(tmp_path, {"unet": unet})
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert header["unet.r"] == 4 and header["unet.lora_alpha"] == 2
    assert sorted(header["unet.target_modules"]) == sorted(UNET_ATTENTION)


def test_inspect_cli(tmp_path, capsys):
    unet, text_encoder = _unet(), _text_encoder()
    graftlm.inject(unet, graftlm.LoraConfig(rank=4, alpha=6, targets=UNET_ATTENTION + UNET_CONVS))
    graftlm.inject(
        text_encoder, graftlm.LoraConfig(rank=2, alpha=8, targets=TEXT_ENCODER_ATTENTION)
    )
    save_lora_weights(tmp_path / "sd", {"unet": unet, "text_encoder": text_encoder})
    assert cli_main(["inspect", str(tmp_path / "sd"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "diffusers" and facts["method"] == "lora"
    unet_facts, te_facts = facts["parts"]["unet"], facts["parts"]["text_encoder"]
    # one alpha in the file's header, for every module (counted per module, as kohya's are)
    assert unet_facts["ranks"] == {"4": unet_facts["modules"]}
    assert unet_facts["alphas"] == {"6.0": unet_facts["modules"]}
    assert unet_facts["conv_modules"] == sum(isinstance(m, LoraConv) for _, m in lora_layers(unet))
    assert {"to_q", "to_out.0", "conv1", "proj_in"} <= set(unet_facts["module_kinds"])
    assert te_facts["module_kinds"] == sorted(TEXT_ENCODER_ATTENTION)
    assert te_facts["parameters"] == sum(
        p.numel() for n, p in text_encoder.named_parameters() if ".lora_" in n
    )

    _kohya_file(tmp_path / "k.safetensors", _unet(), seed=8)
    assert cli_main(["inspect", str(tmp_path / "k.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "kohya format" in text and "r=2: 9, r=4: 16" in text and "3.0: 25" in text
    assert "targets      conv1, proj_in, to_k, to_out_0, to_q" in text
