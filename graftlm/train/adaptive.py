"""The adaptive length of a run: what `graftlm train` does when neither `--epochs` nor `--steps`
is given.

The run is planned for the method's `max_epochs` (the learning-rate schedule spans that length),
evaluated on the validation split about three times an epoch, and stopped once the validation
score has not improved for `patience` evaluations, or once `time_budget` seconds are spent. The
adapter saved is the one of the best evaluation, and the run says why it stopped where it did.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graftlm.data.dataset import Example
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.validation import (
    EarlyStop,
    Score,
    greedy_exact_match,
    scores_by_exact_match,
)

EVALS_PER_EPOCH = 3


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def early_stop_for(
    model: nn.Module, cfg: TrainConfig, validation: list[Example], names: dict[int, str],
    tokenizer,
) -> EarlyStop | None:  # fmt: skip
    """The early stop of an adaptive run with a validation split; None for a fixed length."""
    if not cfg.adaptive or not validation:
        return None
    params = {names[id(p)]: p for p in model.parameters() if p.requires_grad}
    early = EarlyStop(params, cfg.patience)
    early.exact_match = scores_by_exact_match(validation, tokenizer)
    return early


def eval_interval(
    cfg: TrainConfig, n_examples: int, total_steps: int, early: EarlyStop | None
) -> int:
    """Steps between evaluations: a few per epoch in an adaptive run, three a run otherwise."""
    if early is None:
        return max(1, total_steps // 3)
    steps_per_epoch = n_examples / cfg.batch_size
    return max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))


def validate(
    early: EarlyStop, row_eval: dict, model: nn.Module, tokenizer, validation: list[Example],
    pad_id: int, compute_dtype: torch.dtype,
) -> str | None:  # fmt: skip
    """Score the validation split after the loss in `row_eval` (adds "exact_match" to the row),
    update the early stop; returns the reason to stop, or None to go on."""
    exact = None
    if early.exact_match:
        exact = greedy_exact_match(model, tokenizer, validation, pad_id, compute_dtype)
        row_eval["exact_match"] = round(exact, 4)
    score = Score(exact, row_eval["eval_loss"])
    if not early.update(score, row_eval["step"]):
        return None
    if score.exact_match == 1.0:
        return "validation exact match reached 1.00"
    return f"{early.best.describe()} did not improve for {early.evals_since_best} evaluations"


def over_time_budget(cfg: TrainConfig, elapsed_s: float, step: int) -> str | None:
    """The reason to stop when the run has spent its time budget, else None."""
    if cfg.time_budget is None or elapsed_s < cfg.time_budget:
        return None
    return f"the time budget of {cfg.time_budget:.0f} s was spent at step {step}"


def finish_adaptive(
    early: EarlyStop, stopped: str | None, step: int, n_examples: int, cfg: TrainConfig,
    runtime: Runtime,
) -> float | None:  # fmt: skip
    """Put the best adapter back, say what was chosen and why; returns the best eval loss."""
    epochs = step * cfg.batch_size / n_examples
    why = stopped or f"the longest length for this method ({cfg.max_epochs:g} epochs) was reached"
    if early.best is None:
        runtime.log(f"stopped after {epochs:.1f} epochs: {why}")
        return None
    early.restore_best()
    best_epochs = early.best_step * cfg.batch_size / n_examples
    runtime.log(
        f"stopped after {epochs:.1f} epochs: {why}; kept the adapter of step {early.best_step} "
        f"({best_epochs:.1f} epochs, {early.best.describe()})"
    )
    return early.best.loss
