"""`--ema-decay`: the moving average of the trainable tensors, what a run validates, keeps and
saves with it, and a resumed run's average."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import base_cfg, write_chat
from safetensors.torch import load_file

from graftlm.errors import GraftError
from graftlm.train import validation
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train
from graftlm.train.weight_average import WeightAverage


def _expected_average(snapshots: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The warmed-up EMA written out: start at the initial tensor, one update per step."""
    average = snapshots[0].clone()
    for n, tensor in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * tensor
    return average


def test_the_average_warms_up_then_follows_the_decay():
    weight = torch.nn.Parameter(torch.zeros(4))
    average = WeightAverage({"w": weight}, decay=0.5)
    values = [torch.zeros(4)]
    for k in range(1, 8):
        with torch.no_grad():
            weight.fill_(float(k))
        values.append(weight.detach().clone())
        average.update()
    assert torch.allclose(average.average["w"], _expected_average(values, 0.5))
    # warmup: the first update keeps 2/11 of the start, later ones the decay itself
    assert WeightAverage({"w": weight}, decay=0.99).current_decay() == pytest.approx(2 / 11)
    assert average.current_decay() == 0.5
    with pytest.raises(ValueError, match="decay"):
        WeightAverage({"w": weight}, decay=1.0)


def test_applied_swaps_the_average_in_and_the_step_s_tensors_back():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage({"w": weight}, decay=0.9)
    with torch.no_grad():
        weight.fill_(5.0)
    average.update()
    inside = average.average["w"].clone()
    with pytest.raises(RuntimeError, match="inside"):
        with average.applied():
            assert torch.equal(weight.detach(), inside)
            raise RuntimeError("inside")
    assert torch.equal(weight.detach(), torch.full((3,), 5.0))  # back, even after an error
    again = WeightAverage({"w": weight}, decay=0.9)
    again.load_state_dict(average.state_dict())
    assert again.updates == 1 and torch.equal(again.average["w"], inside)


def _recording(monkeypatch) -> tuple[list[dict], list[dict]]:
    """Record the trainable tensors at every update (the first entry: the start) and the
    average after it."""
    steps: list[dict] = []
    averages: list[dict] = []
    real_init, real_update = WeightAverage.__init__, WeightAverage.update

    def init(self, params, decay):
        real_init(self, params, decay)
        steps.append({n: p.detach().clone() for n, p in params.items()})

    def update(self):
        real_update(self)
        steps.append({n: p.detach().clone() for n, p in self.params.items()})
        averages.append({n: t.clone() for n, t in self.average.items()})

    monkeypatch.setattr(WeightAverage, "__init__", init)
    monkeypatch.setattr(WeightAverage, "update", update)
    return steps, averages


def _saved(out: Path) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under the model's parameter names."""
    saved = load_file(str(out / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model."): v for k, v in saved.items()}


def _as_saved(name: str) -> str:
    return name.replace(".default", "")  # PEFT's names in the file


def test_a_fixed_run_saves_the_average_of_its_steps(tmp_path, tiny_model_dir, monkeypatch):
    steps, _ = _recording(monkeypatch)
    cfg = base_cfg(tmp_path, tiny_model_dir, ema_decay=0.8, steps=8)
    train(cfg, progress=False)
    assert len(steps) == 1 + 8  # the start, then one update a step
    saved = _saved(Path(cfg.out))
    assert saved and len(saved) == len(steps[0])
    for name in steps[0]:
        expected = _expected_average([s[name] for s in steps], 0.8)
        assert torch.allclose(saved[_as_saved(name)], expected, atol=1e-6), name
    # and it is not the last step's adapter (lora_B moved away from zero in every step)
    moved = [n for n in steps[0] if "lora_B" in n]
    assert moved and not any(torch.equal(saved[_as_saved(n)], steps[-1][n]) for n in moved)
    graft = json.loads((Path(cfg.out) / "graftlm.json").read_text())
    assert graft["training"]["settings"]["ema_decay"] == 0.8


def test_an_adaptive_run_validates_and_keeps_the_average(tmp_path, tiny_model_dir, monkeypatch):
    _, averages = _recording(monkeypatch)
    scored = []

    def scripted(answers, runtime):  # remembers what it was asked to score
        model = answers.model
        scored.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
        return [0.25, 0.5, 0.25, 0.25, 0.25, 0.25][len(scored) - 1]

    monkeypatch.setattr(validation.GreedyAnswers, "exact_match", scripted)
    data = write_chat(tmp_path / "rows.jsonl", 120)
    cfg = base_cfg(
        tmp_path, tiny_model_dir, data=str(data), steps=None, max_epochs=40.0, patience=2,
        lr=5e-2, warmup_ratio=0.005, ema_decay=0.9,
    )  # fmt: skip
    train(cfg, progress=False)
    graft = json.loads((Path(cfg.out) / "graftlm.json").read_text())
    best_step = graft["training"]["validation"]["best_step"]
    assert best_step > 0
    best_average = averages[best_step - 1]  # the average after step `best_step`
    saved = _saved(Path(cfg.out))
    for name, tensor in best_average.items():
        assert torch.equal(saved[_as_saved(name)], tensor), name
    # validation scored the average, never the step's own tensors
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if "exact_match" in r]
    assert len(scored) == len(eval_steps) >= 3
    for seen, step in zip(scored, eval_steps):
        assert all(torch.equal(seen[n], averages[step - 1][n]) for n in seen)


def test_a_resumed_run_continues_the_average(tmp_path, tiny_model_dir, monkeypatch):
    whole = base_cfg(tmp_path, tiny_model_dir, ema_decay=0.7, steps=6, out=str(tmp_path / "a"))
    train(whole, progress=False)
    real_update = WeightAverage.update

    def interrupting_update(self):  # Ctrl-C during step 3: checkpoint after it, then stop
        real_update(self)
        if self.updates == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(WeightAverage, "update", interrupting_update)
    cut = base_cfg(tmp_path, tiny_model_dir, ema_decay=0.7, steps=6, out=str(tmp_path / "b"))
    assert train(cut, progress=False).interrupted
    monkeypatch.setattr(WeightAverage, "update", real_update)
    resumed = train(TrainConfig(**{**cut.to_dict(), "resume": True}), progress=False)
    assert resumed.steps == 6 and not resumed.interrupted
    first, second = _saved(tmp_path / "a"), _saved(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ema_decay": 1.0}, r"ema_decay should be in \[0, 1\), got 1.0"),
        ({"ema_decay": -0.1}, "ema_decay should be in"),
        ({"ema_decay": 0.9, "method": "adalora"}, "ema_decay: AdaLoRA prunes ranks"),
    ],
)
def test_bad_ema_decay_is_a_named_error(tmp_path, tiny_model_dir, values, message):
    with pytest.raises(GraftError, match=message):
        base_cfg(tmp_path, tiny_model_dir, **values)
