"""LoRA on Conv1d / Conv2d / Conv3d against PEFT 0.21 (the oracle), and its invariants."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from torch.testing import assert_close

import graftlm
from graftlm.errors import GraftError
from graftlm.methods.lora.conv_layer import LoraConv
from graftlm.methods.lora.inject import lora_layers


class TinyConvNet(nn.Module):
    """Convs of several kernel / stride / padding shapes, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, (3, 2), stride=2, padding=(1, 0))
        self.pointwise = nn.Conv2d(8, 6, 1, bias=False)
        self.wide = nn.Conv2d(6, 6, 5, stride=(1, 2), padding=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.conv_in(x))
        x = torch.relu(self.down(x))
        x = self.wide(self.pointwise(x))
        return self.head(x.mean(dim=(2, 3)))


TARGETS = ["conv_in", "down", "pointwise", "wide", "head"]


def _model(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def _perturb(model: nn.Module, seed: int) -> None:
    """Give every adapter weight random values (B starts at zero, which tests nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _x(seed: int = 1, shape=(2, 3, 12, 10)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rslora", [False, True])
def test_conv_lora_equals_peft_output_and_merge(rslora):
    """Same A/B weights -> same outputs as PEFT's Conv2d LoRA, and the same merged weights."""
    ours = _model()
    graftlm.inject(ours, graftlm.LoraConfig(rank=4, alpha=6, targets=TARGETS, use_rslora=rslora))
    _perturb(ours, seed=3)
    peft = get_peft_model(
        _model(),
        PeftLoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=rslora),
    )
    sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    peft_sd = peft.state_dict()
    for key, value in sd.items():
        peft_key = "base_model.model." + key
        assert peft_sd[peft_key].shape == value.shape, key
    peft.load_state_dict({"base_model.model." + k: v for k, v in sd.items()}, strict=False)
    peft.eval()
    x = _x()
    with torch.no_grad():
        assert_close(ours(x), peft(x), rtol=1e-5, atol=1e-5)
        for name, layer in lora_layers(ours):
            peft_layer = peft.base_model.model.get_submodule(name)
            assert_close(layer.delta_weight("default"), peft_layer.get_delta_weight("default"))
        unmerged = ours(x)
        graftlm.merge(ours)
        assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)
        graftlm.merge(ours)  # idempotent
        assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)
        graftlm.unmerge(ours)
        assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)
        with graftlm.disable_adapters(ours):
            assert_close(ours(x), _model()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
        lambda: nn.Conv3d(4, 6, (1, 3, 2), padding=(0, 1, 1)),
        lambda: nn.Conv3d(4, 6, 1),
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
        lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_shapes_merge_equals_unmerged(conv):
    torch.manual_seed(0)
    base = conv()
    model = nn.Sequential(base)
    reference = base.weight.detach().clone()
    graftlm.inject(model, graftlm.LoraConfig(rank=3, alpha=5, targets=["0"]))
    _perturb(model, seed=4)
    x = _x(shape=(2, 4) + (7,) * (base.weight.dim() - 2))
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, base(x))  # the adapter does something
        graftlm.merge(model)
        assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        graftlm.unmerge(model)
        assert_close(model[0].weight, reference, rtol=0, atol=1e-6)
        plain = graftlm.merge_and_unload(model)
        assert type(plain[0]) is type(base)
        assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


def test_conv1d_and_conv3d_equal_peft():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 5, 3, stride=2, padding=1)
            self.c3 = nn.Conv3d(2, 4, (2, 3, 1), padding=(1, 1, 0))

        def forward(self, a, b):
            return self.c1(a).sum() + self.c3(b).sum(), self.c1(a), self.c3(b)

    def make():
        torch.manual_seed(0)
        return Net()

    ours = make()
    graftlm.inject(ours, graftlm.LoraConfig(rank=2, alpha=3, targets=["c1", "c3"]))
    _perturb(ours, seed=5)
    peft = get_peft_model(make(), PeftLoraConfig(r=2, lora_alpha=3, target_modules=["c1", "c3"]))
    sd = {"base_model.model." + k: v for k, v in ours.state_dict().items() if "lora_" in k}
    peft.load_state_dict(sd, strict=False)
    a, b = _x(shape=(2, 3, 9)), _x(shape=(1, 2, 3, 4, 5))
    with torch.no_grad():
        for mine, theirs in zip(ours(a, b), peft(a, b)):
            assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_folders_load_both_ways(tmp_path):
    ours = _model()
    graftlm.inject(ours, graftlm.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    _perturb(ours, seed=6)
    graftlm.save_adapter(ours, tmp_path / "ours")
    x = _x()
    with torch.no_grad():
        expected = ours(x)
        peft = PeftModel.from_pretrained(_model(), tmp_path / "ours").eval()
        assert_close(peft(x), expected, rtol=1e-5, atol=1e-5)
        _perturb(peft, seed=7)
        peft.save_pretrained(tmp_path / "theirs")
        from_peft = peft(x)
    mine = _model()
    graftlm.load_adapter(mine, tmp_path / "theirs")
    with torch.no_grad():
        assert_close(mine(x), from_peft, rtol=1e-5, atol=1e-5)


def test_several_adapters_and_rows():
    model = _model()
    graftlm.inject(model, graftlm.LoraConfig(rank=2, alpha=2, targets=TARGETS), name="a")
    graftlm.inject(model, graftlm.LoraConfig(rank=3, alpha=6, targets=["wide"]), name="b")
    _perturb(model, seed=8)
    x = _x(shape=(3, 3, 12, 10))
    with torch.no_grad():
        graftlm.set_adapter(model, "a")
        out_a = model(x)
        graftlm.set_adapter(model, "b")
        out_b = model(x)
        graftlm.set_adapter(model, ["a", "b"])
        out_ab = model(x)
        with graftlm.disable_adapters(model):
            out_base = model(x)
        assert not torch.allclose(out_a, out_b)
        graftlm.merge(model)
        assert_close(model(x), out_ab, rtol=1e-5, atol=1e-5)
        graftlm.unmerge(model)
        with graftlm.row_adapters(model, ["a", None, "b"]):
            rows = model(x)
    assert_close(rows[0], out_a[0], rtol=1e-5, atol=1e-5)
    assert_close(rows[1], out_base[1], rtol=1e-5, atol=1e-5)
    assert_close(rows[2], out_b[2], rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_fresh_adapter_is_identity():
    model = _model()
    x = _x()
    with torch.no_grad():
        before = model(x)
    graftlm.inject(model, graftlm.LoraConfig(rank=4, alpha=8, targets=["conv_in", "wide"]))
    with torch.no_grad():
        assert_close(model(x), before)
    assert isinstance(model.conv_in, LoraConv)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(x).sum().backward()
    assert model.conv_in.lora_B["default"].weight.grad is not None


def test_all_linear_leaves_convs_out():
    model = _model()
    graftlm.inject(model, graftlm.LoraConfig(rank=2, targets="all-linear"))
    assert [n for n, _ in lora_layers(model)] == ["head"]


def test_refusals(tmp_path):
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(GraftError, match=r"grouped Conv2d \(groups=2\)"):
        graftlm.inject(grouped, graftlm.LoraConfig(rank=2, targets=["0"]))
    with pytest.raises(GraftError, match="init='pissa' is not defined for conv"):
        graftlm.inject(_model(), graftlm.LoraConfig(rank=2, targets=["down"], init="pissa"))
    with pytest.raises(GraftError, match="DoRA .* embedding/conv"):
        graftlm.inject(_model(), graftlm.LoraConfig(rank=2, targets=["down"], use_dora=True))
    # a folder whose conv A has another kernel
    model = _model()
    graftlm.inject(model, graftlm.LoraConfig(rank=2, targets=["down"]))
    graftlm.save_adapter(model, tmp_path / "a")
    other = _model()
    other.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    with pytest.raises(
        GraftError, match=r"down\.lora_A: expected shape \(2, 8, 3, 3\), found \(2, 8, 3, 2\)"
    ):
        graftlm.load_adapter(other, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down"]
