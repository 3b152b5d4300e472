"""`graftlm compare` on a tiny model: one row per method with every column; bad input."""

from __future__ import annotations

import json
import re

import pytest
from helpers import write_chat

from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.train.compare import CompareConfig, MethodSpec, check_inputs


def test_compare_full_and_lora_writes_a_row_per_method(tmp_path, tiny_model_dir):
    data = write_chat(tmp_path / "train.jsonl", 24)
    test = write_chat(tmp_path / "test.jsonl", 4, seed=1)
    keep = tmp_path / "keep.jsonl"
    keep.write_text(
        "".join(
            json.dumps({"prompt": f"item {i} is red", "completion": "red"}) + "\n" for i in range(4)
        )
    )
    out = tmp_path / "cmp"
    args = [
        "compare", "--data", str(data), "--test", str(test), "--out", str(out),
        "--methods", "full,lora:4", "--model", str(tiny_model_dir), "--keep", str(keep),
        "--max-new-tokens", "4",
        "--", "--steps", "2", "--batch-size", "8", "--dtype", "float32", "--keep-limit", "0",
    ]  # fmt: skip
    assert cli_main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "lora-r4"]
    full, lora = rows
    for row in rows:
        for key in (
            "trainable_parameters", "trainable_percent", "peak_rss_bytes",
            "optimizer_state_bytes", "train_seconds", "storage_bytes", "exact_match", "kl",
            "ppl_ratio", "seconds_per_step",
        ):  # fmt: skip
            assert row[key] is not None, (row["method"], key)
    assert full["trainable_percent"] == 100.0 and 0 < lora["trainable_percent"] < 100.0
    # AdamW keeps two float32 moments per trainable value, and a 4-byte step count per tensor
    for row in rows:
        moments = 8 * row["trainable_parameters"]
        assert moments <= row["optimizer_state_bytes"] <= moments + 4096
    assert full["storage_bytes"] > lora["storage_bytes"]
    for row in rows:
        assert row["steps"] == 2
        assert row["seconds_per_step"] == round(row["train_seconds"] / 2, 3)
    assert (out / "compare.png").stat().st_size > 0
    table = (out / "compare.md").read_text()
    assert "| full |" in table and "| lora-r4 |" in table


def test_compare_refuses_bad_input_naming_the_file(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 4)
    other = tmp_path / "test.jsonl"
    other.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    cfg = CompareConfig(str(data), str(other), str(tmp_path / "o"), [MethodSpec("lora")])
    with pytest.raises(GraftError, match=re.escape(f"--test {other}") + ".*prompt_completion"):
        check_inputs(cfg)
    keep = tmp_path / "keep.jsonl"
    keep.write_text(json.dumps({"text": "no answer here"}) + "\n")
    cfg = CompareConfig(
        str(data), str(data), str(tmp_path / "o"), [MethodSpec("lora")], keep=str(keep)
    )
    with pytest.raises(GraftError, match=re.escape(str(keep)) + ": no usable keep rows"):
        check_inputs(cfg)
    with pytest.raises(GraftError, match="unknown method 'nope'"):
        MethodSpec.parse("nope")
    assert MethodSpec.parse("lora:16") == MethodSpec("lora", 16)
