"""The forgetting meter: how much of the base model's behaviour outside the task an adaptation
kept, measured against the base itself.

Three numbers, on a keep set (default: `graftlm/data/keep/`, shipped with graftlm; or a user's
file in any training row format with answers):

- `kept_exact`: of the keep prompts whose greedy answer (at most 24 new tokens) the base got
  right, the fraction the tuned model still gets right. An answer is right when the row's
  `"check"` regex matches it (`re.search`, the pattern's own flags), or, for a row without one,
  when its reference answer, lower-cased with surrounding punctuation stripped and whitespace
  collapsed, appears in the lower-cased answer as whole words.
- `kl`: the mean over the keep answers' tokens of KL(base || tuned), the two models' next-token
  distributions teacher-forced on the same tokens (prompt + reference answer), in nats.
- `ppl_ratio`: perplexity on a short general text (`general_text.txt`), tuned over base.

An adapter that changes nothing reads 1.0, 0.0 and 1.0. The base runs in the same model with
its adapters disabled; a model whose adapters cannot be disabled (a full fine-tune replaced the
weights) needs the base loaded beside it (`base=`).
"""

from __future__ import annotations

import contextlib
import math
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters.switch import disable_adapters
from graftlm.data.dataset import (
    IGNORE_INDEX,
    Example,
    collate,
    prompt_for_generation,
    read_rows,
    reference_answer,
    tokenize_rows,
)
from graftlm.errors import GraftError
from graftlm.infer.evaluate import final_answer_only
from graftlm.infer.generate import SamplingConfig, adapter_base_model, generate
from graftlm.models.load import BUILTIN_NAME, load_model
from graftlm.train.distributed import Runtime
from graftlm.train.forward import autocast, evaluate

MAX_NEW_TOKENS = 24  # keep answers are short: a fact, a number, a sentence
KL_BATCH = 16


def default_keep_file() -> Path:
    """The keep set shipped with graftlm (234 prompts: facts, arithmetic, instructions,
    safety refusals, chat manners)."""
    return Path(str(resources.files("graftlm.data") / "keep" / "general.jsonl"))


def default_text_file() -> Path:
    """The general text whose perplexity `ppl_ratio` compares."""
    return Path(str(resources.files("graftlm.data") / "keep" / "general_text.txt"))


@dataclass
class KeepSet:
    """Keep prompts ready to score.

    Attributes:
        source: the file they came from.
        prompts: chat-templated generation prompts.
        references: the reference answers.
        checks: per row, a regex that says "right", or None (the reference rule).
        categories: per row, its "category" field ("" where it has none).
        examples: prompt + reference tokenized, labels on the reference only (for `kl`).
        text: the general text's examples (for `ppl_ratio`).
    """

    source: str
    prompts: list[str]
    references: list[str]
    checks: list[str | None]
    categories: list[str]
    examples: list[Example]
    text: list[Example] = field(default_factory=list)


def load_keep(
    tokenizer, path: str | Path | None = None, *, limit: int | None = None, seq_len: int = 512
) -> KeepSet:
    """Read a keep set: `path` (any training row format with answers; an optional `"check"`
    regex per row) or the shipped one; `limit` keeps every k-th row so that about `limit` rows
    remain, categories kept in proportion.

    Raises:
        GraftError: the file's rows are bad (named by file:line), or none carries an answer
            to compare with (naming the file).
    """
    path = Path(path) if path is not None else default_keep_file()
    rows, fmt = read_keep_rows(path)
    if limit is not None and limit < len(rows):
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    for row in rows:
        check = row.get("check")
        if check is not None:
            try:
                re.compile(check)
            except (re.error, TypeError) as exc:
                raise GraftError(f'{row["_where"]}: "check" is not a regex ({exc})') from None
    examples, _ = tokenize_rows(rows, fmt, tokenizer, seq_len)
    paragraphs = [p.strip() for p in default_text_file().read_text("utf-8").split("\n\n")]
    text, _ = tokenize_rows([{"text": p} for p in paragraphs if p], "text", tokenizer, seq_len)
    return KeepSet(
        source=str(path),
        prompts=[prompt_for_generation(r, tokenizer) for r in rows],
        references=[reference_answer(r) for r in rows],
        checks=[r.get("check") for r in rows],
        categories=[str(r.get("category", "")) for r in rows],
        examples=[final_answer_only(e) for e in examples],
        text=text,
    )


def read_keep_rows(path: str | Path) -> tuple[list[dict], str]:
    """The rows of a keep file that carry a reference answer, and the file's row format.

    Raises:
        GraftError: bad rows (named by file:line), or none with an answer (naming the file).
    """
    rows, fmt = read_rows(path)
    rows = [r for r in rows if (reference_answer(r) or "").strip()]
    if not rows:
        raise GraftError(
            f"{path}: no usable keep rows (each needs a prompt and a non-empty reference answer: "
            "chat, prompt/completion or Alpaca rows)"
        )
    return rows, fmt


def is_right(answer: str, reference: str, check: str | None = None) -> bool:
    """Whether a generated `answer` is right (see the module docstring for the rule)."""
    if check is not None:
        return re.search(check, answer) is not None
    wanted = _normalise(reference)
    if not wanted:
        return False
    return re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", _normalise(answer)) is not None


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def can_disable(model: nn.Module) -> bool:
    """Whether the model's adapters can be switched off to run its base (not a full fine-tune)."""
    try:
        with disable_adapters(model):
            return True
    except GraftError:
        return False


@contextlib.contextmanager
def _base_view(model: nn.Module, base: nn.Module | None) -> Iterator[nn.Module]:
    if base is not None:
        yield base
        return
    with disable_adapters(model):
        yield model


def measure_forgetting(
    model: nn.Module,
    tokenizer,
    keep: KeepSet,
    *,
    base: nn.Module | None = None,
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score `model` (its active adapters) against its base on `keep`.

    Args:
        model: the tuned model.
        tokenizer: its tokenizer.
        keep: from `load_keep`.
        base: the base model, when `model`'s adapters cannot be disabled (`can_disable`).
        compute_dtype: float32 or bfloat16 (both models run in it).
        batch_size: rows per generation pass.

    Returns:
        `{"kept_exact", "kl", "ppl_ratio", "base_right", "tuned_right", "rows", "base_ppl",
        "tuned_ppl", "by_category", "keep", "seconds"}`; `kept_exact` is None when the base
        got no keep prompt right.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    single = Runtime.single()
    with torch.no_grad():
        with _base_view(model, base) as reference:
            base_answers = _generate(
                reference, tokenizer, keep, sampling, batch_size, compute_dtype
            )
            base_loss, _ = evaluate(reference, keep.text, pad_id, compute_dtype, single)
        tuned_answers = _generate(model, tokenizer, keep, sampling, batch_size, compute_dtype)
        tuned_loss, _ = evaluate(model, keep.text, pad_id, compute_dtype, single)
        kl = _mean_kl(model, base, keep.examples, pad_id, compute_dtype)
    model.train(was_training)
    base_ok = [is_right(a, r, c) for a, r, c in zip(base_answers, keep.references, keep.checks)]
    tuned_ok = [is_right(a, r, c) for a, r, c in zip(tuned_answers, keep.references, keep.checks)]
    kept = [t for b, t in zip(base_ok, tuned_ok) if b]
    by_category: dict[str, list[bool]] = {}
    for category, b, t in zip(keep.categories, base_ok, tuned_ok):
        if b and category:
            by_category.setdefault(category, []).append(t)
    return {
        "kept_exact": round(sum(kept) / len(kept), 4) if kept else None,
        "kl": round(kl, 6),
        "ppl_ratio": round(math.exp(tuned_loss - base_loss), 4),
        "base_right": sum(base_ok),
        "tuned_right": sum(tuned_ok),
        "rows": len(keep.prompts),
        "base_ppl": round(math.exp(base_loss), 3),
        "tuned_ppl": round(math.exp(tuned_loss), 3),
        "by_category": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_category.items())},
        "keep": keep.source,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _generate(model, tokenizer, keep, sampling, batch_size, compute_dtype) -> list[str]:
    device = next(model.parameters()).device
    with autocast(compute_dtype, device):
        return generate(model, tokenizer, keep.prompts, sampling=sampling, batch_size=batch_size)


def _answer_log_probs(model: nn.Module, batch: dict, compute_dtype) -> torch.Tensor:
    """Log-probabilities `(n, vocab)` of the next token at every labelled position."""
    device = next(model.parameters()).device
    with autocast(compute_dtype, device):
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )[0]
        wanted = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        logits = model.get_output_embeddings()(hidden[:, :-1][wanted])
    return F.log_softmax(logits.float(), dim=-1)


def _mean_kl(model, base, examples: list[Example], pad_id: int, compute_dtype) -> float:
    """Mean KL(base || tuned) over the labelled tokens of `examples`."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), KL_BATCH):
        batch = collate(examples[start : start + KL_BATCH], pad_id)
        with _base_view(model, base) as reference:
            base_logp = _answer_log_probs(reference, batch, compute_dtype)
        tuned_logp = _answer_log_probs(model, batch, compute_dtype)
        total += float((base_logp.exp() * (base_logp - tuned_logp)).sum())
        tokens += base_logp.shape[0]
    return max(total / max(tokens, 1), 0.0)


def forgetting_of_folder(
    model: nn.Module,
    tokenizer,
    folder: str | Path,
    *,
    model_name: str | None = None,
    keep: str | Path | None = None,
    limit: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """`measure_forgetting` of the adapter folder loaded into `model` (`graftlm eval
    --forgetting`); a full fine-tune's base (`model_name`, else the one its folder names) is
    loaded beside it.

    Raises:
        GraftError: as `load_keep`; the base cannot be found.
    """
    keep_set = load_keep(tokenizer, keep, limit=limit)
    base = None
    if not can_disable(model):
        name = model_name or adapter_base_model(folder) or BUILTIN_NAME
        base, _ = load_model(name, dtype=compute_dtype)
    return measure_forgetting(model, tokenizer, keep_set, base=base, compute_dtype=compute_dtype)


def forgetting_after_training(
    model: nn.Module, tokenizer, cfg, compute_dtype: torch.dtype
) -> dict[str, Any]:
    """The meter at the end of `graftlm train` (`cfg.forgetting`): the trained model against
    its base (`cfg.model`, loaded beside it for a full fine-tune), on `cfg.keep` (default:
    graftlm's keep set), about `cfg.keep_limit` rows of it."""
    keep_set = load_keep(tokenizer, cfg.keep, limit=cfg.keep_limit or None)
    base = None
    if not can_disable(model):
        base, _ = load_model(cfg.model, dtype=compute_dtype)
        base.to(next(model.parameters()).device)
    return measure_forgetting(model, tokenizer, keep_set, base=base, compute_dtype=compute_dtype)


def format_forgetting(result: dict[str, Any]) -> str:
    """One line for logs: kept_exact, kl, ppl_ratio and how many rows the base got right."""
    kept = result["kept_exact"]
    return (
        f"kept_exact {'n/a' if kept is None else f'{kept:.3f}'} (of {result['base_right']} "
        f"keep prompts the base got right), kl {result['kl']:.4f}, ppl_ratio "
        f"{result['ppl_ratio']:.3f} ({result['seconds']:.0f} s)"
    )
