"""The plan's CPU step time, built from parts timed at the model's own shapes: what is measured,
how the parts add up, and that `plan_run` uses them where it measures rates."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch

from graftlm.plan import report
from graftlm.plan.report import PlanRequest, plan_run
from graftlm.plan.shapes import model_shape, read_config
from graftlm.plan.step_time import (
    MEASURE_FLOPS,
    StepParts,
    measurable,
    measure_step_parts,
    measured_shape,
)
from graftlm.plan.timing import Rates
from graftlm.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _tiny_shape():
    return model_shape(helpers.tiny_llama().config.to_dict(), "tiny")


def test_parts_add_up_per_pass_and_scale_with_tokens():
    parts = StepParts(layer=0.5, head=2.0, optimizer=0.25, rows=2, seq_len=128)
    # 3 passes of the measured size: 3 x (4 layers + head) + optimizer
    assert parts.step_seconds(layers=4, passes=3, pass_tokens=256) == pytest.approx(12.25)
    # a pass twice the measured tokens takes twice as long; the optimizer does not grow
    assert parts.step_seconds(layers=4, passes=1, pass_tokens=512) == pytest.approx(8.25)


def test_measured_pass_is_the_runs_unless_too_big():
    small = model_shape(*read_config("smollm2-135m-instruct"))
    assert measured_shape(small, 2, 128) == (2, 128)
    big = model_shape(*read_config("llama-3-70b"))
    rows, tokens = measured_shape(big, 4, 4096)
    assert rows == 1 and 64 <= tokens < 4096
    layer = sum(lin.out_features * lin.in_features for lin in big.linears) / big.layers
    assert tokens == 64 or 6 * layer * tokens <= MEASURE_FLOPS
    # a 70B layer is not built to be timed (the plan keeps the FLOP model); an 8B one is
    assert measurable(small) and measurable(model_shape(*read_config("llama-3-8b")))
    assert not measurable(big)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_parts_are_measured_on_the_model(method):
    # wide enough that one layer's pass (~0.1 GFLOP) stands out of a loaded machine's noise
    values = {**helpers.tiny_llama().config.to_dict(), "hidden_size": 512}
    shape = model_shape({**values, "intermediate_size": 1536}, "tiny")
    cfg = TrainConfig(data="-", out="-", rank=4).with_method_defaults()
    parts = measure_step_parts(
        shape, cfg, method, torch.float32, 2, 16, checkpointing=False, trainable_params=10**6
    )
    assert (parts.rows, parts.seq_len) == (2, 16)
    assert parts.layer > 0 and parts.head > 0 and parts.optimizer > 0


def test_plan_uses_the_parts_when_it_measures(monkeypatch):
    shape = _tiny_shape()
    measured = StepParts(layer=0.5, head=2.0, optimizer=0.25, rows=2, seq_len=32)
    calls = []

    def parts(*args, **kw):  # the arithmetic from given parts; the timing is tested above
        calls.append(args)
        return measured

    monkeypatch.setattr(report, "measure_step_parts", parts)
    monkeypatch.setattr(report, "measure_rates", lambda dtype: Rates(1e11, 1e10, True))
    request = PlanRequest(batch_size=4, micro_batch_size=2, seq_len=32, dtype="float32")
    plan = plan_run(shape, request, with_full=False)
    assert calls and plan.chosen.step_seconds == pytest.approx(
        measured.step_seconds(shape.layers, 2, 64)
    )
    assert plan.chosen.flops_step_seconds != plan.chosen.step_seconds
    # a given (GPU) rate keeps the FLOP model
    given = plan_run(shape, dataclasses.replace(request, matmul_tflops=1.0), with_full=False)
    assert given.chosen.step_seconds == given.chosen.flops_step_seconds


def test_plan_threads_must_be_positive():
    result = subprocess.run(
        [sys.executable, "-m", "graftlm", "plan", "--threads", "0", "--matmul-tflops", "1"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --threads should be a positive integer, got 0"
