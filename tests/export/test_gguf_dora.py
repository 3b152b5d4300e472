"""DoRA adapters and GGUF: `--format gguf` refuses them (llama.cpp has no DoRA adapter type);
`--format gguf-merged` writes g ⊙ (W + s·B·A) on a GGUF base and on a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import graftlm
from graftlm.errors import GraftError
from graftlm.export.gguf import export_adapter_gguf, export_merged_gguf
from graftlm.export.llama_layout import gguf_name, qk_heads, unpermute_qk

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def _adapter(folder: Path, base_dir: Path, use_dora: bool, std: float = 0.05) -> Path:
    model, _ = graftlm.load_model(str(base_dir))
    graftlm.inject(model, graftlm.LoraConfig(rank=4, targets=TARGETS, use_dora=use_dora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))
    return graftlm.save_adapter(model, folder)


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }


def test_dora_gguf_adapter_is_refused_and_merged_gguf_holds_the_dora_weights(
    tmp_path, tiny_model_dir, monkeypatch
):
    import graftlm.export.llama_layout as layout

    monkeypatch.setattr(layout, "add_tokenizer", lambda writer, folder, vocab_size: None)
    dora = _adapter(tmp_path / "dora", tiny_model_dir, use_dora=True)
    with pytest.raises(GraftError, match="llama.cpp has no DoRA adapter type"):
        export_adapter_gguf(dora, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

    model, _ = graftlm.load_model(str(tiny_model_dir))
    graftlm.load_adapter(model, dora)
    merged = {k: v.numpy() for k, v in graftlm.merge_and_unload(model).state_dict().items()}

    def check(path: Path) -> None:
        for name, weights in _gguf_tensors(path).items():
            module = next(
                k.rsplit(".", 1)[0]
                for k in merged
                if gguf_name(k.rsplit(".", 1)[0]) == name.removesuffix(".weight")
            )
            heads = qk_heads(name, 4, 2)
            if heads is not None:
                weights = unpermute_qk(torch.from_numpy(weights), heads).numpy()
            want = merged[module + ".weight"]
            np.testing.assert_allclose(weights, want, atol=2e-3 * np.abs(want).max(), err_msg=name)

    # base as a Hugging Face folder: merged by graftlm's own merge
    check(export_merged_gguf(dora, tmp_path / "hf.gguf", model=str(tiny_model_dir), quant="f16"))
    # base as a GGUF file (here: the tiny model written as f16 GGUF with a zero update, so only
    # its f16 rounding differs): merged tensor by tensor, magnitudes permuted with q/k's rows
    zero = _adapter(tmp_path / "zero", tiny_model_dir, use_dora=False, std=0.0)
    base = export_merged_gguf(zero, tmp_path / "base.gguf", model=str(tiny_model_dir), quant="f16")
    check(export_merged_gguf(dora, tmp_path / "on-gguf.gguf", model=str(base), force=True))


def test_graftlm_merge_writes_a_plain_model_with_the_dora_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from graftlm.cli.parser import main as cli_main

    dora = _adapter(tmp_path / "dora", tiny_model_dir, use_dora=True)
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(dora), "--model", str(tiny_model_dir), "--out", str(out)]
    assert cli_main([*args, "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, _ = graftlm.load_model(str(tiny_model_dir))
    graftlm.load_adapter(model, dora)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        graftlm.set_adapter(model, [])
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3  # DoRA did change it
