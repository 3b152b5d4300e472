"""One optimizer step of a run (micro-batches, clipping, AdamW, the method's hooks), the
optimizer and schedule, and the memory plan that bounds a step's passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftlm.data.dataset import Example, collate
from graftlm.train.checkpointing import enable as enable_checkpointing
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.forward import autocast, loss_sum, on_device
from graftlm.train.lean_adamw import LeanAdamW
from graftlm.train.memory import memory_accounting, release_free_heap, return_freed_memory_to_os
from graftlm.train.steps import lr_lambda, micro_batches, needs_checkpointing, tokens_per_pass

# the small passes of --low-memory --no-activation-checkpointing unmap freed blocks of at least
# this size (4 MiB until the dequantized NF4 weights went into a reused buffer and the passes
# shrank to 384 tokens: since then 1 MiB peaks lower at the same speed; docs/measurements.md,
# "QLoRA's recipe")
LOW_MEMORY_MMAP_THRESHOLD = 1 << 20
# with checkpointing (low-memory mode's default), memory comes first: every block of 128 KiB or
# more is unmapped on free (float32: 0.98 GB against 1.15 GB at 1 MiB, in about the same time on
# an EPYC); in bf16 blocks of 2 MiB or more (128 KiB
# made its steps ~1.4x slower, page faults of fresh blocks; the measurements: docs/measurements.md)
CHECKPOINTED_MMAP_THRESHOLD = 128 << 10
CHECKPOINTED_BF16_MMAP_THRESHOLD = 2 << 20
# a --low-memory run projects at most this many labelled rows to the vocabulary at once (the
# default 1024: a 1024 x 49,152 logits buffer is 100 MB in bf16): on answers of a few
# sentences, 0.05 GB off QLoRA's peak at no cost in time (bench/results/qlora_speed.txt)
LOW_MEMORY_LOSS_ROWS = 256


@dataclass
class MemoryPlan:
    """How the run bounds its memory: activation checkpointing, and padded tokens per pass."""

    checkpointing: bool
    pass_tokens: int


def plan_memory(
    model: nn.Module,
    cfg: TrainConfig,
    examples: list[Example],
    runtime: Runtime,
    compute_dtype: torch.dtype = torch.float32,
    pass_tokens_for: Callable[[bool], int] | None = None,
) -> MemoryPlan:
    """Report the planned memory, then turn on checkpointing / early unmapping as `cfg` (and, in
    low-memory mode, the compute dtype) asks.

    `pass_tokens_for(checkpointing)`: padded tokens per pass (the plan's choice,
    `plan/preflight.py: Preflight.pass_tokens`); default `tokens_per_pass`."""
    planned = memory_accounting(model, None)
    runtime.log(
        f"memory: base weights {planned['base_weight_bytes'] / 1e6:.1f} MB, adapter "
        f"{planned['adapter_bytes'] / 1e6:.1f} MB, AdamW state "
        f"{2 * planned['adapter_bytes'] / 1e6:.1f} MB (two moments per trainable value)"
    )
    checkpointing = needs_checkpointing(cfg, examples)
    if pass_tokens_for is not None:
        pass_tokens = pass_tokens_for(checkpointing)
    else:
        pass_tokens = tokens_per_pass(cfg, checkpointing)
    if cfg.low_memory:
        release_free_heap()  # what attach freed (a quantized base's full-precision weights)
        return_freed_memory_to_os(low_memory_mmap_threshold(checkpointing, compute_dtype))
    if checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        keeps_cache = enable_checkpointing(model)
        runtime.log(f"activation checkpointing on{'' if keeps_cache else ' (no shared prefix)'}")
    return MemoryPlan(checkpointing, pass_tokens)


def low_memory_mmap_threshold(checkpointing: bool, compute_dtype: torch.dtype) -> int:
    """The smallest freed block a --low-memory run unmaps at once (see the constants above)."""
    if not checkpointing:
        return LOW_MEMORY_MMAP_THRESHOLD
    if compute_dtype == torch.bfloat16:
        return CHECKPOINTED_BF16_MMAP_THRESHOLD
    return CHECKPOINTED_MMAP_THRESHOLD


@dataclass
class OptimizerStep:
    """Runs one optimizer step: micro-batches forward + backward, clip, AdamW step, hooks."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: Any
    params: list[torch.Tensor]
    examples: list[Example]
    cfg: TrainConfig
    runtime: Runtime
    pad_id: int
    device: torch.device
    compute_dtype: torch.dtype
    share_prefix: bool
    memory_plan: MemoryPlan

    def __call__(
        self, step: int, indices_of_step: list[int], labelled: int
    ) -> tuple[float, Any, float]:
        """Train on the sequences `indices_of_step`; returns (this rank's summed loss, grad norm, lr)."""
        model, hooks, params, examples = self.model, self.hooks, self.params, self.examples
        cfg, runtime, device, compute_dtype = (
            self.cfg,
            self.runtime,
            self.device,
            self.compute_dtype,
        )
        plan = self.memory_plan
        chunks = micro_batches(indices_of_step, examples, cfg, runtime, plan.pass_tokens)
        total_loss = 0.0
        for indices in chunks:
            batch = on_device(collate([examples[i] for i in indices], self.pad_id), device)
            with autocast(compute_dtype, device):
                loss, _ = loss_sum(model, batch, compute_dtype, share_prefix=self.share_prefix)
            if cfg.low_memory and plan.checkpointing:
                # a checkpointed forward keeps next to nothing and frees every layer's
                # temporaries, which stay resident in the heap's holes while the backward's
                # recomputation allocates beside them: hand those pages back first
                release_free_heap()
            if runtime.is_padding(indices):  # run only to keep FSDP ranks in step
                loss = loss * 0.0
            objective = loss / max(labelled, 1)
            extra = hooks.extra_loss() if hooks else None
            if extra is not None:  # a regularizer: its share per micro-batch
                objective = objective + extra * (len(indices) / len(indices_of_step))
            objective.backward()
            total_loss += loss.item()
        runtime.reduce_gradients(params)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if cfg.grad_clip
            else grad_norm_of(params)
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if hooks:
            hooks.after_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.low_memory:
            # the step's small freed blocks stay in the heap, fragmented, and the next step
            # adds its own beside them: hand the free pages back (a millisecond per step)
            release_free_heap()
        return total_loss, grad_norm, lr


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, total_steps: int, lr_factor=None):
    """AdamW over the trainable values, and its schedule: `lr_factor(step)` (an adaptive run's
    warmup-stable-decay), else warmup + cosine over `total_steps`."""
    adamw = LeanAdamW if cfg.lean_optimizer else torch.optim.AdamW
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor or lr_lambda(total_steps, cfg.warmup_ratio)
    )
    return optimizer, scheduler


def grad_norm_of(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if grads
        else torch.zeros(())
    )
