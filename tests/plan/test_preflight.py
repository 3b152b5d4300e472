"""`graftlm train` plans before it loads: the predicted peak is logged, and a run that cannot
fit in the machine's memory is refused with the numbers unless --force."""

from __future__ import annotations

import json
import logging

import pytest

from graftlm.errors import GraftError
from graftlm.plan import preflight as preflight_module
from graftlm.train.config import TrainConfig
from graftlm.train.loop import train


def _run(tmp_path, model_dir, **kw):
    data = tmp_path / "rows.jsonl"
    with data.open("w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "out"), model=str(model_dir), steps=1, batch_size=2,
        seq_len=32, rank=2, **kw,
    )  # fmt: skip
    return train(cfg, progress=False)


def test_train_logs_the_predicted_peak(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="graftlm"):
        _run(tmp_path, tiny_model_dir)
    assert any("plan: predicted peak" in r.getMessage() for r in caplog.records)


def test_a_run_that_cannot_fit_is_refused_unless_forced(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(preflight_module, "machine_memory", lambda device: 10**6)
    with pytest.raises(GraftError, match=r"needs ~.* GB at its peak .* has 0\.0 GB .*--force"):
        _run(tmp_path, tiny_model_dir)
    # refused before training: nothing of a run in the folder (it may hold the run's lock)
    assert not list((tmp_path / "out").glob("*.json*"))
    result = _run(tmp_path, tiny_model_dir, force=True)
    assert result.steps == 1


def test_machine_memory_is_the_ram():
    import torch

    assert preflight_module.machine_memory(torch.device("cpu")) > 10**8


def test_targets_that_name_some_blocks_are_planned(tmp_path, tiny_model_dir):
    # the planner's proxy models have one and two blocks: a regex naming block 1 alone matches
    # nothing in the first, and planned as every linear layer instead of failing the run
    result = _run(tmp_path, tiny_model_dir, targets=r"(.*\.)?layers\.1\..*_proj")
    assert result.steps == 1
    adapted = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapted["target_modules"] == r"(.*\.)?layers\.1\..*_proj"


def test_targets_that_name_no_block_of_the_model_stay_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(GraftError, match=r"matched no layer"):
        _run(tmp_path, tiny_model_dir, targets=r"(.*\.)?layers\.7\..*_proj")
