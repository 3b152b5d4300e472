"""The forgetting meter on a tiny model: an unchanged adapter keeps everything, a changed one
reads worse; the "right" rule; the shipped keep set; bad keep files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import base_cfg, tiny_llama, tiny_tokenizer

import graftlm
from graftlm.cli.parser import main as cli_main
from graftlm.data.dataset import prompt_for_generation, read_rows
from graftlm.errors import GraftError
from graftlm.infer.forgetting import default_keep_file, is_right, load_keep, measure_forgetting
from graftlm.infer.generate import SamplingConfig, generate
from graftlm.models.load import load_model
from graftlm.train.loop import train


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Llama whose vocabulary is exactly the tiny tokenizer's: every greedy token
    decodes to text (the shared tiny models have 28 ids past the tokenizer's)."""
    path = tmp_path / "tiny-260"
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def own_answers_keep(path: Path, model, tokenizer, n: int = 12) -> Path:
    """A keep file of `n` rows whose "check" is the base's own greedy answer, exactly: the base
    gets all right, and any change of an answer counts as forgotten."""
    prompts = [f"item {i} is red" for i in range(n)]
    rendered = [prompt_for_generation({"prompt": p}, tokenizer) for p in prompts]
    answers = generate(model, tokenizer, rendered, sampling=SamplingConfig(max_new_tokens=24))
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, answer in zip(prompts, answers):
            # a random tiny model mostly repeats "\n": the reference (for kl) must not be blank
            row = {
                "prompt": prompt,
                "completion": answer.strip() or "red",
                "check": rf"\A{re.escape(answer)}\Z",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def test_unchanged_adapter_keeps_everything_and_a_changed_one_does_not(tmp_path, model_dir):
    model, tokenizer = load_model(model_dir)
    keep = load_keep(tokenizer, own_answers_keep(tmp_path / "keep.jsonl", model, tokenizer))
    graftlm.inject(model, graftlm.LoraConfig(rank=4))  # B = 0
    same = measure_forgetting(model, tokenizer, keep)
    assert same["base_right"] == 12
    assert same["kept_exact"] == 1.0 and same["kl"] == 0.0 and same["ppl_ratio"] == 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    changed = measure_forgetting(model, tokenizer, keep)
    assert changed["kl"] > 0.01 and changed["ppl_ratio"] != 1.0
    assert changed["kept_exact"] < 1.0


def test_the_right_rule():
    assert is_right("The capital is Paris.", "Paris.")
    assert is_right("  paris ", "Paris")
    assert not is_right("Parisian food", "Paris")
    assert is_right("I'm sorry, I can't do that", "I'm sorry", r"(?i)sorry")
    rows = [json.loads(line) for line in default_keep_file().read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in rows}
    sum_row = by_prompt["What is 18 - 9?"]
    assert is_right("18 - 9 = 9.", "9", sum_row["check"])
    assert not is_right("18 - 9 = 10", "9", sum_row["check"])


def test_shipped_keep_set_is_large_checked_and_covers_the_categories():
    rows, fmt = read_rows(default_keep_file())
    assert len(rows) >= 200 and fmt == "prompt_completion"
    categories = {r["category"] for r in rows}
    assert categories == {"facts", "arithmetic", "instructions", "safety", "manners"}
    # every reference answer passes its own check: the rule accepts the answer written down
    assert all(is_right(r["completion"], r["completion"], r.get("check")) for r in rows)
    keep = load_keep(tiny_tokenizer(), limit=50)
    assert len(keep.prompts) == 50 and set(keep.categories) == categories
    assert keep.text and all(any(y != -100 for y in e.labels) for e in keep.examples)


def test_keep_file_without_usable_rows_is_an_error_naming_it(tmp_path):
    path = tmp_path / "keep.jsonl"
    path.write_text(json.dumps({"text": "only text, no answer"}) + "\n")
    with pytest.raises(GraftError, match=re.escape(str(path)) + ".*no usable keep rows"):
        load_keep(tiny_tokenizer(), path)


def test_eval_forgetting_from_the_cli_and_at_the_end_of_training(tmp_path, model_dir, capsys):
    model, tokenizer = load_model(model_dir)
    keep = own_answers_keep(tmp_path / "keep.jsonl", model, tokenizer, n=6)
    cfg = base_cfg(tmp_path, model_dir, steps=2, keep=str(keep), forgetting=True)
    train(cfg, progress=False)
    graft = json.loads((Path(cfg.out) / "graftlm.json").read_text())
    assert {"kept_exact", "kl", "ppl_ratio"} <= set(graft["training"]["forgetting"])
    out = tmp_path / "f.json"
    args = ["eval", "--adapter", cfg.out, "--forgetting", "--keep", str(keep), "--output", str(out)]
    assert cli_main(args) == 0
    result = json.loads(out.read_text())
    assert result["kl"] == pytest.approx(graft["training"]["forgetting"]["kl"], rel=1e-3, abs=1e-6)
    assert result["forgetting"]["base_right"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no answer"}) + "\n")
    assert cli_main(["eval", "--adapter", cfg.out, "--forgetting", "--keep", str(bad)]) == 2
    assert "no usable keep rows" in capsys.readouterr().err
