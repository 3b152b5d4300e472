"""graftlm's training loop against PEFT + the plain PyTorch loop: the same loss at every step.

All of graftlm's speed and memory work (fused kernels, the fused vocabulary loss, micro-batches,
length-grouped batches) must leave the numbers alone: with the same data, initial adapter,
batches and precision, the per-step loss of `graftlm.train.loop` stays within 2% of PEFT's for 50
steps (the issue's acceptance; on fp32 the two agree far closer than that).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from graftlm.data.dataset import collate, load_dataset
from graftlm.methods import method_module
from graftlm.methods.lora.files import adapter_state_dict
from graftlm.methods.lora.inject import base_fingerprint
from graftlm.models.load import load_model
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train
from graftlm.train.steps import lr_lambda, step_batches

peft = pytest.importorskip("peft")  # a test dependency (pyproject [test]); present in `make test`

WORDS = "the router modem cable light blinks red green after reset support ticket waits".split()


def write_text(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    lines = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))})
        for _ in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fifty_steps_of_loss_match_peft(tmp_path, tiny_model_dir):
    cfg = TrainConfig(
        data=str(write_text(tmp_path / "train.jsonl", 48)),
        out=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        rank=4,
        alpha=8,
        targets="q_proj,v_proj",
        batch_size=4,
        steps=50,
        seq_len=64,
        lr=3e-2,
        dtype="float32",
        save_every=1000,
        neftune_alpha=0.0,  # the reference loop below adds no noise
    ).with_method_defaults()
    result = train(cfg, progress=False)
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in rows if "loss" in r]

    # graftlm's initial adapter: the same calls in the same order as train() draws them
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=torch.float32)
    examples, _ = load_dataset(cfg.data, tokenizer, cfg.seq_len)
    base_fingerprint(model)
    method_module("lora").attach(model, cfg)
    initial = adapter_state_dict(model)

    base, _ = load_model(cfg.model, dtype=torch.float32)
    reference = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    peft.set_peft_model_state_dict(reference, initial)
    reference.train()
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(50, cfg.warmup_ratio))
    plan = step_batches(examples, cfg, 50)
    theirs = []
    for step in range(50):  # the plain loop a PEFT user writes: padded batch, labels=..., mean loss
        batch = collate([examples[i] for i in plan[step]], tokenizer.pad_token_id)
        out = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        theirs.append(out.loss.item())

    assert len(ours) == 50
    assert ours[-1] < ours[0] - 0.2  # it learns: later steps test the updates, not the init
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert abs(a - b) <= 0.02 * b, f"step {step}: graftlm {a:.6f}, PEFT {b:.6f}"
    # in fp32 the agreement is far closer than the 2% bar: only summation order differs
    assert max(abs(a - b) / b for a, b in zip(ours, theirs)) < 1e-3
