"""`--validation-split phrasings`: validation holds every row with one of a few rare word pairs of
the prompt, so no training prompt holds that wording."""

from __future__ import annotations

import json
import random

import pytest
from helpers import base_cfg

from graftlm.data.dataset import IGNORE_INDEX, Example
from graftlm.errors import GraftError
from graftlm.models.load import load_tokenizer
from graftlm.train.distributed import Runtime
from graftlm.train.loop import read_examples
from graftlm.train.phrasing_split import held_out_phrasings, word_pairs
from graftlm.train.validation import split_validation

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]


def _templated_texts(templates: int = 40, each: int = 10, seed: int = 0) -> list[str]:
    """`templates` x `each` prompts: a frame of two words of its own per template, a name and
    a number that vary (so that a template's pairs are in ~`each` rows, 2.5% of them)."""
    rng = random.Random(seed)
    texts = []
    for t in range(templates):
        for _ in range(each):
            name, amount = rng.choice(NAMES), rng.randint(1, 999)
            word = "".join(chr(ord("a") + int(d)) for d in str(t))  # 12 -> "bc"
            texts.append(
                f"hello team, {name} here. wording{word} phrase{word} about {amount} items"
            )
    rng.shuffle(texts)
    return texts


def _fully_held_pairs(texts: list[str], held: set[int]) -> set:
    """The word pairs whose every holder is in `held`: wording training never sees."""
    holders: dict = {}
    for i, text in enumerate(texts):
        for pair in word_pairs(text):
            holders.setdefault(pair, set()).add(i)
    return {pair for pair, rows in holders.items() if rows <= held}


def test_word_pairs_ignore_case_and_amounts():
    assert (
        word_pairs("Send 3 Boxes")
        == word_pairs("send 12 boxes")
        == {
            ("send", "0"),
            ("0", "boxes"),
        }
    )


def test_every_held_row_holds_wording_that_training_never_sees():
    texts = _templated_texts()
    held = held_out_phrasings(texts, rows=30, seed=1)
    assert 30 <= len(held) <= 1.25 * 30
    unseen = _fully_held_pairs(texts, set(held))
    # whole templates are held: each held row has a pair of its template that no training row has
    assert all(word_pairs(texts[i]) & unseen for i in held)
    assert any(a.startswith("wording") for a, _ in unseen)
    assert held_out_phrasings(texts, rows=30, seed=1) == held  # the seed fixes it
    assert held_out_phrasings(texts, rows=30, seed=2) != held


def test_prompts_that_share_no_wording_leave_the_choice_to_chance():
    texts = [f"w{i}a w{i}b w{i}c" for i in range(200)]  # every pair in one row only
    assert held_out_phrasings(texts, rows=20, seed=0) == []


def _example(ids: list[int], answer: int) -> Example:
    return Example(ids + [answer], [IGNORE_INDEX] * len(ids) + [answer], "f:1")


def test_split_holds_out_the_phrasings_then_fills_up_at_random():
    texts = _templated_texts()
    examples = [_example([i, i + 1], 7) for i in range(len(texts))]  # distinct prompts
    train_part, held = split_validation(examples, seed=1, prompt_texts=texts)
    phrasing_rows = set(held_out_phrasings(texts, rows=40, seed=1))  # 10% of 400 prompts
    held_rows = {e.input_ids[0] for e in held}
    assert phrasing_rows <= held_rows and len(held) >= 40
    assert len(train_part) + len(held) == len(examples)
    # no phrasing of its own: the random split, unchanged
    plain = [f"w{i}a w{i}b" for i in range(len(texts))]
    assert split_validation(examples, seed=1, prompt_texts=plain) == split_validation(
        examples, seed=1
    )


def test_training_reads_a_phrasing_split_and_refuses_an_unknown_one(tmp_path, tiny_model_dir):
    texts = _templated_texts(templates=20, each=10)
    data = tmp_path / "rows.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for text in texts:
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    cfg = base_cfg(
        tmp_path, tiny_model_dir, data=str(data), steps=None, validation_split="phrasings"
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    train_part, held = read_examples(cfg, tokenizer, Runtime.single())
    held_text = {tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in held}
    train_text = [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in train_part]
    # some template of the held rows never occurs in training
    held_templates = {t.split("wording")[1].split()[0] for t in held_text}
    train_templates = {t.split("wording")[1].split()[0] for t in train_text}
    assert held_templates - train_templates
    with pytest.raises(GraftError, match="validation_split"):
        base_cfg(tmp_path, tiny_model_dir, validation_split="templates")


def test_a_resumed_run_keeps_its_validation_split(tmp_path, tiny_model_dir):
    from graftlm.train import checkpoint

    cfg = base_cfg(tmp_path, tiny_model_dir, steps=None, validation_split="phrasings")
    saved = {k: getattr(cfg, k) for k in checkpoint._MUST_MATCH}
    checkpoint.check_settings({"meta": {"settings": saved}, "folder": "ck"}, cfg)
    with pytest.raises(GraftError, match="validation_split: checkpoint 'random', now 'phrasings'"):
        older = {k: v for k, v in saved.items() if k != "validation_split"}  # before the setting
        checkpoint.check_settings({"meta": {"settings": older}, "folder": "ck"}, cfg)
    older_default = base_cfg(tmp_path, tiny_model_dir, steps=None)
    checkpoint.check_settings({"meta": {"settings": older}, "folder": "ck"}, older_default)
