"""Full fine-tuning (`--method full`) on a tiny model: the same losses as a plain PyTorch loop,
a Hugging Face folder that transformers loads, resume, tied embeddings, the lean AdamW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_cfg
from transformers import AutoModelForCausalLM

from graftlm import LoraConfig, inject
from graftlm.adapters.inspect import describe
from graftlm.adapters.io import load_any
from graftlm.adapters.switch import disable_adapters
from graftlm.data.dataset import collate
from graftlm.errors import GraftError
from graftlm.infer.generate import SamplingConfig, generate, load_for_inference
from graftlm.models.load import load_model
from graftlm.train import checkpoint as ckpt
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.lean_adamw import LeanAdamW
from graftlm.train.loop import read_examples, train
from graftlm.train.steps import lr_lambda, step_batches


def full_cfg(tmp_path: Path, model_dir: Path, **overrides) -> TrainConfig:
    values = dict(method="full", lr=1e-3, steps=6, save_every=100)
    values.update(overrides)
    return base_cfg(tmp_path, model_dir, **values)


def plain_pytorch_losses(cfg: TrainConfig) -> list[float]:
    """The reference: transformers' own loss, torch's AdamW and LambdaLR, the same batches."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=torch.float32)
    model.train()
    examples, _ = read_examples(cfg, tokenizer, Runtime.single())
    plan = step_batches(examples, cfg, cfg.steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.steps, cfg.warmup_ratio))
    losses = []
    for indices in plan:
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def step_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_full_fine_tune_matches_a_plain_pytorch_loop(tmp_path, tiny_model_dir):
    cfg = full_cfg(tmp_path, tiny_model_dir)
    result = train(cfg, progress=False)
    assert result.trainable_parameters == result.total_parameters
    expected = plain_pytorch_losses(cfg)
    torch.testing.assert_close(step_losses(Path(cfg.out)), expected, rtol=2e-4, atol=2e-5)
    assert expected[-1] < expected[0] - 0.5  # it learns, so the comparison means something


def test_full_folder_loads_in_transformers_and_generates_the_same(tmp_path, tiny_model_dir):
    cfg = full_cfg(tmp_path, tiny_model_dir)
    train(cfg, progress=False)
    out = Path(cfg.out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    graft = json.loads((out / "graftlm.json").read_text())
    assert graft["method"] == "full" and graft["training"]["steps"] == 6
    facts = describe(out)  # graftlm inspect
    assert facts["method"] == "full" and facts["training"]["steps"] == 6
    assert facts["file_bytes"] == (out / "model.safetensors").stat().st_size

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, tokenizer = load_for_inference(None, {"default": str(out)})
    direct, _ = load_model(out)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    for name, param in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], param, rtol=0, atol=0)
        torch.testing.assert_close(direct.state_dict()[name], param, rtol=0, atol=0)
    base, _ = load_model(tiny_model_dir)
    assert not torch.equal(base.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    inject(base, LoraConfig(rank=2))
    with pytest.raises(GraftError, match="bare base"):
        load_any(base, out, name="full")

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "item 3 is blue"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    reference = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    text = tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
    sampling = SamplingConfig(max_new_tokens=6)
    assert generate(ours, tokenizer, [prompt], adapters=["default"], sampling=sampling) == [text]
    # every weight is trained: the tied head counted once, as transformers counts it
    assert facts["trainable_parameters"] == sum(p.numel() for p in plain.parameters())


def test_full_keeps_tied_embeddings_and_float32_master_weights(tmp_path, tiny_model_dir):
    from graftlm.methods.full import method as full

    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    summary = full.attach(model, None)
    assert summary.trainable == summary.total
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    with pytest.raises(GraftError, match="replaced the base weights"):
        with disable_adapters(model):
            pass


class StopAfter:
    """Stands in for the loop's Ctrl-C/SIGTERM flag: says "stop" at the end of step `steps`
    (the loop reads it once a step), as a signal there would."""

    def __init__(self, steps: int) -> None:
        self.steps, self.reads = steps, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def stop(self) -> bool:
        self.reads += 1
        return self.reads >= self.steps


@pytest.mark.parametrize("lean", [False, True])
def test_full_resume_continues_to_the_same_weights(tmp_path, tiny_model_dir, monkeypatch, lean):
    import graftlm.train.loop as loop

    runs = {}
    for label in ("whole", "resumed"):
        (tmp_path / label).mkdir()
        cfg = full_cfg(tmp_path / label, tiny_model_dir, lean_optimizer=lean, steps=4)
        if label == "resumed":
            with monkeypatch.context() as patch:
                patch.setattr(loop, "StopFlag", StopAfter(2))
                stopped = train(cfg, progress=False)
            assert stopped.interrupted and stopped.steps == 2
            saved = ckpt.read(Path(cfg.out))["tensors"]
            moment = next(v for k, v in saved.items() if k.endswith("/exp_avg_sq"))
            assert moment.dtype == (torch.bfloat16 if lean else torch.float32)
            cfg = TrainConfig(**{**cfg.to_dict(), "resume": True})
        train(cfg, progress=False)
        runs[label] = Path(cfg.out)
    whole, _ = load_model(runs["whole"])
    resumed, _ = load_model(runs["resumed"])
    for name, param in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], param, rtol=0, atol=0)
    assert step_losses(runs["resumed"]) == step_losses(runs["whole"])


def test_lean_adamw_follows_adamw_within_bf16_rounding():
    torch.manual_seed(0)
    start = torch.randn(300, 70)
    target = torch.randn(300, 70)
    runs = {}
    for cls in (torch.optim.AdamW, LeanAdamW):
        weight = torch.nn.Parameter(start.clone())
        optimizer = cls([weight], lr=1e-2, weight_decay=0.01)
        for _ in range(20):
            loss = ((weight - target) ** 2).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        runs[cls] = weight.detach()
        if cls is LeanAdamW:
            assert optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16
    moved = (runs[torch.optim.AdamW] - start).abs().mean()
    drift = (runs[LeanAdamW] - runs[torch.optim.AdamW]).abs().mean()
    assert drift < 0.01 * moved
