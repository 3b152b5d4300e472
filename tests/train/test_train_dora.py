"""`--method dora` through the normal training pipeline: PEFT loads the folder it writes, and a
crashed run resumes from its checkpoint to the adapter an unbroken run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_cfg
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from graftlm.infer.generate import load_for_inference
from graftlm.train.loop import train
from graftlm.train.step import OptimizerStep

peft = pytest.importorskip("peft")


def test_dora_run_writes_a_folder_peft_generates_the_same_text_from(tmp_path, tiny_model_dir):
    cfg = base_cfg(tmp_path, tiny_model_dir, method="dora", steps=4, lr=5e-2)
    train(cfg, progress=False)
    out = Path(cfg.out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert magnitudes and len(magnitudes) * 2 == sum(".lora_" in k for k in tensors) - len(
        magnitudes
    )
    ours, _ = load_for_inference(str(tiny_model_dir), {"d": str(out)})
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), out
    ).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        greedy = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 2}
        assert torch.equal(ours.generate(ids, **greedy), theirs.generate(input_ids=ids, **greedy))


def test_a_crashed_dora_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    whole = base_cfg(tmp_path / "a", tiny_model_dir, method="dora", steps=4, save_every=1)
    train(whole, progress=False)
    expected = load_file(Path(whole.out) / "adapter_model.safetensors")

    real = OptimizerStep.__call__

    def crash(self, step, indices, labelled):
        if step == 2:
            raise RuntimeError("crash")
        return real(self, step, indices, labelled)

    cfg = base_cfg(tmp_path / "b", tiny_model_dir, method="dora", steps=4, save_every=1)
    monkeypatch.setattr(OptimizerStep, "__call__", crash)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, progress=False)
    monkeypatch.setattr(OptimizerStep, "__call__", real)
    train(cfg.__class__(**{**cfg.to_dict(), "resume": True}), progress=False)
    resumed = load_file(Path(cfg.out) / "adapter_model.safetensors")
    assert set(resumed) == set(expected)
    assert any(k.endswith("lora_magnitude_vector") for k in resumed)
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
