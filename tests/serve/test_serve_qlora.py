"""`graftlm serve` with a QLoRA adapter: the server loads its base 4-bit as it is read
(`load_for_inference(..., nf4=True)`), and a greedy answer equals `graftlm generate`'s with that
adapter alone, on the base `generate` quantizes for it."""

from __future__ import annotations

import helpers
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from serving import Server, make_adapter, solo  # noqa: E402

from graftlm.infer.generate import load_for_inference  # noqa: E402
from graftlm.methods.lora.config import LoraConfig  # noqa: E402


def test_a_qlora_adapter_is_served_on_a_base_loaded_4_bit(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = helpers.save_tiny_model_dir(tmp_path / "tiny", "llama")
    config = LoraConfig(rank=4, alpha=8, targets="all-linear", quantize="nf4")
    folder = str(make_adapter(tmp_path / "q", config, seed=3))

    import graftlm.infer.generate as generate_module

    loads = []
    load_model = generate_module.load_model

    def spy(*args, **kwargs):
        loads.append(kwargs.get("quantize"))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(generate_module, "load_model", spy)
    server = Server(model_dir, {"q": folder}, max_prompt_tokens=64, max_tokens_limit=24)
    try:
        assert loads == ["nf4"]  # the server's base: quantized as it was read
        reference, tokenizer = load_for_inference(str(model_dir), {"q": folder})
        assert loads == ["nf4", "nf4"]
        quantized = [m for m in reference.modules() if getattr(m, "is_quantized_linear", False)]
        assert len(quantized) == 2 * 7  # every linear layer of the two decoder layers
        reply = server.client().chat.completions.create(
            model="q", messages=[{"role": "user", "content": "hello there"}], max_tokens=12
        )
        expected = solo(reference, tokenizer, "hello there", "q", 12, chat=True)
        assert reply.choices[0].message.content == expected
    finally:
        server.stop()
        torch.set_num_threads(threads)
