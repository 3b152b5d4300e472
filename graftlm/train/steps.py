"""Step planning: which sequences make each optimizer step, how a step is cut into passes,
and the learning-rate schedule. Pure functions of the settings and the data.
"""

from __future__ import annotations

import math

from graftlm.data.dataset import Example, length_grouped_batches
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime

# Padded tokens per forward pass when --micro-batch-size is not given. Activations grow with the
# tokens of one pass while the speed barely moves, and the loss is the same for every size; 1024
# was the fastest size measured, bigger passes only cost memory and smaller ones some speed
# (docs/measurements.md, "Tokens per forward pass").
MICRO_BATCH_TOKENS = 1024
# --low-memory recomputes each layer's activations in the backward (activation checkpointing) in
# every compute dtype. Its float32 recipe was smaller passes without recomputation, the faster
# of the two, but their activations and the freed blocks around them (glibc's heap fragments at
# the 1 MiB threshold that keeps those passes fast) put a float32 QLoRA run over 0.6x of LoRA's
# peak once LoRA's own peak fell with the fused float32 kernels: 0.60-0.62x on an AMD EPYC,
# against 0.46x checkpointed, in about the same step time there (1.97x LoRA's against 2.12x;
# docs/measurements.md, "QLoRA's recipe").
# LOW_MEMORY_BATCH_TOKENS: the passes of --low-memory --no-activation-checkpointing.
LOW_MEMORY_BATCH_TOKENS = 384
# With activation checkpointing a pass keeps only each layer's input (~2.3 KB per token on the
# built-in model), so bigger passes cost little memory and save work: every pass runs each
# layer three times (forward, recompute, backward), and a QLoRA layer dequantizes its weight
# each time.
CHECKPOINTED_BATCH_TOKENS = 2048


def step_batches(examples: list[Example], cfg: TrainConfig, total_steps: int) -> list[list[int]]:
    """The example indices of every optimizer step, epoch after epoch, from (seed, epoch) alone."""
    lengths = [len(e) for e in examples]
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total_steps:
        plan.extend(length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch))
        epoch += 1
    return plan[:total_steps]


def tokens_per_pass(cfg: TrainConfig, checkpointing: bool) -> int:
    """Padded tokens per forward pass when --micro-batch-size is not given."""
    if checkpointing:
        return CHECKPOINTED_BATCH_TOKENS
    return LOW_MEMORY_BATCH_TOKENS if cfg.low_memory else MICRO_BATCH_TOKENS


def micro_batches(
    indices: list[int],
    examples: list[Example],
    cfg: TrainConfig,
    runtime: Runtime,
    budget: int | None = None,
) -> list[list[int]]:
    """Cut one step's sequences into micro-batches (longest first) and keep this rank's share.

    `budget`: padded tokens per pass (default `tokens_per_pass(cfg, checkpointing=False)`).
    """
    budget = budget or tokens_per_pass(cfg, checkpointing=False)
    ordered = sorted(indices, key=lambda i: len(examples[i]), reverse=True)
    # with several ranks, cut at least one micro-batch per rank so that every rank has work
    per_rank = -(-len(indices) // runtime.world_size)
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in ordered:
        width = len(examples[current[0]]) if current else len(examples[i])
        limit = cfg.micro_batch_size or max(1, budget // max(width, 1))
        limit = min(limit, per_rank)
        if current and len(current) >= limit:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return runtime.shard(chunks)


def needs_checkpointing(cfg: TrainConfig, examples: list[Example] | None) -> bool:
    """`--activation-checkpointing` if set; else on in low-memory mode with data to train on
    (`examples` None: a planned run, whose data is not read yet)."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    return bool(cfg.low_memory) and (examples is None or bool(examples))


def count_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the run: `--steps`, else enough for `--epochs` over the data, else
    (an adaptive run) its longest length, `max_epochs`."""
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else cfg.max_epochs
    return max(1, math.ceil(epochs * n_examples / cfg.batch_size))


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Warmup then cosine decay, as a factor of `--lr` for `torch.optim.lr_scheduler.LambdaLR`."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor
