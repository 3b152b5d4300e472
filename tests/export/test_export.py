"""Merged model folders: plain transformers loads them and computes what base + adapter did."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from graftlm.errors import GraftError
from graftlm.export.merged_folder import merge_to_folder
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.files import save_adapter
from graftlm.methods.lora.inject import inject
from graftlm.models.load import load_model


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_folder_matches_the_adapter_model(tmp_path, tiny_model_dir, quantize):
    model, _ = load_model(str(tiny_model_dir))
    inject(
        model,
        LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], quantize=quantize),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.eval()
    adapter = save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(4, 200, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits.float()

    out = merge_to_folder(adapter, tmp_path / "merged", model=str(tiny_model_dir))
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any(
        "NF4" in type(m).__name__ or "Lora" in type(m).__name__ for m in merged.modules()
    )
    with torch.no_grad():
        got = merged(ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_merge_refuses_a_non_empty_out(tmp_path, tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    inject(model, LoraConfig(rank=2, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "adapter")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(GraftError, match="not empty"):
        merge_to_folder(adapter, tmp_path / "busy", model=str(tiny_model_dir))
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
