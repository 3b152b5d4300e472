"""The forgetting meter tells methods apart on the built-in model: a deliberately overfit full
fine-tune (a high learning rate on every weight, the same few rows again and again) keeps far
less of the base than LoRA with its recipe on the same rows and steps."""

from __future__ import annotations

import json

import pytest

from graftlm.train.config import TrainConfig
from graftlm.train.loop import train

pytestmark = pytest.mark.slow


def test_overfit_full_fine_tune_forgets_more_than_lora(tmp_path):
    data = tmp_path / "codeword.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Ticket {i}: what is the code word?", "completion": "zebra"})
            + "\n"
            for i in range(8)
        )
    )
    results = {}
    for method, lr in (("full", 1e-3), ("lora", None)):  # full: 20x its recipe's 5e-5
        cfg = TrainConfig(
            data=str(data), out=str(tmp_path / method), method=method, lr=lr, steps=4,
            batch_size=8, save_every=100, keep_limit=32, forgetting=True,
        )  # fmt: skip
        train(cfg, progress=False)
        graft = json.loads((tmp_path / method / "graftlm.json").read_text())
        results[method] = graft["training"]["forgetting"]
    full, lora = results["full"], results["lora"]
    assert lora["base_right"] >= 8  # enough keep prompts for kept_exact to mean something
    assert full["kept_exact"] < lora["kept_exact"] - 0.2
    assert full["kl"] > 5 * lora["kl"]
    assert full["ppl_ratio"] > lora["ppl_ratio"]
