"""`graftlm train`'s micro-batch when `--micro-batch-size` is not given: from the plan.

A pass of `tokens_per_pass` padded tokens (`train/steps.py`) is the throughput-optimal size
measured on CPUs (docs/measurements.md, "Tokens per forward pass"): bigger passes only cost
memory. So the plan caps it, and only where memory is tight does it matter:

    micro-batch = the throughput-optimal one, if its planned training peak fits
                  (1 - SAFETY_MARGIN) of the machine's memory;
                  else the largest that fits (at least 1: a run whose smallest pass does not
                  fit is refused by `plan/preflight.py`, or goes on under --force)

With ample memory the pass size is exactly `tokens_per_pass`, so runs are bit-identical to
those that predate the plan (the golden-file and resume tests rely on it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from graftlm.plan.memory import MemoryBreakdown, largest_fit, memory_breakdown
from graftlm.plan.report import Plan
from graftlm.train.config import TrainConfig
from graftlm.train.steps import tokens_per_pass

# Memory the choice leaves free: the plan's peaks were within 10% of the measured ones
# (bench/results/plan_validation.txt), and the machine runs other things beside the training
SAFETY_MARGIN = 0.10


@dataclass(frozen=True)
class PassSize:
    """How big a forward pass is, and why."""

    tokens: int  # padded tokens per pass: `train/steps.py: micro_batches`'s budget
    micro_batch: int  # sequences of `seq_len` tokens per pass
    checkpointing: bool  # what the plan assumed
    memory: MemoryBreakdown  # the plan at that micro-batch
    reason: str  # for the log


def breakdown_at(plan: Plan, micro_batch: int, checkpointing: bool) -> MemoryBreakdown:
    """The plan's memory with `micro_batch` sequences per pass and checkpointing as given."""
    chosen = plan.chosen
    run = dataclasses.replace(chosen.run, micro_batch_size=micro_batch, checkpointing=checkpointing)
    return memory_breakdown(plan.shape, chosen.trainable, chosen.profile, run)


def choose_pass_size(
    plan: Plan, cfg: TrainConfig, checkpointing: bool, available: int | None
) -> PassSize:
    """The pass size `graftlm train` uses (see the module docstring).

    Args:
        plan: the run's plan (`plan/preflight.py: plan_for_run`).
        cfg: the run's settings (`--micro-batch-size`, `--low-memory`, `--seq-len`).
        checkpointing: whether the run recomputes activations (a pass keeps less).
        available: bytes of memory the run may use (None: unknown, the optimal size is kept).
    """
    optimal_tokens = tokens_per_pass(cfg, checkpointing)
    seq_len = cfg.seq_len
    if cfg.micro_batch_size:
        micro = cfg.micro_batch_size
        memory = breakdown_at(plan, micro, checkpointing)
        return PassSize(optimal_tokens, micro, checkpointing, memory, "--micro-batch-size")
    optimal = min(cfg.batch_size, max(1, optimal_tokens // seq_len))
    memory = breakdown_at(plan, optimal, checkpointing)
    if available is None:
        return PassSize(
            optimal_tokens, optimal, checkpointing, memory, "the throughput-optimal size"
        )
    limit = int(available * (1 - SAFETY_MARGIN))
    share = f"{1 - SAFETY_MARGIN:.0%} of {available / 1e9:.1f} GB"
    if memory.training <= limit:
        reason = (
            f"the throughput-optimal size ({optimal_tokens} tokens per pass); its training peak "
            f"{memory.training / 1e9:.2f} GB fits {share}"
        )
        return PassSize(optimal_tokens, optimal, checkpointing, memory, reason)

    def fits(micro: int) -> bool:
        return breakdown_at(plan, micro, checkpointing).training <= limit

    if optimal == 1:  # one sequence per pass already: nothing smaller to choose
        reason = f"one sequence, the smallest pass, does NOT fit {share} ({memory.training / 1e9:.2f} GB)"
        return PassSize(optimal_tokens, 1, checkpointing, memory, reason)
    micro = max(1, largest_fit(fits, 1, optimal - 1))
    smaller = breakdown_at(plan, micro, checkpointing)
    fitting = smaller.training <= limit
    verdict = "the largest that fits" if fitting else "the smallest, and it does NOT fit"
    reason = (
        f"{verdict} {share}: the throughput-optimal {optimal} would peak at "
        f"{memory.training / 1e9:.2f} GB, {micro} at {smaller.training / 1e9:.2f} GB"
    )
    # micro < optimal <= optimal_tokens // seq_len: never a bigger pass than today's
    return PassSize(micro * seq_len, micro, checkpointing, smaller, reason)
