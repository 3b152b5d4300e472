"""Training data: read rows, render them through the chat template, label masks, batches.

Labels line up with ``input_ids`` (Hugging Face convention: the model shifts them by one), with -100
where a token carries no loss::

    text    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    labels  -100 ...................................... -100  Hello ! <|im_end|>  -100

Chat rows learn every assistant turn (its content and end-of-turn token); prompt/completion and
Alpaca rows learn the completion/output; text rows learn everything. Row formats live in
`graftlm.data.formats`, file reading in `graftlm.data.readers`, chat templates in
`graftlm.data.chat_template`; the names most callers need are re-exported here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from graftlm.data.chat_template import (
    TemplateProblem,
    end_tokens,
    has_chat_template,
    prompt_for_generation,
    render_chat,
)
from graftlm.data.formats import (
    FORMATS,
    WHERE,
    detect_format,
    reference_answer,
    row_problem,
    to_messages,
    user_text,
)
from graftlm.data.readers import RowErrors, read_rows, read_rows_counted
from graftlm.errors import GraftError

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataStats",
    "Example",
    "collate",
    "detect_format",
    "length_grouped_batches",
    "load_dataset",
    "prompt_for_generation",
    "read_rows",
    "reference_answer",
    "row_problem",
    "split_eval",
    "tokenize_rows",
]

logger = logging.getLogger("graftlm")

IGNORE_INDEX = -100
# Micro-batches per length-sorted bucket: long enough to group lengths, short enough to mix.
_BUCKET_BATCHES = 50
_TOKENIZE_CHUNK = 1000  # rows tokenized per call: the Rust tokenizer batches, memory stays bounded
MAX_SHOWN = 5  # dropped rows named in the warning


@dataclass(frozen=True)
class Example:
    """One training sequence.

    Attributes:
        input_ids: token ids, ``(seq,)``.
        labels: same length; the token id where it carries loss, -100 elsewhere.
        source: ``"file:line"`` of the row it came from, for messages.
    """

    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class DataStats:
    """What tokenization made of a dataset."""

    format: str
    rows: int  # valid rows tokenized
    examples: int  # examples kept
    tokens: int  # after truncation
    labelled_tokens: int
    truncated: int  # rows cut to seq_len
    dropped: int  # rows with nothing left to learn after truncation
    seq_len: int
    skipped: int = 0  # bad rows skipped (skip_bad_rows)

    def summary(self) -> str:
        """One log line, e.g. ``data: 512 rows, format chat, 41,203 tokens (9,877 labelled), 3
        truncated to 512``."""
        line = (
            f"data: {self.rows:,} rows, format {self.format}, {self.tokens:,} tokens "
            f"({self.labelled_tokens:,} labelled), {self.truncated:,} truncated to {self.seq_len}"
        )
        if self.dropped:
            line += f", {self.dropped:,} dropped (no labelled token left)"
        if self.skipped:
            line += f", {self.skipped:,} bad rows skipped"
        return line


# ---------------------------------------------------------------------------------------------
# Rendering and labelling


def _label(
    offsets: Sequence[tuple[int, int]], ids: list[int], spans: list[tuple[int, int]]
) -> list[int]:
    """Label each token whose characters overlap a span (a token straddling a span edge holds
    part of the answer, so it is learned)."""
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for j, (s, e) in enumerate(offsets):
        if s >= e:  # tokens the tokenizer added itself (e.g. BOS) have empty offsets
            continue
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and spans[k][0] < e:
            labels[j] = ids[j]
    return labels


def tokenize_rows(
    rows: Sequence[dict],
    fmt: str,
    tokenizer: Any,
    seq_len: int,
    *,
    skip_bad_rows: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize valid rows of one format into examples with label masks.

    Chat rows, and prompt/completion or Alpaca rows when the tokenizer has a chat template, are
    rendered through the template (tokenized with ``add_special_tokens=False``, as the template
    already holds them). Without a template, prompt/completion rows become ``prompt + completion +
    eos``; text rows are ``text + eos``. Rows longer than ``seq_len`` keep their first ``seq_len``
    tokens; a row left with no labelled token is dropped with a warning.

    Args:
        rows: rows as `read_rows` returns them (``"_where"`` keys name them in messages).
        fmt: their format, one of `FORMATS`.
        tokenizer: a fast Hugging Face tokenizer (offsets are needed to place labels).
        seq_len: maximum tokens per example.
        skip_bad_rows: warn about and skip rows the chat template cannot render, instead of raising.

    Returns:
        ``(examples, stats)``.

    Raises:
        GraftError: a row is invalid for ``fmt``, the template cannot render or label a row, chat
            rows meet a tokenizer without a chat template, or the tokenizer is not a fast one.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown row format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    templated = fmt == "chat" or (fmt != "text" and has_chat_template(tokenizer))
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise GraftError("chat rows need a tokenizer with a chat template; this tokenizer has none")
    rendered, errors = _render_rows(rows, fmt, tokenizer, templated)
    errors.finish(skip=skip_bad_rows, total=len(rows))
    examples, truncated, dropped_at = _tokenize(rendered, tokenizer, templated, seq_len)
    if dropped_at:
        shown = ", ".join(dropped_at[:MAX_SHOWN])
        more = f" and {len(dropped_at) - MAX_SHOWN} more" if len(dropped_at) > MAX_SHOWN else ""
        logger.warning(
            "dropped %d rows with no labelled token left after truncation to %d tokens (%s%s); "
            "raise seq_len or shorten them",
            len(dropped_at),
            seq_len,
            shown,
            more,
        )
    stats = DataStats(
        format=fmt,
        rows=len(rendered),
        examples=len(examples),
        tokens=sum(len(e) for e in examples),
        labelled_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples),
        truncated=truncated,
        dropped=len(dropped_at),
        seq_len=seq_len,
        skipped=len(errors),
    )
    return examples, stats


# (where, text, character spans of the answer to learn)
Rendered = tuple[str, str, list[tuple[int, int]]]


def _render_rows(
    rows: Sequence[dict], fmt: str, tokenizer: Any, templated: bool
) -> tuple[list[Rendered], RowErrors]:
    """Each valid row as text with the spans to learn; the bad ones collected, not raised."""
    enders = end_tokens(tokenizer) if templated else []
    first = rows[0].get(WHERE) if rows and isinstance(rows[0], dict) else None
    errors = RowErrors(first.rsplit(":", 1)[0] if first else "data")
    rendered: list[Rendered] = []
    for n, row in enumerate(rows):
        where = row.get(WHERE, f"row {n + 1}") if isinstance(row, dict) else f"row {n + 1}"
        problem = row_problem(row, fmt, require_answer=True)
        if problem:
            errors.add(n, where, problem)
            continue
        try:
            if templated:
                text, spans = render_chat(to_messages(row, fmt), tokenizer, enders)
            elif fmt == "text":
                text, spans = row["text"], [(0, len(row["text"]))]
            else:
                prompt = user_text(row, fmt)
                text = prompt + row["completion" if fmt == "prompt_completion" else "output"]
                spans = [(len(prompt), len(text))]
        except TemplateProblem as err:
            errors.add(n, where, str(err))
            continue
        rendered.append((where, text, spans))
    return rendered, errors


def _tokenize(
    rendered: list[Rendered], tokenizer: Any, templated: bool, seq_len: int
) -> tuple[list[Example], int, list[str]]:
    """Tokens and labels of each rendered row, cut to `seq_len`.

    Returns:
        (examples, rows truncated, where each row dropped for having no labelled token left).
    """
    eos_id = getattr(tokenizer, "eos_token_id", None)
    examples, truncated, dropped_at = [], 0, []
    for c in range(0, len(rendered), _TOKENIZE_CHUNK):
        chunk = rendered[c : c + _TOKENIZE_CHUNK]
        try:
            enc = tokenizer(
                [text for _, text, _ in chunk],
                add_special_tokens=not templated,
                return_offsets_mapping=True,
            )
        except NotImplementedError:
            raise GraftError(
                "tokenizing training data needs a fast tokenizer (offset mappings place the "
                "labels); load it with use_fast=True"
            ) from None
        for (where, _, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            ids = list(ids)
            labels = _label(offsets, ids, spans)
            # Without a template nothing marks the end of the answer: eos teaches the model to stop.
            if not templated and eos_id is not None and ids[-1:] != [eos_id]:
                ids.append(eos_id)
                labels.append(eos_id)
            if len(ids) > seq_len:
                truncated += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            # Position 0's label is never used (labels are shifted by one inside the loss).
            if all(label == IGNORE_INDEX for label in labels[1:]):
                dropped_at.append(where)
                continue
            examples.append(Example(ids, labels, where))
    return examples, truncated, dropped_at


def load_dataset(
    path: str | Path, tokenizer: Any, seq_len: int, *, skip_bad_rows: bool = False
) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize a training file, and log a one-line summary.

    Args:
        path: a ``.jsonl``, ``.csv`` or ``.parquet`` file in one of the row formats.
        tokenizer: a fast Hugging Face tokenizer.
        seq_len: maximum tokens per example; longer rows are truncated.
        skip_bad_rows: skip bad rows with warnings instead of raising.

    Returns:
        ``(examples, stats)``.

    Raises:
        GraftError: as `read_rows` and `tokenize_rows`, or when no example is left.
    """
    rows, fmt, bad = read_rows_counted(path, skip_bad_rows=skip_bad_rows)
    examples, stats = tokenize_rows(rows, fmt, tokenizer, seq_len, skip_bad_rows=skip_bad_rows)
    stats = replace(stats, skipped=stats.skipped + bad)
    logger.info("%s", stats.summary())
    if not examples:
        raise GraftError(f"{path}: no training example left ({stats.summary()})")
    return examples, stats


# ---------------------------------------------------------------------------------------------
# Batching


def length_grouped_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Group example indices into micro-batches of similar length, so little compute goes to padding.

    With ``shuffle``, indices are shuffled (deterministically per ``seed`` and ``epoch``), cut into
    buckets of ``50 * micro_batch_size``, sorted by length inside each bucket and cut into batches;
    the batches are then shuffled, and the one with the most padded tokens goes first so an
    out-of-memory error shows on the first step rather than hours in. Without ``shuffle`` (e.g. for
    evaluation) all indices are sorted by length, longest first.

    Args:
        lengths: token count per example.
        micro_batch_size: most sequences per batch.
        seed, epoch: the shuffle's seed; every rank must pass the same ones (then
            `graftlm.train.distributed.Runtime.shard`).
        shuffle: see above.
        max_tokens: if set, a batch also stays within ``max_tokens`` padded tokens (a longer single
            example still gets its own batch).

    Returns:
        Batches of indices; every index appears exactly once.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size!r}")
    order = list(range(len(lengths)))
    rng = random.Random(f"graftlm:{seed}:{epoch}")  # str seeds are stable across processes
    if shuffle:
        rng.shuffle(order)
    bucket = micro_batch_size * _BUCKET_BATCHES if shuffle else max(len(order), 1)
    batches: list[list[int]] = []
    for b in range(0, len(order), bucket):
        batch: list[int] = []
        for i in sorted(order[b : b + bucket], key=lambda i: lengths[i], reverse=True):
            # Sorted longest first, so batch[0] sets the padded width.
            full = len(batch) == micro_batch_size or (
                max_tokens is not None
                and batch
                and lengths[batch[0]] * (len(batch) + 1) > max_tokens
            )
            if batch and full:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    if shuffle and batches:
        rng.shuffle(batches)
        biggest = max(range(len(batches)), key=lambda k: lengths[batches[k][0]] * len(batches[k]))
        batches.insert(0, batches.pop(biggest))
    return batches


def collate(
    examples: Sequence[Example], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Right-pad examples into one batch.

    Args:
        examples: the micro-batch.
        pad_token_id: id written into padding (masked out; any valid id works).
        pad_to_multiple_of: round the width up to a multiple of this, if set.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) as LongTensors of shape
        ``(batch, width)``.
    """
    # torch only for batches: reading, checking and tokenizing rows load without it
    import torch

    if pad_token_id is None:
        raise ValueError("pad_token_id is None; use the tokenizer's pad or eos token id")
    width = max(len(e) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e)
        input_ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_eval(
    examples: Sequence, *, fraction: float = 0.05, min_rows: int = 200, seed: int = 0
) -> tuple[list, list]:
    """Hold back a random ``fraction`` for evaluation when there are at least ``min_rows`` items.

    Args:
        examples: rows or examples.
        fraction: share held back, in (0, 1).
        min_rows: below this many items there is no evaluation set (it would be too noisy and cost
            too much of the training data).
        seed: which items are held back.

    Returns:
        ``(train, eval)``, each in the original order; ``eval`` is empty below ``min_rows``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    items = list(examples)
    if not items or len(items) < min_rows:
        return items, []
    held = set(
        random.Random(f"graftlm-eval:{seed}").sample(
            range(len(items)), max(1, round(len(items) * fraction))
        )
    )
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [x for i, x in enumerate(items) if i in held]
