"""The training loop: read it top to bottom.

    load base + tokenizer ─► read & tokenize data ─► inject adapter ─► AdamW + warmup/cosine
    └─► for each optimizer step: `batch_size` sequences of similar length, split into
        micro-batches, forward in bf16 autocast, loss only on labelled tokens (fused with the
        vocabulary projection), backward, clip, step ─► metrics.jsonl, progress bar,
        checkpoint every N steps and on Ctrl-C/SIGTERM ─► final adapter (atomic), loss.png

A step's loss is the mean over the labelled tokens of all its sequences, so how a step is cut
into micro-batches (or shared across ranks) changes speed, never the optimization. The data
order is a pure function of (seed, epoch), so a resumed run picks up at the exact batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.inspect import format_memory
from graftlm.adapters.io import save_trained
from graftlm.data.dataset import Example, collate, load_dataset, split_eval
from graftlm.errors import GraftError
from graftlm.kernels.fused_ops import fused_forwards
from graftlm.methods import method_module
from graftlm.methods.lora.inject import base_fingerprint
from graftlm.models.load import load_model
from graftlm.train import checkpoint as ckpt
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime, bf16_supported
from graftlm.train.forward import (
    autocast,
    evaluate,
    loss_sum,
    on_device,
    prefix_sharing_is_exact,
    training_device,
)
from graftlm.train.loss import logits_buffer_scope, release_logits_buffer
from graftlm.train.memory import (
    memory_accounting,
    release_free_heap,
    return_freed_memory_to_os,
)
from graftlm.train.metrics import MetricsWriter, progress_bar
from graftlm.train.steps import (
    count_steps,
    lr_lambda,
    micro_batches,
    needs_checkpointing,
    step_batches,
    tokens_per_pass,
)

logger = logging.getLogger("graftlm")

# --low-memory unmaps freed blocks of at least this size (see steps.LOW_MEMORY_BATCH_TOKENS)
LOW_MEMORY_MMAP_THRESHOLD = 4 << 20
# with checkpointing too, memory comes first: every block of 128 KiB or more is unmapped on free
# (QLoRA on tickets peaked at 1.19 GB with it, 1.96 GB with 4 MiB)
CHECKPOINTED_MMAP_THRESHOLD = 128 << 10


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    out: Path
    steps: int
    total_steps: int
    interrupted: bool
    final_loss: float | None
    eval_loss: float | None
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    memory: dict[str, int] | None = None  # graftlm.train.memory.memory_accounting at the end


# -- memory plan and one optimizer step ---------------------------------------------------------


@dataclass
class MemoryPlan:
    """How the run bounds its memory: activation checkpointing, and padded tokens per pass."""

    checkpointing: bool
    pass_tokens: int


def plan_memory(
    model: nn.Module, cfg: TrainConfig, examples: list[Example], runtime: Runtime
) -> MemoryPlan:
    """Report the planned memory, then turn on checkpointing / early unmapping as `cfg` asks."""
    planned = memory_accounting(model, None)
    runtime.log(
        f"memory: base weights {planned['base_weight_bytes'] / 1e6:.1f} MB, adapter "
        f"{planned['adapter_bytes'] / 1e6:.1f} MB, AdamW state "
        f"{2 * planned['adapter_bytes'] / 1e6:.1f} MB (two moments per trainable value)"
    )
    checkpointing = needs_checkpointing(cfg, examples)
    pass_tokens = tokens_per_pass(cfg, checkpointing)
    if cfg.low_memory:
        release_free_heap()  # what attach freed (a quantized base's full-precision weights)
        threshold = CHECKPOINTED_MMAP_THRESHOLD if checkpointing else LOW_MEMORY_MMAP_THRESHOLD
        return_freed_memory_to_os(threshold)
    if checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runtime.log("activation checkpointing on")
    return MemoryPlan(checkpointing, pass_tokens)


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
    pass_tokens: int

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
        chunks = micro_batches(indices_of_step, examples, cfg, runtime, self.pass_tokens)
        total_loss = 0.0
        for indices in chunks:
            batch = on_device(collate([examples[i] for i in indices], self.pad_id), device)
            with autocast(compute_dtype, device):
                loss, _ = loss_sum(model, batch, compute_dtype, share_prefix=self.share_prefix)
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
            else _norm(params)
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if hooks:
            hooks.after_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, grad_norm, lr


# -- interruption -----------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops.

    A second Ctrl-C falls through to the default handler (immediate KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, nothing to restore
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        logger.warning(
            "signal %s: finishing this step, writing a checkpoint, then stopping", signum
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# -- the loop ---------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, *, runtime: Runtime | None = None, progress: bool = True
) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` and write everything into `cfg.out`.

    Args:
        cfg: the run's settings.
        runtime: process group facts (rank, world size); default a single process.
        progress: show a progress bar (rank 0 only).

    Returns:
        A `TrainResult`; `interrupted` is True when a signal stopped the run early (the
        checkpoint is then in `out/checkpoint`, and `--resume` continues it).

    Raises:
        GraftError: bad data, bad settings, an output folder holding another run, a
            checkpoint that does not match the settings.
    """
    runtime = runtime or Runtime.single()
    cfg = cfg.with_method_defaults()
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = training_device()
    compute_dtype = _compute_dtype(cfg.dtype, device)
    metrics = MetricsWriter(out)
    state = _resume_state(cfg, out, metrics, runtime)
    torch.manual_seed(cfg.seed)
    model, pad_id, examples, eval_examples, summary = _load_and_attach(
        cfg, runtime, device, compute_dtype
    )
    method = method_module(cfg.method)
    memory_plan = plan_memory(model, cfg, examples, runtime)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    runtime.prepare(model, params, fsdp=cfg.fsdp)
    total_steps = count_steps(len(examples), cfg)
    optimizer, scheduler = _optimizer(params, cfg, total_steps)
    hooks_class = getattr(method, "TrainingHooks", None)
    hooks = hooks_class(model, cfg, total_steps) if hooks_class else None
    plan = step_batches(examples, cfg, total_steps)
    eval_every = cfg.eval_every or max(1, total_steps // 3)
    with autocast(compute_dtype, device):
        # activation checkpointing recomputes layers without a cache: no sharing with it
        share_prefix = not memory_plan.checkpointing and prefix_sharing_is_exact(
            model, max(examples, key=len), pad_id
        )
    logger.debug("shared-prefix forward: %s", "on" if share_prefix else "off")
    run_step = OptimizerStep(
        model, optimizer, scheduler, hooks, params, examples, cfg, runtime, pad_id, device,
        compute_dtype, share_prefix, memory_plan.pass_tokens,
    )  # fmt: skip

    start_step, elapsed_before = 0, 0.0
    if state is not None:
        start_step, elapsed_before = ckpt.restore(state, model, optimizer, scheduler, names, hooks)
        metrics.truncate(start_step) if runtime.is_main else None
        runtime.log(f"resumed from step {start_step}/{total_steps}")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step_reached: int, elapsed_s: float) -> None:
        ckpt.write(
            out, model, optimizer, scheduler, names,
            step=step_reached, elapsed_s=elapsed_s, cfg=cfg, hooks=hooks,
        )  # fmt: skip

    bar = progress_bar(total_steps, start_step, enabled=progress and runtime.is_main)
    last_loss = eval_loss = None
    interrupted = False
    t0 = time.perf_counter()
    step = start_step
    kernels = fused_forwards(model) if cfg.fused_kernels else contextlib.nullcontext(0)
    with StopFlag() as flag, kernels as fused, logits_buffer_scope():
        logger.debug("fused kernels on %d modules", fused)
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            labelled = sum(sum(1 for y in examples[i].labels[1:] if y != -100) for i in plan[step])
            tokens = sum(len(examples[i]) for i in plan[step])
            total_loss, grad_norm, lr = run_step(step, plan[step], labelled)
            # ranks agree on stopping: a signal may reach them on either side of a step
            total_loss, stops = runtime.all_reduce_sum([total_loss, float(flag.stop)])
            stop = stops > 0
            last_loss = total_loss / max(labelled, 1)
            elapsed = elapsed_before + time.perf_counter() - t0
            seconds = time.perf_counter() - step_start
            epoch = (step + 1) * cfg.batch_size / len(examples)
            row = _step_row(
                step, last_loss, lr, tokens, labelled, seconds, elapsed, grad_norm, epoch
            )
            done = step + 1
            row_eval = None
            if eval_examples and (done % eval_every == 0 or done == total_steps):
                eval_loss, eval_tokens = evaluate(
                    model, eval_examples, pad_id, compute_dtype, runtime, share_prefix=share_prefix
                )
                release_logits_buffer()  # evaluation's passes are larger than training's
                row_eval = _eval_row(done, eval_loss, eval_tokens, elapsed)
            if runtime.is_main:
                _report_step(metrics, bar, row, row_eval)
            if stop or (done % cfg.save_every == 0 and done < total_steps):
                if runtime.is_main:
                    save_checkpoint(done, elapsed)
                if stop:
                    interrupted = True
                    step = done
                    break
            step = done
    bar.close()
    train_seconds = elapsed_before + time.perf_counter() - t0
    memory = memory_accounting(model, optimizer)
    if not interrupted and runtime.is_main:
        training = _training_record(cfg, total_steps, len(examples), train_seconds, memory)
        training.update(final_loss=last_loss, eval_loss=eval_loss)
        _write_outputs(model, cfg, metrics, training, runtime)
        # the finished run keeps its checkpoint: --resume on it is a no-op
        save_checkpoint(total_steps, train_seconds)
    elif interrupted:
        runtime.log(
            f"stopped at step {step}/{total_steps}; continue with --resume (checkpoint in {out / ckpt.FOLDER})"
        )
    return TrainResult(
        out=out,
        steps=step,
        total_steps=total_steps,
        interrupted=interrupted,
        final_loss=last_loss,
        eval_loss=eval_loss,
        train_seconds=train_seconds,
        trainable_parameters=summary.trainable,
        total_parameters=summary.total,
        memory=memory,
    )


def _load_and_attach(cfg: TrainConfig, runtime: Runtime, device, compute_dtype):
    """The base model with the method's adapter attached, its pad id, and the examples."""
    # Frozen base weights are held in the compute dtype: no per-step casts of the big matrices.
    model, tokenizer = load_model(cfg.model, dtype=compute_dtype)
    model.to(device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    examples, eval_examples = _read_examples(cfg, tokenizer, runtime)
    base_fingerprint(model)  # of the untouched base: methods that wrap modules change names
    summary = method_module(cfg.method).attach(model, cfg)
    runtime.log(str(summary))
    return model, pad_id, examples, eval_examples, summary


def _report_step(metrics: MetricsWriter, bar, row: dict, row_eval: dict | None) -> None:
    """One step into metrics.jsonl and onto the progress bar."""
    metrics.append(row, row_eval)
    bar.update(1)
    bar.set_postfix(
        loss=f"{row['loss']:.4f}",
        tok_s=f"{row['tokens_per_s']:.0f}",
        **({"eval": f"{row_eval['eval_loss']:.4f}"} if row_eval else {}),
    )


def _write_outputs(
    model, cfg: TrainConfig, metrics: MetricsWriter, training: dict, runtime
) -> None:
    """The adapter folder (with graftlm.json) and the loss plot of a finished run."""
    out = Path(cfg.out)
    save_trained(model, out, cfg.method, training=training)
    metrics.plot()
    runtime.log(f"adapter written to {out} ({training['train_seconds']:.0f} s of training)")
    runtime.log(f"memory: {format_memory(training['memory'])}")


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable values, and its warmup + cosine schedule."""
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.warmup_ratio)
    )
    return optimizer, scheduler


def _resume_state(
    cfg: TrainConfig, out: Path, metrics: MetricsWriter, runtime: Runtime
) -> dict | None:
    """The checkpoint to resume from (None for a fresh run), after checking the inputs exist."""
    state = ckpt.read(out) if cfg.resume else None
    if cfg.resume and state is None:
        raise GraftError(f"--resume: no checkpoint in {out / ckpt.FOLDER}")
    if state is not None:
        ckpt.check_settings(state, cfg)
    elif runtime.is_main and metrics.exists() and not cfg.resume:
        raise GraftError(
            f"{out} already holds a training run (metrics.jsonl); use --resume or another --out"
        )

    for label, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path and not Path(path).is_file():
            raise GraftError(f"{label} {path}: file not found")
    return state


def _read_examples(cfg: TrainConfig, tokenizer, runtime: Runtime):
    """Training and evaluation examples: `--eval-data`, else a held-out share of `--data`."""
    examples, stats = load_dataset(
        cfg.data, tokenizer, cfg.seq_len, skip_bad_rows=cfg.skip_bad_rows
    )
    if cfg.eval_data:
        eval_examples, _ = load_dataset(
            cfg.eval_data, tokenizer, cfg.seq_len, skip_bad_rows=cfg.skip_bad_rows
        )
    else:
        examples, eval_examples = split_eval(examples, seed=cfg.seed)
    if eval_examples:
        runtime.log(
            f"{len(eval_examples)} examples held out for evaluation, {len(examples)} for training"
        )
    return examples, eval_examples


def _step_row(step, last_loss, lr, tokens, labelled, seconds, elapsed, grad_norm, epoch) -> dict:
    # key order is the file format of metrics.jsonl
    return {
        "step": step + 1,
        "loss": round(last_loss, 6),
        "lr": lr,
        "tokens": tokens,
        "labelled_tokens": labelled,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "elapsed_s": round(elapsed, 3),
        "grad_norm": round(float(grad_norm), 5),
        "epoch": round(epoch, 4),
    }


def _eval_row(done: int, eval_loss: float, eval_tokens: int, elapsed: float) -> dict:
    return {
        "step": done,
        "eval_loss": round(eval_loss, 6),
        "eval_tokens": eval_tokens,
        "elapsed_s": round(elapsed, 3),
    }


def _training_record(cfg, total_steps, n_examples, train_seconds, memory) -> dict:
    # key order is the file format of graftlm.json; the caller fills in the two losses
    return {
        "steps": total_steps,
        "epochs": round(total_steps * cfg.batch_size / n_examples, 3),
        "examples": n_examples,
        "final_loss": None,
        "eval_loss": None,
        "train_seconds": round(train_seconds, 1),
        "data": os.path.basename(cfg.data),
        "settings": cfg.to_dict(),
        "memory": memory,
    }


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float32


def _norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if grads
        else torch.zeros(())
    )
