"""The evaluations of a training run: when one is due, its row of metrics.jsonl, and in an
adaptive run what the early stop decides after it.

A run with an evaluation split scores it every `--eval-every` steps (default: three times a
run, or a few times an epoch in an adaptive run; `train/adaptive.py`) and after its last step.
An adaptive run also scores the validation split once its cool-down ends, checks after every
step whether it must stop, and at the end puts the best adapter back. With a weight average
(`--ema-decay`) every evaluation scores the average, so the best adapter kept is an average too,
and a fixed-length run ends on the average.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from graftlm.data.dataset import Example
from graftlm.train.adaptive import check_length, eval_interval, finish_adaptive, validate
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.forward import EVAL_BATCH_TOKENS, LOW_MEMORY_EVAL_TOKENS, evaluate
from graftlm.train.loss import release_logits_buffer
from graftlm.train.memory import release_free_heap
from graftlm.train.validation import EarlyStop, GreedyAnswers, answer_stop_ids
from graftlm.train.weight_average import WeightAverage


class RunEvaluation:
    """The periodic evaluation of one run and, in an adaptive run, its early stop.

    Attributes:
        early: the adaptive run's early stop; None for a fixed length.
        every: optimizer steps between evaluations.
        eval_loss: the loss of the latest evaluation (after `finish`, of the adapter kept);
            None before the first.
        stopped_early: why an adaptive run stops before its longest length; None while it
            goes on.
    """

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, examples: list[Example], tokenizer,
        pad_id: int, compute_dtype: torch.dtype, runtime: Runtime, share_prefix: bool,
        early: EarlyStop | None, total_steps: int, average: WeightAverage | None = None,
    ) -> None:  # fmt: skip
        self.model, self.cfg, self.examples, self.tokenizer = model, cfg, examples, tokenizer
        self.pad_id, self.compute_dtype, self.runtime = pad_id, compute_dtype, runtime
        self.share_prefix, self.early, self.total_steps = share_prefix, early, total_steps
        self.average = average
        # where a greedy answer ends, for runs that score validation by exact match
        scored = examples and early is not None and early.exact_match
        self.stop_ids = answer_stop_ids(model, tokenizer, examples) if scored else []
        self.every = cfg.eval_every or eval_interval(total_steps, early)
        self.eval_loss: float | None = None
        self.stopped_early: str | None = None

    def after_step(self, done: int, elapsed_s: float) -> dict | None:
        """Evaluate where one is due after optimizer step `done`, and let an adaptive run's
        early stop decide (it sets `stopped_early`). Returns the evaluation's metrics row, or
        None where none ran."""
        early = self.early
        row_eval = None
        due = done % self.every == 0 or done == self.total_steps
        if self.examples and (due or (early is not None and early.cooldown_done(done))):
            with self.average.applied() if self.average else contextlib.nullcontext():
                row_eval = self._evaluate(done, elapsed_s)
        if early is not None:
            self.stopped_early = check_length(early, self.cfg, elapsed_s, done, self.total_steps)
        return row_eval

    def _evaluate(self, done: int, elapsed_s: float) -> dict:
        """The evaluation after step `done` and, in an adaptive run, the early stop's decision
        on it; returns its metrics row."""
        # an adaptive run on short answers: greedy exact match read off the same pass
        answers = None
        if self.early is not None and self.early.exact_match:
            answers = GreedyAnswers(self.model, self.examples, self.stop_ids)
        self.eval_loss, eval_tokens = evaluate(
            self.model, self.examples, self.pad_id, self.compute_dtype, self.runtime,
            share_prefix=self.share_prefix,
            max_tokens=LOW_MEMORY_EVAL_TOKENS if self.cfg.low_memory else EVAL_BATCH_TOKENS,
            per_batch=answers,
        )  # fmt: skip
        release_logits_buffer()  # evaluation's passes are larger than training's
        if self.cfg.low_memory:  # and what they freed would stay resident, fragmented
            release_free_heap()
        row_eval = eval_row(done, self.eval_loss, eval_tokens, elapsed_s)
        if self.early is not None:
            validate(self.early, row_eval, answers, self.runtime)
        return row_eval

    def finish(self, step: int, n_examples: int) -> None:
        """The end of a run that was not interrupted: an adaptive run puts the best adapter
        back, says why it stopped, and `eval_loss` becomes the kept adapter's; a run with a
        weight average and no kept adapter ends on the average."""
        kept = self.early is not None and self.early.best is not None
        if self.average is not None and not kept:
            self.average.apply()
        if self.early is not None:
            self.eval_loss = finish_adaptive(
                self.early, self.stopped_early, step, n_examples, self.cfg, self.runtime
            )

    def summary(self) -> dict:
        """The entries of graftlm.json's training record: "validation" in an adaptive run
        (what was chosen and why), nothing otherwise."""
        if self.early is None:
            return {}
        return {"validation": self.early.summary(self.stopped_early)}


def eval_row(done: int, eval_loss: float, eval_tokens: int, elapsed: float) -> dict:
    """An evaluation's row of metrics.jsonl (key order is the file format)."""
    return {
        "step": done,
        "eval_loss": round(eval_loss, 6),
        "eval_tokens": eval_tokens,
        "elapsed_s": round(elapsed, 3),
    }
