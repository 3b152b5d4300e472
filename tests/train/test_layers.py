"""`--layers`: adapters on chosen decoder blocks only; the blocks below get no backward pass,
and the folder loads in PEFT (its `layers_to_transform`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_cfg
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from graftlm.adapters.blocks import block_count, block_indices, check_block_spec
from graftlm.errors import GraftError
from graftlm.infer.generate import load_for_inference
from graftlm.train import loop
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train

peft = pytest.importorskip("peft")


def test_block_selections_resolve_on_the_model_depth():
    assert block_indices(None, 30) is None
    assert block_indices("top-half", 30) == tuple(range(15, 30))
    assert block_indices("top-half", 5) == (2, 3, 4)
    assert block_indices("top-4", 30) == (26, 27, 28, 29)
    assert block_indices("0, 2,4-6", 30) == (0, 2, 4, 5, 6)


@pytest.mark.parametrize(
    "value, message",
    [
        ("top-50%", r"'top-50%' is not a block selection; use 'top-half'"),
        ("5-2", r"the range '5-2' in '5-2' runs backwards"),
        ("top-0", r"'top-0' selects no block"),
        ("last", r"'last' is not a block selection"),
    ],
)
def test_a_bad_selection_is_a_one_line_error(value, message):
    with pytest.raises(GraftError, match=message) as caught:
        check_block_spec(value)
    assert "\n" not in str(caught.value)


def test_a_selection_past_the_last_block_names_the_depth():
    with pytest.raises(GraftError, match=r"'15-30' names block 30; the model has 30 blocks"):
        block_indices("15-30", 30)
    with pytest.raises(GraftError, match=r"'top-40' asks for 40 blocks; the model has 30"):
        block_indices("top-40", 30)


def test_only_the_layered_methods_take_layers(tmp_path):
    with pytest.raises(GraftError, match=r"--method ia3 adapts no chosen blocks"):
        TrainConfig(data="d.jsonl", out=str(tmp_path), method="ia3", layers="top-half")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_top_half_trains_the_upper_block_only_and_peft_loads_it(
    tmp_path, tiny_model_dir, monkeypatch
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert block_count(model) == 2
    # the backward of the lower, frozen block never runs: no parameter below block 1 trains
    calls = {0: 0, 1: 0}
    real_prepare = loop.prepare

    def spying_prepare(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        blocks = prepared.model.base_model.layers
        for index in calls:
            blocks[index].register_full_backward_hook(
                lambda *_, i=index: calls.__setitem__(i, calls[i] + 1)
            )
        return prepared

    monkeypatch.setattr(loop, "prepare", spying_prepare)
    cfg = base_cfg(tmp_path, tiny_model_dir, steps=3, lr=5e-2, layers="top-half")
    train(cfg, progress=False)
    assert calls[0] == 0 and calls[1] > 0

    out = Path(cfg.out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(".layers.1." in key for key in tensors)
    ours, _ = load_for_inference(str(tiny_model_dir), {"d": str(out)})
    theirs = peft.PeftModel.from_pretrained(model, out).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
