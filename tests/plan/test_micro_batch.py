"""`graftlm train` picks its micro-batch from the plan: the throughput-optimal pass where it fits
the machine's memory (exactly today's `tokens_per_pass`), else the largest that fits. Memory is
injected, never allocated."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from graftlm.plan import preflight as preflight_module
from graftlm.plan.micro_batch import SAFETY_MARGIN, breakdown_at, choose_pass_size
from graftlm.plan.preflight import plan_for_run
from graftlm.train import step as step_module
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train
from graftlm.train.steps import tokens_per_pass

CPU = torch.device("cpu")
AMPLE = 10**13


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data="-", out="-", **kw).with_method_defaults()


def _memory_between(plan, cfg, checkpointing, fits: int) -> int:
    """Available memory under which a pass of `fits` sequences fits and one more does not."""
    low = breakdown_at(plan, fits, checkpointing).training
    high = breakdown_at(plan, fits + 1, checkpointing).training
    assert low < high
    return int((low + high) / 2 / (1 - SAFETY_MARGIN))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"low_memory": True, "dtype": "float32"},
        {"activation_checkpointing": True},
        {"method": "qlora"},
    ],
)
def test_ample_memory_keeps_the_throughput_optimal_pass(settings):
    cfg = _cfg(seq_len=256, batch_size=16, **settings)
    plan = plan_for_run(cfg, CPU)
    checkpointing = plan.chosen.run.checkpointing
    size = choose_pass_size(plan, cfg, checkpointing, AMPLE)
    assert size.tokens == tokens_per_pass(cfg, checkpointing)
    assert size.micro_batch == tokens_per_pass(cfg, checkpointing) // 256
    # unknown memory keeps it too
    assert choose_pass_size(plan, cfg, checkpointing, None).tokens == size.tokens


def test_tight_memory_picks_the_largest_micro_batch_that_fits():
    # the built-in model, 128-token sequences: the optimal pass is 1024 // 128 = 8 sequences
    cfg = _cfg(seq_len=128, batch_size=16)
    plan = plan_for_run(cfg, CPU)
    checkpointing = plan.chosen.run.checkpointing
    for fits in (1, 3, 7):
        available = _memory_between(plan, cfg, checkpointing, fits)
        size = choose_pass_size(plan, cfg, checkpointing, available)
        assert (size.micro_batch, size.tokens) == (fits, fits * 128)
        assert size.memory.training <= available * (1 - SAFETY_MARGIN)
        assert "the largest that fits" in size.reason
    # nothing fits: one sequence per pass, and it says so
    tiny = breakdown_at(plan, 1, checkpointing).training // 2
    size = choose_pass_size(plan, cfg, checkpointing, tiny)
    assert size.micro_batch == 1 and "does NOT fit" in size.reason
    # a sequence longer than the optimal pass: one per pass, never a bigger pass than today's
    long = _cfg(seq_len=2048, batch_size=16)
    plan = plan_for_run(long, CPU)
    size = choose_pass_size(plan, long, plan.chosen.run.checkpointing, 10**9)
    assert (size.micro_batch, size.tokens) == (1, tokens_per_pass(long, False))
    assert "does NOT fit" in size.reason


def test_a_large_model_on_a_small_machine_gets_a_smaller_micro_batch():
    # Llama-2-7B, QLoRA, 1024-token sequences: the optimal pass is 2 sequences (2048 tokens with
    # checkpointing in bf16); memory between one's training peak and two's leaves room for one
    cfg = _cfg(model="llama-2-7b", method="qlora", seq_len=1024, batch_size=4, dtype="bfloat16")
    plan = plan_for_run(cfg, CPU)
    checkpointing = plan.chosen.run.checkpointing
    optimal = choose_pass_size(plan, cfg, checkpointing, AMPLE)
    small = _memory_between(plan, cfg, checkpointing, 1)
    size = choose_pass_size(plan, cfg, checkpointing, small)
    assert size.micro_batch == 1 < optimal.micro_batch
    assert size.memory.training <= small * (1 - SAFETY_MARGIN) < optimal.memory.training


def test_forced_micro_batch_size_wins():
    cfg = _cfg(seq_len=128, batch_size=16, micro_batch_size=5)
    plan = plan_for_run(cfg, CPU)
    size = choose_pass_size(plan, cfg, plan.chosen.run.checkpointing, 1)
    assert size.micro_batch == 5 and size.reason == "--micro-batch-size"


def _train(tmp_path, model_dir, monkeypatch, available):
    data = tmp_path / "rows.jsonl"
    with data.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"text": " ".join(f"word{i} number{j}" for j in range(20))}) + "\n")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / f"out{available}"), model=str(model_dir), steps=1,
        batch_size=4, seq_len=32, rank=2,
    )  # fmt: skip
    passes: list[int] = []
    real = step_module.micro_batches

    def recording(*args, **kw):  # the real cut, whose pass sizes the test reads
        chunks = real(*args, **kw)
        passes.extend(len(c) for c in chunks)
        return chunks

    monkeypatch.setattr(step_module, "micro_batches", recording)
    monkeypatch.setattr(preflight_module, "machine_memory", lambda device: available)
    result = train(cfg, progress=False)
    assert result.steps == 1
    return cfg.with_method_defaults(), passes


def test_train_shrinks_its_passes_when_memory_is_tight(
    tmp_path, tiny_model_dir, monkeypatch, caplog
):
    cfg, passes = _train(tmp_path, tiny_model_dir, monkeypatch, AMPLE)
    assert passes == [4]  # 4 sequences of <= 32 tokens: one pass of today's 1024-token budget
    plan = plan_for_run(cfg, CPU)
    checkpointing = plan.chosen.run.checkpointing
    tight = _memory_between(plan, cfg, checkpointing, 1)
    with caplog.at_level(logging.INFO, logger="graftlm"):
        _, passes = _train(tmp_path, tiny_model_dir, monkeypatch, tight)
    assert passes == [1, 1, 1, 1]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert any("micro-batch 1 x 32 tokens (the largest that fits" in m for m in logged), logged
