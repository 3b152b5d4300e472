"""`graftlm plan`: parameter counts equal PEFT's, the adapter file's size equals graftlm's own,
NF4 bytes equal the format's, the shipped configs' published sizes, and bad configs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch

from graftlm.errors import GraftError
from graftlm.plan.memory import nf4_bytes
from graftlm.plan.report import PlanRequest, plan_run, safetensors_bytes
from graftlm.plan.shapes import model_shape, read_config, shipped_configs, trainable
from graftlm.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _cfg(method="lora", **kw):
    return TrainConfig(data="-", out="-", method=method, **kw).with_method_defaults()


def _as_method(cfg, method):
    out = copy.copy(cfg)
    object.__setattr__(out, "method", method)
    return out


def _shape(model):
    return model_shape(model.config.to_dict(), "tiny")


@pytest.mark.parametrize("kind", helpers.TINY_KINDS)
@pytest.mark.parametrize(
    "targets, dora",
    [("all-linear", False), ("attention", False), ("all-linear", True)],
)
def test_trainable_params_equal_peft(kind, targets, dora):
    peft = pytest.importorskip("peft")
    model = helpers.tiny_model_factory(kind)
    if targets == "attention":
        targets = "c_attn,c_proj" if kind == "gpt2" else "q_proj,v_proj"
    cfg = _cfg(rank=4, targets=targets)
    planned = trainable(_shape(model), _as_method(cfg, "dora") if dora else cfg)
    modules = "all-linear" if targets == "all-linear" else targets.split(",")
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=modules, use_dora=dora)
    )
    trained, total = peft_model.get_nb_trainable_parameters()
    assert (planned.params, planned.total_params) == (trained, total)


def test_full_fine_tuning_trains_every_parameter(tiny_qwen2):
    planned = trainable(_shape(tiny_qwen2), _as_method(_cfg(), "full"))
    assert planned.params == planned.total_params == sum(p.numel() for p in tiny_qwen2.parameters())


@pytest.mark.parametrize("method", ["ia3", "bottleneck", "adalora", "prefix", "prompt"])
def test_other_methods_count_what_attach_trains(tiny_llama, method):
    from graftlm.methods import method_module

    shape = _shape(tiny_llama)
    cfg = _cfg(method)
    planned = trainable(shape, cfg)
    method_module(method).attach(tiny_llama, cfg)
    assert planned.params == sum(p.numel() for p in tiny_llama.parameters() if p.requires_grad)


def test_adapter_bytes_equal_the_saved_file(tiny_qwen2, tmp_path):
    import graftlm
    from graftlm.methods.lora.config import LoraConfig

    shape = _shape(tiny_qwen2)
    planned = trainable(shape, _cfg(rank=4, targets="q_proj,v_proj,down_proj"))
    graftlm.inject(tiny_qwen2, LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")))
    graftlm.save_adapter(tiny_qwen2, tmp_path / "a")
    assert (
        safetensors_bytes(planned.tensors)
        == (tmp_path / "a/adapter_model.safetensors").stat().st_size
    )


@pytest.mark.parametrize("numel", [64, 4096, 64 * 256, 64 * 256 + 1, 64 * 256 * 3 + 65, 999])
def test_nf4_bytes_equal_the_format(numel):
    from graftlm.quant.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(numel), blocksize=64, double_quant=True)
    assert nf4_bytes(numel) == q.nbytes()


def test_shipped_configs_have_the_published_sizes():
    published = {  # parameters, from the model cards
        "llama-2-7b": 6_738_415_616,
        "llama-3-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
        "qwen2.5-7b": 7_615_616_512,
        "llama-3-70b": 70_553_706_496,
        "smollm2-135m-instruct": 134_515_008,
    }
    assert set(published) == set(shipped_configs())
    for name, params in published.items():
        assert model_shape(*read_config(name)).total_params == params, name


def test_unknown_architecture_is_planned_from_its_shapes(tmp_path):
    values = json.loads((shipped_configs()["smollm2-135m-instruct"]).read_text())
    values["model_type"] = "my-own-llm"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.warns(UserWarning, match="my-own-llm"):
        shape = model_shape(*read_config(config=str(path)))
    assert shape.total_params == 134_515_008


def test_missing_fields_are_one_error_naming_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 64}))
    with pytest.raises(
        GraftError, match="missing field.*num_hidden_layers, num_attention_heads, intermediate_size"
    ):
        model_shape(*read_config(config=str(path)))
    result = subprocess.run(
        [sys.executable, "-m", "graftlm", "plan", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "num_hidden_layers" in result.stderr and str(path) in result.stderr


def test_plan_fits_memory_and_full_costs_more():
    shape = model_shape(*read_config("smollm2-135m-instruct"))
    request = PlanRequest(batch_size=8, seq_len=256, memory=4 * 10**9, matmul_tflops=1.0)
    plan = plan_run(shape, request, "built-in")
    assert plan.chosen.memory.peak < plan.full.memory.peak
    assert plan.chosen.largest_micro_batch >= plan.full.largest_micro_batch >= 1
    tight = PlanRequest(
        batch_size=8, seq_len=256, memory=plan.chosen.memory.peak, matmul_tflops=1.0
    )
    untimed = plan_run(shape, tight, with_full=False, timed=False)  # train's check
    assert untimed.chosen.largest_micro_batch >= plan.chosen.run.micro_batch_size
    assert untimed.to_dict()["step_seconds"] == 0 and "full" not in untimed.to_dict()


def test_the_weight_average_is_counted_as_training_holds_it():
    from graftlm.train.weight_average import WeightAverage

    shape = model_shape(*read_config("smollm2-135m-instruct"))
    plain = plan_run(shape, PlanRequest(seq_len=256), timed=False)
    averaged = plan_run(shape, PlanRequest(seq_len=256, ema_decay=0.95), timed=False)
    for before, after in ((plain.chosen, averaged.chosen), (plain.full, averaged.full)):
        n = before.trainable.params
        assert after.memory.training - before.memory.training == 8 * n
    assert averaged.to_dict()["full"]["weight_average_bytes"] == 8 * plain.full.trainable.params
    assert plain.to_dict()["weight_average_bytes"] == 0
    # what train/weight_average.py holds once validation has scored the average
    tensors = {"a": torch.zeros(1000, 3), "b": torch.zeros(7)}
    average = WeightAverage(tensors, 0.9)
    with average.applied():
        pass
    held = [*average.average.values(), *average._live.values()]
    assert sum(t.numel() * t.element_size() for t in held) == 8 * 3007
    with pytest.raises(GraftError, match="ema_decay"):
        PlanRequest(ema_decay=1.0)


@pytest.mark.parametrize(
    "source",
    [
        ["--config", "the shipped file's path"],
        ["--config", "llama-2-7b.json"],  # no such file in the cwd: the shipped one by its name
        ["--model", "llama-2-7b"],
    ],
)
def test_seed_row_from_outside(source):
    if source[1] == "the shipped file's path":
        source = ["--config", str(shipped_configs()["llama-2-7b"])]
    assert not (REPO / "llama-2-7b.json").exists()
    result = subprocess.run(
        [sys.executable, "-m", "graftlm", "plan", *source, "--method", "lora", "--rank", "8",
         "--targets", "q_proj,v_proj", "--matmul-tflops", "100", "--device", "cuda", "--json"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["trainable_params"] == 4_194_304
    assert plan["trainable_percent"] == pytest.approx(0.0622, abs=1e-4)
    # 128 tensors: A [8, 4096] and B [4096, 8] in fp32, and their header (~17 KB)
    assert 4_194_304 * 4 < plan["adapter_bytes"] < 4_194_304 * 4 + 32_768
    assert plan["base_weight_bytes"] == 6_738_415_616 * 2
    assert plan["peak_bytes"] >= plan["base_weight_bytes"]
    assert plan["full"]["trainable_params"] == 6_738_415_616
