"""The training loop on a tiny model: outputs, metrics, eval, resume after a kill, CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import base_cfg, write_chat
from safetensors.torch import load_file

from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train
from graftlm.train.steps import micro_batches, step_batches


def test_train_writes_adapter_metrics_plot_and_learns(tmp_path, tiny_model_dir):
    eval_file = write_chat(tmp_path / "eval.jsonl", 8, seed=1)
    cfg = base_cfg(tmp_path, tiny_model_dir, eval_data=str(eval_file), steps=12, eval_every=4)
    result = train(cfg, progress=False)
    out = Path(cfg.out)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "graftlm.json",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= set(r)
        assert r["tokens"] > 0
    assert [r["elapsed_s"] for r in train_rows] == sorted(r["elapsed_s"] for r in train_rows)
    assert [r["step"] for r in eval_rows] == [4, 8, 12]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert result.eval_loss == pytest.approx(eval_rows[-1]["eval_loss"], rel=1e-4)
    graft = json.loads((out / "graftlm.json").read_text())
    assert graft["training"]["steps"] == 12


def test_bf16_training_follows_the_fp32_run(tmp_path, tiny_model_dir):
    """What `--dtype auto` picks on CPUs with bf16 matrix units (frozen weights in bf16,
    autocast): emulated and slow here, but the same code path. The adapter stays fp32 and the
    losses follow the fp32 run within bf16's rounding."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / dtype).mkdir()
        result = train(base_cfg(tmp_path / dtype, tiny_model_dir, dtype=dtype), progress=False)
        rows = (result.out / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in rows if '"loss"' in line]
        weights = load_file(str(result.out / "adapter_model.safetensors"))
        runs[dtype] = (losses, weights)
    (fp32_losses, fp32_weights), (bf16_losses, bf16_weights) = runs["float32"], runs["bfloat16"]
    assert len(bf16_losses) == len(fp32_losses) == 6
    assert all(math.isfinite(loss) for loss in bf16_losses)
    assert bf16_losses[-1] < bf16_losses[0]
    assert bf16_losses != fp32_losses  # bf16 really ran: its rounding shows
    for ours, reference in zip(bf16_losses, fp32_losses):
        assert ours == pytest.approx(reference, rel=0.03)
    assert all(w.dtype == torch.float32 for w in bf16_weights.values())
    assert bf16_weights.keys() == fp32_weights.keys()


def test_step_loss_does_not_depend_on_micro_batch_size(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # NEFTune (on in LoRA's recipe) draws noise per forward pass, so its draws follow the cut;
    # the cut alone is what this test checks
    quiet = {"steps": 3, "neftune_alpha": 0.0}
    a = train(base_cfg(tmp_path / "a", tiny_model_dir, micro_batch_size=1, **quiet), progress=False)
    b = train(base_cfg(tmp_path / "b", tiny_model_dir, micro_batch_size=8, **quiet), progress=False)
    wa = load_file(str(a.out / "adapter_model.safetensors"))
    wb = load_file(str(b.out / "adapter_model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_step_plan_is_deterministic_and_covers_data(tmp_path, tiny_model_dir):
    from graftlm.data.dataset import Example
    from graftlm.train.distributed import Runtime

    examples = [
        Example(input_ids=[1] * (5 + i % 7), labels=[1] * (5 + i % 7), source=f"x:{i}")
        for i in range(30)
    ]
    cfg = base_cfg(tmp_path, tiny_model_dir, batch_size=10, steps=6)
    plan = step_batches(examples, cfg, 6)
    assert plan == step_batches(examples, cfg, 6)
    first_epoch = sorted(i for step in plan[:3] for i in step)
    assert first_epoch == list(range(30))
    chunks = micro_batches(plan[0], examples, cfg, Runtime.single())
    assert sorted(i for c in chunks for i in c) == sorted(plan[0])


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "graftlm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for_checkpoint(
    out: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120
) -> None:
    deadline = time.time() + timeout
    state = out / "checkpoint" / "state.json"
    while time.time() < deadline:
        if state.is_file():
            try:
                if json.loads(state.read_text())["step"] >= min_step:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended before step {min_step}: {proc.stderr.read()[-2000:]}"
            )
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_kill_gives_the_same_adapter(tmp_path, tiny_model_dir, sig):
    data = write_chat(tmp_path / "train.jsonl", 60)
    common = [
        "train",
        "--data",
        str(data),
        "--model",
        str(tiny_model_dir),
        "--rank",
        "4",
        "--batch-size",
        "4",
        "--steps",
        "150",
        "--save-every",
        "1",
        "--dtype",
        "float32",
        "--lr",
        "5e-3",
        "--quiet",
    ]
    reference = tmp_path / "reference"
    done = _run_cli([*common, "--out", str(reference)])
    assert done.wait(timeout=300) == 0, done.stderr.read()[-2000:]

    resumed = tmp_path / "resumed"
    proc = _run_cli([*common, "--out", str(resumed)])
    _wait_for_checkpoint(resumed, proc, min_step=5)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    if sig == signal.SIGINT:
        assert code == 130, proc.stderr.read()[-2000:]
    assert not (resumed / "adapter_model.safetensors").exists(), (
        "an interrupted run must not leave an adapter"
    )
    again = _run_cli([*common, "--out", str(resumed), "--resume"])
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]

    ref_w = load_file(str(reference / "adapter_model.safetensors"))
    res_w = load_file(str(resumed / "adapter_model.safetensors"))
    assert ref_w.keys() == res_w.keys()
    for key in ref_w:
        assert torch.equal(ref_w[key], res_w[key]), key
    steps = [
        json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 151)), "each step logged exactly once across the resume"


def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir):
    cfg = base_cfg(tmp_path, tiny_model_dir)
    train(cfg, progress=False)
    with pytest.raises(GraftError, match="lr"):
        train(cfg.__class__(**{**cfg.to_dict(), "resume": True, "lr": 0.5}), progress=False)
    with pytest.raises(GraftError, match="already holds a training run"):
        train(cfg, progress=False)


def test_config_validation_names_the_field():
    with pytest.raises(GraftError, match="rank"):
        TrainConfig(data="x", out="y", rank=0)
    with pytest.raises(GraftError, match="lr"):
        TrainConfig(data="x", out="y", lr=-1.0)
    with pytest.raises(GraftError, match="method"):
        TrainConfig(data="x", out="y", method="lokr")
    with pytest.raises(GraftError, match=r"unknown setting\(s\) \['bogus'\]"):
        TrainConfig.from_dict({"data": "x", "out": "y", "bogus": 1})


# -- CLI error paths: one clear line, exit code 2, no traceback ---------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_cli_errors(tmp_path, tiny_model_dir, capsys):
    err = _cli_error(
        capsys, ["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert "missing.jsonl" in err and "not found" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    err = _cli_error(
        capsys,
        ["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir)],
    )
    assert "bad.jsonl:2" in err

    err = _cli_error(
        capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--rank", "0"]
    )
    assert "rank" in err and "0" in err

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: x.jsonl\nout: o\nlearning_rate: 1\n")
    err = _cli_error(capsys, ["train", "--config", str(yaml_file)])
    assert "learning_rate" in err

    err = _cli_error(capsys, ["inspect", str(tmp_path)])
    assert "adapter_config.json" in err

    err = _cli_error(capsys, ["generate", "--model", str(tiny_model_dir), "--input", str(bad)])
    assert "--output" in err

    err = _cli_error(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert "nope" in err


def test_cli_yaml_config_with_flag_override(tmp_path, tiny_model_dir, capsys):
    data = write_chat(tmp_path / "train.jsonl", 16)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"data: {data}\nout: {tmp_path / 'o'}\nmodel: {tiny_model_dir}\nrank: 2\nsteps: 2\nbatch-size: 4\ndtype: float32\n"
    )
    assert cli_main(["train", "--config", str(yaml_file), "--rank", "3", "--quiet"]) == 0
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["r"] == 3
    assert cli_main(["inspect", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "rank           3" in out and "steps 2" in out
    assert "base weights" in out and "optimizer state" in out


def test_memory_accounting_counts_base_adapter_and_adamw_state(tmp_path, tiny_model_dir):
    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train

    data = write_chat(tmp_path / "train.jsonl", 16)
    results = {}
    for method in ("lora", "qlora"):
        cfg = TrainConfig(
            data=str(data),
            out=str(tmp_path / method),
            model=str(tiny_model_dir),
            method=method,
            rank=4,
            steps=2,
            batch_size=4,
            dtype="float32",
        )
        results[method] = train(cfg, progress=False)
    for result in results.values():
        memory = result.memory
        assert memory["adapter_bytes"] == 4 * result.trainable_parameters  # fp32 adapter
        # AdamW: exp_avg and exp_avg_sq per trainable value, plus one step counter per tensor
        assert 2 * memory["adapter_bytes"] <= memory["optimizer_state_bytes"]
        assert memory["optimizer_state_bytes"] <= 2 * memory["adapter_bytes"] + 8 * 1024
        assert memory["peak_rss_bytes"] > memory["base_weight_bytes"]
        saved = json.loads((result.out / "graftlm.json").read_text())["training"]["memory"]
        assert saved["adapter_bytes"] == memory["adapter_bytes"]
    # the 4-bit base holds its linear layers in ~0.5 byte per weight instead of 4
    assert (
        results["qlora"].memory["base_weight_bytes"]
        < 0.8 * results["lora"].memory["base_weight_bytes"]
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_shared_prefix_forward_gives_the_same_loss_and_gradients(kind, tiny_model_factory):
    from graftlm.data.dataset import Example
    from graftlm.methods.lora.config import LoraConfig
    from graftlm.methods.lora.inject import inject
    from graftlm.train.forward import loss_sum, prefix_sharing_is_exact

    model = tiny_model_factory(kind)
    inject(model, LoraConfig(rank=4, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.eval()  # no dropout: both passes must see the same network
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(4, 200, (12,), generator=g)
    ids = torch.stack(
        [torch.cat([prefix, torch.randint(4, 200, (9,), generator=g)]) for _ in range(3)]
    )
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0  # one row right-padded
    labels = ids.clone()
    labels[:, :10] = -100
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for share in (False, True):
        model.zero_grad()
        loss, count = loss_sum(model, batch, torch.float32, share_prefix=share)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), count, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1] == results[1][1]
    for name in results[0][2]:
        torch.testing.assert_close(results[0][2][name], results[1][2][name], rtol=1e-4, atol=1e-5)
    assert prefix_sharing_is_exact(model, Example(ids[0].tolist(), ids[0].tolist(), "x"), 2)


def test_low_memory_checkpoints_and_without_checkpointing_cuts_smaller_passes(
    tmp_path, tiny_model_dir
):
    from dataclasses import replace

    from graftlm.data.dataset import Example
    from graftlm.train import steps as train_module
    from graftlm.train.distributed import Runtime

    examples = [Example(input_ids=[1] * 256, labels=[1] * 256, source=f"x:{i}") for i in range(8)]
    cfg = base_cfg(tmp_path, tiny_model_dir, batch_size=8, steps=1)
    low = replace(cfg, low_memory=True)
    plan = list(range(8))
    assert train_module.needs_checkpointing(low, examples)
    assert not train_module.needs_checkpointing(cfg, examples)
    assert not train_module.needs_checkpointing(low, [])  # nothing to train on
    assert train_module.needs_checkpointing(low, None)  # a planned run: its data not read yet
    assert not train_module.needs_checkpointing(cfg, None)
    assert train_module.needs_checkpointing(replace(cfg, activation_checkpointing=True), examples)
    # with checkpointing a pass keeps only layer inputs: bigger passes, fewer recomputations
    budget = train_module.tokens_per_pass(low, checkpointing=True)
    assert [len(c) for c in micro_batches(plan, examples, low, Runtime.single(), budget)] == [8]
    # --low-memory --no-activation-checkpointing: smaller passes than a plain run's
    off = replace(low, activation_checkpointing=False)
    assert not train_module.needs_checkpointing(off, examples)
    assert [len(c) for c in micro_batches(plan, examples, cfg, Runtime.single())] == [4, 4]
    budget = train_module.tokens_per_pass(off, checkpointing=False)
    assert [len(c) for c in micro_batches(plan, examples, off, Runtime.single(), budget)] == [1] * 8


@pytest.mark.parametrize("checkpointing", [False, None], ids=["small-passes", "checkpointing"])
def test_low_memory_mode_trains_the_same_adapter(tmp_path, tiny_model_dir, checkpointing):
    """Activation checkpointing (low-memory mode's default), or smaller passes without it:
    same numbers, less memory."""
    from safetensors.torch import load_file

    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train

    data = write_chat(tmp_path / "train.jsonl", 16)
    weights = {}
    for low_memory in (False, True):
        out = tmp_path / f"low{low_memory}"
        cfg = TrainConfig(
            data=str(data), out=str(out), model=str(tiny_model_dir), rank=4, steps=3,
            batch_size=4, dtype="float32", low_memory=low_memory,
            activation_checkpointing=checkpointing if low_memory else None,
        )  # fmt: skip
        train(cfg, progress=False)
        weights[low_memory] = load_file(out / "adapter_model.safetensors")
        settings = json.loads((out / "graftlm.json").read_text())["training"]["settings"]
        assert settings["low_memory"] is low_memory
    for key, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][key], tensor, rtol=1e-4, atol=1e-6)


def test_qlora_recipe_turns_on_low_memory_mode():
    from graftlm.data.dataset import Example
    from graftlm.train.config import TrainConfig
    from graftlm.train.steps import needs_checkpointing

    qlora = TrainConfig(data="d", out="o", method="qlora").with_method_defaults()
    assert qlora.low_memory
    assert qlora.activation_checkpointing is None  # low-memory mode decides
    rows = [Example(input_ids=[1] * 100, labels=[1] * 100, source="x:0")]
    assert needs_checkpointing(qlora, rows)
    assert TrainConfig(data="d", out="o").with_method_defaults().activation_checkpointing is None
    assert not TrainConfig(data="d", out="o").with_method_defaults().low_memory
    off = TrainConfig(data="d", out="o", method="qlora", low_memory=False)
    assert off.with_method_defaults().low_memory is False
