"""`graftlm sweep` on a tiny model: rows, plot, recommendation, best/, resume, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import write_chat
from safetensors.torch import load_file

import graftlm
from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.models.load import load_model
from graftlm.train import sweep as sweep_module
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train
from graftlm.train.sweep import pareto, recommend, settings_of, summarize, sweep


def _base(tmp_path: Path, model_dir: Path) -> TrainConfig:
    data = write_chat(tmp_path / "train.jsonl", 80)
    return TrainConfig(
        data=str(data), out=str(tmp_path / "unused"), model=str(model_dir), batch_size=8,
        max_epochs=1.0, dtype="float32", lr=1e-2,
    )  # fmt: skip


def test_sweep_writes_rows_plot_and_the_recommended_adapter(tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    test = write_chat(tmp_path / "test.jsonl", 10, seed=3)
    result = sweep(
        _base(tmp_path, tiny_model_dir), settings_of("lora", "2,4", None), out, test=str(test),
        progress=False,
    )  # fmt: skip
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["rank"] for r in rows] == [2, 4]
    for row in rows:
        assert {"rank", "score", "adapter_mb", "train_s", "eval_loss", "trainable_parameters",
                "peak_rss_mb", "test_score"} <= set(row)  # fmt: skip
        assert row["adapter_mb"] > 0 and row["train_s"] > 0
    assert rows[0]["adapter_mb"] < rows[1]["adapter_mb"]  # rank 2 is smaller than rank 4
    assert (out / "sweep.png").stat().st_size > 0
    assert (
        result["recommended"] in {r["setting"] for r in rows}
        and "within one point" in result["why"]
    )
    model, _ = load_model(tiny_model_dir)
    graftlm.load_adapter(model, out / "best")  # the recommended adapter loads like any other
    chosen = next(r for r in rows if r["setting"] == result["recommended"])
    assert json.loads((out / "best" / "adapter_config.json").read_text())["r"] == chosen["rank"]


def test_a_later_setting_trains_what_a_run_of_its_own_trains(tmp_path, tiny_model_dir):
    # the sweep shares one loaded base and the tokenized data between its runs: nothing the
    # first run does (its adapter, its optimizer, the data order it drew) may reach the second
    base = _base(tmp_path, tiny_model_dir)
    sweep(base, settings_of("lora", "2,4", None), tmp_path / "sweep", progress=False)
    alone = tmp_path / "alone"
    train(dataclasses.replace(base, rank=4, out=str(alone)), progress=False)
    swept = load_file(tmp_path / "sweep" / "runs" / "lora-r4" / "adapter_model.safetensors")
    single = load_file(alone / "adapter_model.safetensors")
    assert swept.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(swept[key], single[key], rtol=0, atol=0, msg=key)


def test_seeds_train_each_setting_once_per_seed_and_best_is_its_best_run(tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    result = sweep(
        _base(tmp_path, tiny_model_dir), settings_of("lora", "2", None, "0,1"), out,
        progress=False,
    )  # fmt: skip
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["setting"], r["group"], r["seed"]) for r in rows] == [
        ("lora-r2-s0", "lora-r2", 0),
        ("lora-r2-s1", "lora-r2", 1),
    ]
    first, second = (load_file(out / "runs" / r["setting"] / "adapter_model.safetensors")
                     for r in rows)  # fmt: skip
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the seed reached the run
    [summary] = result["settings"]
    assert summary["seeds"] == 2 and summary["runs"] == ["lora-r2-s0", "lora-r2-s1"]
    assert summary["eval_loss"] == pytest.approx((rows[0]["eval_loss"] + rows[1]["eval_loss"]) / 2)
    chosen = out / "runs" / result["recommended"] / "adapter_model.safetensors"
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == chosen.read_bytes()


def test_resume_skips_finished_runs_and_ctrl_c_keeps_them(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "sweep"
    base = _base(tmp_path, tiny_model_dir)
    real_train = sweep_module.train
    calls = []

    def second_run_interrupted(cfg, **kwargs):
        calls.append(cfg.rank)
        result = real_train(cfg, **kwargs)
        if len(calls) == 2:
            result.interrupted = True  # as Ctrl-C leaves a run: stopped at a step, checkpointed
        return result

    monkeypatch.setattr(sweep_module, "train", second_run_interrupted)
    with pytest.raises(GraftError, match="interrupted during lora-r4.*1 finished"):
        sweep(base, settings_of("lora", "2,4", None), out, progress=False)
    assert [r["rank"] for r in json.loads((out / "sweep.json").read_text())] == [2]
    with pytest.raises(GraftError, match="already holds a sweep"):
        sweep(base, settings_of("lora", "2,4", None), out, progress=False)
    monkeypatch.setattr(
        sweep_module, "train", lambda cfg, **kw: calls.append(cfg.rank) or real_train(cfg, **kw)
    )
    sweep(base, settings_of("lora", "2,4", None), out, resume=True, progress=False)
    assert calls == [2, 4, 4]  # the resumed sweep ran rank 4 only
    assert [r["rank"] for r in json.loads((out / "sweep.json").read_text())] == [2, 4]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ranks", "4,x"], "--ranks: 'x' is not a positive integer"),
        (["--ranks", "0"], "--ranks: '0' is not a positive integer"),
        (["--lrs", "fast"], "--lrs: 'fast' is not a positive number"),
        (["--methods", "lora,magic"], "--methods: unknown ['magic']"),
        (["--seeds", "0,-1"], "--seeds: '-1' is not an integer >= 0"),
        (["--layers", "all,upper"], "--layers: 'upper' is not a block selection"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, capsys, flags, message):
    code = cli_main(["sweep", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1


def test_recommendation_is_the_smallest_within_a_point_and_pareto_front():
    rows = [
        {"setting": "a", "score": 0.90, "adapter_mb": 8.0, "train_s": 100.0, "eval_loss": 0.1},
        {"setting": "b", "score": 0.895, "adapter_mb": 2.0, "train_s": 90.0, "eval_loss": 0.2},
        {"setting": "c", "score": 0.70, "adapter_mb": 1.0, "train_s": 50.0, "eval_loss": 0.3},
        {"setting": "d", "score": 0.85, "adapter_mb": 4.0, "train_s": 200.0, "eval_loss": 0.2},
    ]
    chosen, why = recommend(rows)
    assert chosen["setting"] == "b" and "0.90" in why
    assert {r["setting"] for r in pareto(rows, "adapter_mb", "score")} == {"a", "b", "c"}
    by_loss = [{**r, "score": None} for r in rows]
    assert recommend(by_loss)[0]["setting"] == "a"  # paragraphs: the lowest eval loss


def test_settings_are_compared_by_their_mean_over_seeds():
    def run(group, seed, score, mb):
        return {"setting": f"{group}-s{seed}", "group": group, "seed": seed, "score": score,
                "adapter_mb": mb, "train_s": 10.0, "eval_loss": 1.0 - score}  # fmt: skip

    # "big" holds the luckiest single run (0.95), but "small" is better on average
    rows = [run("big", 0, 0.95, 8.0), run("big", 1, 0.65, 8.0),
            run("small", 0, 0.85, 2.0), run("small", 1, 0.83, 2.0)]  # fmt: skip
    chosen, why = recommend(rows)
    assert chosen["setting"] == "small-s0"  # the better seed of the better setting
    assert "0.84" in why and "mean of 2 seeds" in why and "small-s0" in why
    big, small = summarize(rows)
    assert big["score"] == pytest.approx(0.80) and big["score_sd"] == pytest.approx(0.15)
    assert small["seeds"] == 2 and small["runs"] == ["small-s0", "small-s1"]
    assert [s.name for s in settings_of("lora", "4", "1e-3", "0,2")] == [
        "lora-r4-lr0.001-s0",
        "lora-r4-lr0.001-s2",
    ]


def test_block_selections_are_a_sweep_axis_for_the_layered_methods():
    names = [s.name for s in settings_of("lora,ia3", "4", None, None, "all,top-half")]
    assert names == ["lora-r4", "lora-r4-layerstop-half", "ia3"]


def test_a_layers_setting_trains_the_upper_block_only(tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    result = sweep(
        _base(tmp_path, tiny_model_dir), settings_of("lora", "2", None, None, "all,top-half"),
        out, progress=False,
    )  # fmt: skip
    assert [row["layers"] for row in result["rows"]] == ["all", "top-half"]
    config = json.loads(
        (out / "runs" / "lora-r2-layerstop-half" / "adapter_config.json").read_text()
    )
    assert config["layers_to_transform"] == [1]
    everything, upper = result["rows"]
    assert upper["trainable_parameters"] * 2 == everything["trainable_parameters"]
