"""Validation's exact match read off the teacher-forced pass (`GreedyAnswers`) gives what
greedy generation gives, on the built-in model: references that are its own greedy answers
count, references with one token changed do not, and both scorers say so row for row."""

from __future__ import annotations

import pytest
import torch

from graftlm.data.dataset import IGNORE_INDEX, Example, tokenize_rows
from graftlm.train.adaptive import pad_token_id
from graftlm.train.distributed import Runtime
from graftlm.train.forward import evaluate
from graftlm.train.validation import (
    GreedyAnswers,
    answer_span,
    answer_stop_ids,
    greedy_rows_right,
)

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Answer with one word: what colour is grass?",
    "Reply with a number only: 7 + 5 =",
    "Give the capital of France, one word.",
    "Say yes or no: is ice cold?",
    "Name one fruit that is yellow. One word.",
    "Write the word 'hello' in capital letters and nothing else.",
]


def _greedy_references(model, tokenizer) -> list[Example]:
    """Each question with the model's own greedy answer as its reference (stop token
    included where it stopped within 24 tokens)."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
        for q in QUESTIONS
    ]
    templated, _ = tokenize_rows(rows, "chat", tokenizer, 256)
    stops = answer_stop_ids(model, tokenizer, templated)
    examples = []
    for example in templated:
        prompt = example.input_ids[: answer_span(example)[0]]
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                eos_token_id=stops, pad_token_id=pad_token_id(tokenizer),
            )  # fmt: skip
        answer = out[0, len(prompt) :].tolist()
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, "q"))
    return examples


def _rows_right(model, tokenizer, examples) -> tuple[list[bool], list[bool]]:
    """Each row right or not: by greedy generation, and read off the loss pass."""
    pad = pad_token_id(tokenizer)
    generated = greedy_rows_right(model, tokenizer, examples, pad, torch.float32)
    answers = GreedyAnswers(model, examples, answer_stop_ids(model, tokenizer, examples))
    evaluate(model, examples, pad, torch.float32, Runtime.single(), per_batch=answers)
    assert answers.exact_match(Runtime.single()) == sum(answers.right.values()) / len(examples)
    return generated, [answers.right[i] for i in range(len(examples))]


def test_exact_match_from_the_loss_pass_equals_greedy_generation(smollm2_copy):
    model, tokenizer = smollm2_copy
    model.float().eval()
    examples = _greedy_references(model, tokenizer)
    stops = set(answer_stop_ids(model, tokenizer, examples))
    stopped = [e.input_ids[-1] in stops for e in examples]
    assert sum(stopped) >= 4  # the instruct model ends most of these short answers itself
    # every reference is the model's own greedy answer: right by both scorers where it stopped
    assert _rows_right(model, tokenizer, examples) == (stopped, stopped)
    # one token changed in the answers of rows 0, 2, 4 (the first answer token in row 0)
    changed = []
    for i, example in enumerate(examples):
        ids, labels = list(example.input_ids), list(example.labels)
        if i % 2 == 0:
            start, end = answer_span(example)
            at = start if i == 0 else (start + end) // 2 - 1
            ids[at] = labels[at] = ids[at] + 1
        changed.append(Example(ids, labels, "q"))
    expected = [s and i % 2 == 1 for i, s in enumerate(stopped)]
    assert _rows_right(model, tokenizer, changed) == (expected, expected)
