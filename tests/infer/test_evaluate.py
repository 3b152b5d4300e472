"""`graftlm eval`: teacher-forced answer loss, perplexity, exact match, JSON output."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from graftlm.cli.parser import main as cli_main
from graftlm.data.dataset import IGNORE_INDEX, Example
from graftlm.infer.evaluate import final_answer_only


def test_final_answer_only_keeps_the_last_labelled_span():
    labels = [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    kept = final_answer_only(Example(list(range(8)), labels, "x:1")).labels
    assert kept == [IGNORE_INDEX] * 5 + [7, 8, IGNORE_INDEX]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_loss_matches_a_direct_computation(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "one"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "two"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "colour?"},
                {"role": "assistant", "content": "red"},
            ]
        },
    ]
    data = _write_rows(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "result.json"
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--output",
                str(out),
                "--generate",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["rows"] == 2 and result["scored_rows"] == 2
    assert 0.0 <= result["exact_match"] <= 1.0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)

    # the same number by hand: CE over the final answer's content + <|im_end|>, nothing else
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    total, count = 0.0, 0
    for row in rows:
        msgs = row["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        answer = msgs[-1]["content"] + "<|im_end|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p_ids) - 1 : -1]
        total += F.cross_entropy(logits, torch.tensor(a_ids), reduction="sum").item()
        count += len(a_ids)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)


def test_eval_cli_errors(tmp_path, tiny_model_dir, capsys):
    assert (
        cli_main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")])
        == 2
    )
    assert "none.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("intent=set_alarm; time=13:50; day=today", "intent=set_alarm; time=13:50; day=today", 1.0),
        (
            "intent=set_alarm; time=13:30; day=today",
            "intent=set_alarm; time=13:50; day=today",
            2 / 3,
        ),
        ("day=today;intent=set_alarm", "intent=set_alarm; time=13:50; day=today", 2 / 3),
        ('{"a": 1, "b": "x", "c": [1]}', '{"b": "x", "a": 1, "c": [1]}', 1.0),
        ('{"a": 2, "b": "x"}', '{"a": 1, "b": "x"}', 0.5),
        ('{"a": 1', '{"a": 1}', 0.0),
        ("negative, battery", "negative, battery", 1.0),
        ("negative, screen", "negative, battery", 0.5),
        ("billing", "billing", 1.0),
        ("sales", "billing", 0.0),
        ("", "billing", 0.0),
    ],
)
def test_field_accuracy(prediction, reference, expected):
    from graftlm.infer.answer_fields import field_accuracy

    assert field_accuracy(prediction, reference) == pytest.approx(expected)
