"""DoRA adapters in mixed batches: base, LoRA and DoRA rows together, each row as if alone.

Through `generate` (the per-row path of `graftlm generate --input`) and through the real server
(one batch of three concurrent requests, and a DoRA folder loaded at runtime).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving import Server, make_adapter, solo  # noqa: E402

import graftlm  # noqa: E402
from graftlm.adapters.switch import row_adapters  # noqa: E402
from graftlm.infer.generate import SamplingConfig, generate, load_for_inference  # noqa: E402
from graftlm.methods.lora.config import LoraConfig  # noqa: E402

PROMPTS = ["hello there", "the quick brown fox", "xyz 123"]


def make_dora_adapter(folder: Path, config: LoraConfig, seed: int) -> Path:
    """A DoRA adapter with random B and a magnitude away from ‖W‖, on the tiny Llama."""
    model = helpers.tiny_llama()
    graftlm.inject(model, config.replace(use_dora=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=generator))
    return graftlm.save_adapter(model, folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_dora")
    model_dir = helpers.save_tiny_model_dir(root / "tiny", "llama")
    folders = {
        "lora": str(make_adapter(root / "lora", LoraConfig(rank=4, alpha=8), 0)),
        "dora": str(make_dora_adapter(root / "dora", LoraConfig(rank=4, alpha=8), 1)),
        "dora_qv": str(
            make_dora_adapter(root / "dora_qv", LoraConfig(rank=2, targets=("q_proj", "v_proj")), 2)
        ),
    }
    reference, tokenizer = load_for_inference(str(model_dir), folders)
    yield root, model_dir, folders, reference, tokenizer
    torch.set_num_threads(threads)


def test_generate_mixed_batch_equals_each_row_alone(setup):
    *_, reference, tokenizer = setup
    adapters = [None, "lora", "dora", "dora_qv"]
    prompts = PROMPTS + ["ok ok"]
    sampling = SamplingConfig(max_new_tokens=12)
    together = generate(reference, tokenizer, prompts, adapters=adapters, sampling=sampling)
    alone = [solo(reference, tokenizer, p, a, 12, chat=False) for p, a in zip(prompts, adapters)]
    assert together == alone
    # The adapters do change the model: compared on logits, since the tiny random model's answers
    # are often byte tokens that all decode to the same replacement character.
    for prompt, adapter in zip(prompts[1:], adapters[1:]):
        with_adapter = next_token_logits(reference, tokenizer, prompt, adapter)
        base = next_token_logits(reference, tokenizer, prompt, None)
        assert (with_adapter - base).abs().max() > 1e-3, adapter


def next_token_logits(model, tokenizer, prompt: str, adapter: str | None) -> torch.Tensor:
    """The model's logits for the token after `prompt`, with one adapter (or none) on its row."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), row_adapters(model, [adapter]):
        return model(input_ids=ids).logits[0, -1].float()


def test_server_answers_base_lora_and_dora_in_one_batch(setup):
    root, model_dir, folders, reference, tokenizer = setup
    served = {"lora": folders["lora"], "dora": folders["dora"]}
    server = Server(
        model_dir,
        served,
        max_prompt_tokens=64,
        max_tokens_limit=32,
        max_batch=4,
        allow_runtime_adapters=True,
        adapter_root=str(root),
    )
    try:
        names = [None, "lora", "dora"]
        expected = [
            solo(reference, tokenizer, p, a, 12, chat=False) for p, a in zip(PROMPTS, names)
        ]
        client = server.client()
        start = threading.Barrier(len(names))

        def ask(i: int) -> str:
            start.wait()
            model = names[i] or str(model_dir)
            return client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=12)

        with ThreadPoolExecutor(len(names)) as pool:
            answers = [r.choices[0].text for r in pool.map(ask, range(len(names)))]
        assert answers == expected

        load = server.url + "/v1/load_lora_adapter"
        response = httpx.post(load, json={"lora_name": "dora_qv", "lora_path": "dora_qv"})
        assert response.status_code == 200, response.text
        reply = client.completions.create(model="dora_qv", prompt="ok ok", max_tokens=10)
        assert reply.choices[0].text == solo(reference, tokenizer, "ok ok", "dora_qv", 10, False)
    finally:
        server.stop()
