"""`graftlm eval`: teacher-forced loss on the answers, perplexity, and optional exact match.

The loss is the mean over answer tokens: each row's final assistant turn (its content and
end-of-turn token), or the completion / output for prompt-completion and Alpaca rows, or every
token of a text row. With `generate=True`, each row's prompt is also completed greedily and
compared with its reference answer: exact match after stripping surrounding whitespace, and
field accuracy (partial credit per field of a structured answer, `graftlm.infer.answer_fields`).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from graftlm.data.dataset import (
    IGNORE_INDEX,
    Example,
    load_dataset,
    prompt_for_generation,
    read_rows,
    reference_answer,
)
from graftlm.errors import GraftError
from graftlm.infer.answer_fields import field_accuracy
from graftlm.infer.generate import SamplingConfig
from graftlm.infer.generate import generate as run_generate
from graftlm.train.distributed import Runtime
from graftlm.train.forward import evaluate


def final_answer_only(example: Example) -> Example:
    """Keep the labels of the last labelled span (the final assistant turn) only."""
    labels = list(example.labels)
    end = max((i for i, y in enumerate(labels) if y != IGNORE_INDEX), default=-1)
    if end < 0:
        return example
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return replace(
        example, labels=[y if start <= i <= end else IGNORE_INDEX for i, y in enumerate(labels)]
    )


def evaluate_file(
    model: torch.nn.Module,
    tokenizer,
    path: str,
    *,
    seq_len: int = 2048,
    compute_dtype: torch.dtype = torch.float32,
    generate: bool = False,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Score `model` (with its active adapter) on a data file.

    Returns:
        `{"loss", "perplexity", "tokens", "rows", "seconds"}`, plus `"exact_match"`,
        `"field_accuracy"` and `"scored_rows"` with `generate`.

    Raises:
        GraftError: bad rows (named by file:line), or no answer tokens at all.
    """
    start = time.perf_counter()
    examples, _ = load_dataset(path, tokenizer, seq_len)
    examples = [final_answer_only(e) for e in examples]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    loss, tokens = evaluate(
        model, examples, pad_id, compute_dtype, Runtime.single(), share_prefix=False
    )
    if tokens == 0:
        raise GraftError(f"{path}: no answer tokens to score")
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "rows": len(examples),
    }
    if generate:
        rows, _ = read_rows(path)
        refs = [reference_answer(row) for row in rows]
        scored = [(row, ref) for row, ref in zip(rows, refs) if ref is not None]
        prompts = [prompt_for_generation(row, tokenizer) for row, _ in scored]
        outputs = run_generate(
            model,
            tokenizer,
            prompts,
            sampling=SamplingConfig(max_new_tokens=max_new_tokens),
            batch_size=batch_size,
        )
        correct = sum(out.strip() == ref.strip() for out, (_, ref) in zip(outputs, scored))
        result["exact_match"] = correct / max(len(scored), 1)
        result["field_accuracy"] = sum(
            field_accuracy(out, ref) for out, (_, ref) in zip(outputs, scored)
        ) / max(len(scored), 1)
        result["scored_rows"] = len(scored)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
