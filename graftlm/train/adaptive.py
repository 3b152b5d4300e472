"""The adaptive length of a run: what `graftlm train` does when neither `--epochs` nor `--steps`
is given.

The run may last the method's `max_epochs`. It is evaluated on the validation split about three
times an epoch; the learning rate stays at its peak (after warmup) while the score improves.
Once it has not improved for `patience` evaluations (a better exact match, or the same one at
a clearly lower answer loss: `Score.progresses_from`), or the longest length or
80% of `time_budget` comes near, the learning rate decays linearly to zero over a quarter of
the run so far, a last evaluation follows, and the run stops. The adapter saved is the one of
the best evaluation, and the run says why it stopped where it did. Data too small for a
validation split (under 32 distinct prompts) trains for `max_epochs` on a cosine schedule.
"""

from __future__ import annotations

import math

import torch

from graftlm.data.dataset import Example
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.validation import EarlyStop, GreedyAnswers, Score, scores_by_exact_match

EVALS_PER_EPOCH = 3


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def early_stop_for(
    trainable: dict[str, torch.Tensor], cfg: TrainConfig, validation: list[Example],
    tokenizer, n_examples: int, total_steps: int,
) -> EarlyStop | None:  # fmt: skip
    """The early stop of an adaptive run with a validation split (it keeps a copy of the
    `trainable` tensors, by name, at the best step); None for a fixed length."""
    if not cfg.adaptive or not validation:
        return None
    early = EarlyStop(trainable, cfg.patience)
    early.exact_match = scores_by_exact_match(validation, tokenizer)
    steps_per_epoch = n_examples / cfg.batch_size
    early.eval_every = cfg.eval_every or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    early.warmup = int(round(total_steps * cfg.warmup_ratio))
    return early


def eval_interval(total_steps: int, early: EarlyStop | None) -> int:
    """Steps between evaluations: a few per epoch in an adaptive run, three a run otherwise."""
    if early is None:
        return max(1, total_steps // 3)
    return early.eval_every


def validate(
    early: EarlyStop, row_eval: dict, answers: GreedyAnswers | None, runtime: Runtime
) -> None:
    """Score the validation split after the loss in `row_eval` and the greedy answers counted
    in the same pass (adds "exact_match" to the row), and update the early stop; a stop rule
    that fires begins the cool-down."""
    exact = None
    if early.exact_match:
        exact = answers.exact_match(runtime)
        row_eval["exact_match"] = round(exact, 4)
    score = Score(exact, row_eval["eval_loss"])
    step = row_eval["step"]
    if not early.update(score, step) or early.cooling():
        return
    reason = f"{early.best.describe()} did not improve for {early.evals_since_best} evaluations"
    early.begin_cooldown(step, cooldown_length(step, early), reason)


def cooldown_length(step: int, early: EarlyStop) -> int:
    """Steps of learning-rate decay before stopping: a quarter of the run so far, at least one
    evaluation interval (the decay ends with an evaluation)."""
    return max(early.eval_every, round(0.25 * step))


def check_length(early: EarlyStop, cfg: TrainConfig, elapsed_s: float, step: int,
                 total_steps: int) -> str | None:  # fmt: skip
    """Begin the cool-down where the run must end anyway (the longest length, 80% of the time
    budget); returns the reason to stop now, or None."""
    if cfg.time_budget is not None and elapsed_s >= cfg.time_budget:
        return f"the time budget of {cfg.time_budget:.0f} s was spent at step {step}"
    if early.cooldown_done(step):
        return f"{early.reason}; then the learning rate decayed over {early.cooldown_steps} steps"
    length = cooldown_length(step, early)
    if step >= total_steps - length:
        early.begin_cooldown(
            step, total_steps - step, f"the longest length ({cfg.max_epochs:g} epochs)"
        )
    elif cfg.time_budget is not None and elapsed_s >= 0.8 * cfg.time_budget:
        early.begin_cooldown(
            step, length, f"80% of the {cfg.time_budget:.0f} s time budget was spent"
        )
    return None


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
