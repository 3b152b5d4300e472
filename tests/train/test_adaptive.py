"""The adaptive length of a run (no --epochs/--steps): a validation split of distinct prompts,
exact match or answer loss, early stop that keeps the best adapter, resume, time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_cfg, write_chat
from safetensors.torch import load_file

from graftlm.data.dataset import IGNORE_INDEX, Example
from graftlm.train import validation
from graftlm.train.distributed import Runtime
from graftlm.train.loop import train
from graftlm.train.validation import EarlyStop, Score, answer_span, split_validation


def _example(prompt: list[int], answer: list[int]) -> Example:
    return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, "f:1")


def test_answer_span_is_the_last_labelled_run():
    example = Example([1, 2, 3, 4, 5, 6, 7], [-100, 2, -100, -100, 5, 6, -100], "f:1")
    assert answer_span(example) == (4, 6)


def test_validation_holds_out_whole_prompts():
    # 60 distinct prompts, each twice with other answers: a prompt is never on both sides
    examples = [_example([p, p + 1], [a]) for p in range(60) for a in (7, 8)]
    train_part, held = split_validation(examples, seed=0)
    assert held and len(train_part) + len(held) == len(examples)
    train_prompts = {tuple(e.input_ids[:2]) for e in train_part}
    assert not train_prompts & {tuple(e.input_ids[:2]) for e in held}
    assert split_validation(examples, seed=0) == (train_part, held)  # a seed fixes it
    assert split_validation(examples[:40], seed=0)[1] == []  # 20 prompts: too few to hold out


def test_early_stop_keeps_the_best_and_stops_after_patience():
    weight = torch.nn.Parameter(torch.zeros(3))
    early = EarlyStop({"w": weight}, patience=2, exact_match=True)
    with torch.no_grad():
        weight.fill_(1.0)
    assert not early.update(Score(0.5, 1.0), step=10)
    with torch.no_grad():
        weight.fill_(2.0)
    # same exact match at a loss under 3% lower: kept as the best, but no progress
    assert not early.update(Score(0.5, 0.98), step=20)
    assert early.evals_since_best == 1
    with torch.no_grad():
        weight.fill_(3.0)
    assert early.update(Score(0.4, 0.1), step=30)  # lower loss, fewer right: worse; patience spent
    early.restore_best()
    assert early.best_step == 20 and torch.equal(weight.detach(), torch.full((3,), 2.0))
    again = EarlyStop({"w": weight}, patience=2, exact_match=True)
    again.load_state_dict(early.state_dict())
    assert (again.best_step, again.evals_since_best, again.best) == (20, 2, Score(0.5, 0.98))


def test_learning_rate_warms_up_holds_and_decays_to_zero_in_the_cooldown():
    early = EarlyStop({}, patience=2, warmup=3)
    assert [round(early.lr_factor(s), 2) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    early.begin_cooldown(10, 4, "plateau")
    early.begin_cooldown(12, 9, "later")  # the first cool-down stands
    factors = [early.lr_factor(s) for s in range(9, 15)]
    assert factors[:2] == [1.0, 0.8] and factors[4] == pytest.approx(0.2) and factors[5] == 0.0
    assert not early.cooldown_done(13) and early.cooldown_done(14) and early.reason == "plateau"


def test_a_perfect_exact_match_waits_on_the_loss_and_loss_runs_wait_on_the_loss():
    weight = torch.nn.Parameter(torch.zeros(1))
    perfect = EarlyStop({"w": weight}, patience=2, exact_match=True)
    assert not perfect.update(Score(1.0, 0.3), 4)  # perfect on training's phrasings: not the end
    assert not perfect.update(Score(1.0, 0.2), 8)  # the answer loss still falls: progress
    assert perfect.evals_since_best == 0 and perfect.best_step == 8
    assert not perfect.update(Score(1.0, 0.199), 12)  # kept as the best, but no progress
    assert perfect.best_step == 12 and perfect.evals_since_best == 1
    assert perfect.update(Score(1.0, 0.25), 16)  # patience spent
    by_loss = EarlyStop({"w": weight}, patience=2)
    assert not by_loss.update(Score(None, 1.0), 1)
    assert not by_loss.update(Score(None, 0.9), 2)  # a lower loss is progress here
    assert not by_loss.update(Score(None, 0.95), 3)
    assert by_loss.update(Score(None, 0.92), 4)
    assert by_loss.best_step == 2


def test_adaptive_run_stops_on_validation_and_saves_the_best_adapter(
    tmp_path, tiny_model_dir, monkeypatch
):
    snapshots = {}
    real_update = EarlyStop.update

    def recording_update(self, score, step):
        snapshots[step] = {n: p.detach().clone() for n, p in self.params.items()}
        return real_update(self, score, step)

    monkeypatch.setattr(EarlyStop, "update", recording_update)
    # validation scores scripted, so that the best evaluation is neither the first nor the last;
    # none ties the best, since a tie counts as progress or not by the real answer loss (the
    # tests above), which the machine moves: with 0.5 twice, the answer loss of the tied
    # evaluation fell 5% on an AVX-512 CPU (progress), and not by 3% on an AVX2 one (none)
    scripted = iter([0.25, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25])
    monkeypatch.setattr(validation.GreedyAnswers, "exact_match", lambda *args: next(scripted))
    data = write_chat(tmp_path / "rows.jsonl", 120)
    cfg = base_cfg(
        tmp_path, tiny_model_dir, data=str(data), steps=None, max_epochs=40.0, patience=2,
        lr=5e-2, warmup_ratio=0.005,
    )  # fmt: skip
    assert cfg.adaptive
    result = train(cfg, progress=False)
    out = Path(cfg.out)
    graft = json.loads((out / "graftlm.json").read_text())
    record = graft["training"]["validation"]
    assert record["metric"] == "exact_match"
    assert "did not improve" in record["stopped"]
    assert result.steps < 40 * 120 // 8  # it stopped well before its longest length
    assert graft["training"]["steps"] == result.steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert all("exact_match" in r for r in evals) and len(evals) >= 3
    best = snapshots[record["best_step"]]
    saved = load_file(str(out / "adapter_model.safetensors"))
    # the saved adapter is the one of the best evaluation, not the last step's
    assert len(saved) == len(best)
    for name, tensor in best.items():
        key = "base_model.model." + name.replace(".default", "")  # PEFT's names in the file
        assert torch.equal(saved[key], tensor), name
    # patience spent at the 4th evaluation; the learning rate then decays to zero and a last
    # evaluation ends the run
    assert len(evals) == 5 and record["best_step"] == evals[1]["step"]
    assert "learning rate decayed" in record["stopped"]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.25 * max(lrs) and max(lrs) == pytest.approx(5e-2)
    assert record["best_step"] < result.steps


class _ScriptedModel(torch.nn.Module):
    """Stands in for the network only: its greedy continuation of each prompt is scripted, so
    the scorer's batching, left padding, stop tokens and comparison can be checked exactly."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):
        self.calls.append(eos_token_id)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            assert all(m == 0 for m in mask[: len(mask) - len(prompt)])  # left padding
            rows.append(ids + self.continuations[prompt][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [0] * (width - len(row)) for row in rows])


def test_greedy_exact_match_scores_the_generated_answers(tiny_model_dir):
    from graftlm.models.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    end = tokenizer.eos_token_id
    yes, no = tokenizer("yes")["input_ids"], tokenizer("no")["input_ids"]
    examples = [
        _example([1, 5, 9], yes + [end]),
        _example([1, 7], no + [end]),
        _example([1, 8, 8, 8], yes + [end]),
    ]
    model = _ScriptedModel({(1, 5, 9): yes + [end], (1, 7): yes + [end], (1, 8, 8, 8): yes + [end]})
    pad = tokenizer.pad_token_id
    assert validation.greedy_exact_match(model, tokenizer, examples, pad, torch.float32) == 2 / 3
    assert all(end in stop for stop in model.calls)  # the answers' closing token stops decoding
    assert model.training  # left as it was found


class _OneHotHead(torch.nn.Module):
    """A model whose head reads a token id off a one-hot hidden state: the hidden states
    passed to `GreedyAnswers` say exactly which token is the argmax at each position."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        self.head.weight.data = torch.eye(vocab)

    def get_output_embeddings(self):
        return self.head


def test_greedy_answers_read_the_argmax_at_each_answer_position():
    vocab, stop_a, stop_b = 12, 10, 11
    examples = [
        _example([1, 2, 3], [4, 5, stop_a]),  # right: each answer token is the argmax before it
        _example([1, 2], [6, stop_a]),  # right: another stop token ends it (any stop ends greedy)
        _example([1, 2, 3, 4], [7, 8, stop_a]),  # wrong: 8 is not the argmax after 7
        _example([1, 2], [9, 9]),  # no stop at its end (cut by --seq-len): a miss
    ]
    predicted = [  # the argmax after each position (shifted: position t predicts token t + 1)
        [2, 3, 4, 5, stop_a, 0],
        [2, 6, stop_b, 0, 0, 0],
        [2, 3, 4, 7, 3, stop_a],
        [2, 9, 9, 0, 0, 0],
    ]
    hidden = torch.nn.functional.one_hot(torch.tensor(predicted), vocab).float()
    answers = validation.GreedyAnswers(_OneHotHead(vocab), examples, [stop_a, stop_b])
    answers(hidden[:2], [0, 1])  # two passes, as the evaluation's batches
    answers(hidden[2:], [2, 3])
    assert answers.right == {0: True, 1: True, 2: False, 3: False}
    assert answers.exact_match(Runtime.single()) == 0.5


def test_paragraph_answers_are_scored_by_loss(tiny_model_dir):
    from graftlm.models.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    short = [_example([5, 6], tokenizer("label_a")["input_ids"]) for _ in range(3)]
    text = "The parcel left on Monday. It should arrive on Friday. Thank you for waiting."
    long = [_example([5, 6], tokenizer(text)["input_ids"]) for _ in range(3)]
    assert validation.scores_by_exact_match(short, tokenizer)
    assert not validation.scores_by_exact_match(long, tokenizer)


def test_time_budget_stops_the_run(tmp_path, tiny_model_dir):
    data = write_chat(tmp_path / "rows.jsonl", 120)
    cfg = base_cfg(
        tmp_path, tiny_model_dir, data=str(data), steps=None, max_epochs=40.0, time_budget=1e-3
    )
    result = train(cfg, progress=False)
    graft = json.loads((Path(cfg.out) / "graftlm.json").read_text())
    assert result.steps == 1
    assert "time budget" in graft["training"]["validation"]["stopped"]


def test_fixed_epochs_or_steps_are_not_adaptive(tmp_path, tiny_model_dir):
    assert not base_cfg(tmp_path, tiny_model_dir).adaptive  # steps=6
    assert not base_cfg(tmp_path, tiny_model_dir, steps=None, epochs=1.0).adaptive


@pytest.mark.parametrize("value", [0, -3, 1.5])
def test_bad_patience_is_a_named_error(tmp_path, tiny_model_dir, value):
    from graftlm.errors import GraftError

    with pytest.raises(GraftError, match="patience"):
        base_cfg(tmp_path, tiny_model_dir, patience=value)


def test_adalora_starting_rank_follows_a_larger_target_rank():
    """`graftlm sweep --methods adalora --ranks 16,32` once failed: the default init_rank 12 was
    below the target rank. An unset init_rank now starts at 1.5x a target above 8."""
    from graftlm.train.config import TrainConfig

    def resolved(**kw):
        return TrainConfig(data="d.jsonl", out="o", method="adalora", **kw).with_method_defaults()

    assert resolved().init_rank == 12 and resolved().rank == 8
    assert resolved(rank=16).init_rank == 24
    assert resolved(rank=32).init_rank == 48
    assert resolved(rank=16, init_rank=20).init_rank == 20  # given: kept (and checked at attach)
    assert TrainConfig(data="d", out="o", rank=32).with_method_defaults().init_rank is None
