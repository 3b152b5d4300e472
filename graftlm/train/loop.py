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
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.inspect import format_memory
from graftlm.adapters.io import save_trained
from graftlm.data.dataset import Example, load_dataset, split_eval
from graftlm.errors import GraftError
from graftlm.infer.forgetting import forgetting_after_training, format_forgetting
from graftlm.kernels.fused_ops import fused_forwards
from graftlm.methods import method_module
from graftlm.methods.lora.inject import base_fingerprint
from graftlm.models.load import load_model
from graftlm.plan.preflight import preflight
from graftlm.train import checkpoint as ckpt
from graftlm.train import checkpointing
from graftlm.train.adaptive import early_stop_for, pad_token_id
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime, bf16_supported
from graftlm.train.embedding_noise import embedding_noise
from graftlm.train.evaluation import RunEvaluation
from graftlm.train.forward import autocast, prefix_sharing_is_exact, training_device
from graftlm.train.guard import claim_out, non_finite_loss
from graftlm.train.interrupt import StopFlag
from graftlm.train.loss import logits_buffer_scope
from graftlm.train.memory import (
    memory_accounting,
    release_free_heap,
)
from graftlm.train.metrics import MetricsWriter, progress_bar
from graftlm.train.step import (
    LOW_MEMORY_LOSS_ROWS,
    OptimizerStep,
    make_optimizer,
    plan_memory,
)
from graftlm.train.steps import (
    count_steps,
    step_batches,
)
from graftlm.train.validation import prompt_text, split_validation
from graftlm.train.weight_average import weight_average_for

logger = logging.getLogger("graftlm")


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


# -- the loop ---------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, *, runtime: Runtime | None = None, progress: bool = True,
    prepared: Prepared | None = None,
) -> TrainResult:  # fmt: skip
    """Fine-tune `cfg.model` on `cfg.data` and write everything into `cfg.out`.

    Args:
        cfg: the run's settings.
        runtime: process group facts (rank, world size); default a single process.
        progress: show a progress bar (rank 0 only).
        prepared: a base model and tokenized data loaded once for several runs (`graftlm
            sweep`); the run trains a copy of the model. Default: load both from `cfg`.

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
    with claim_out(out, is_main=runtime.is_main):  # writable, and no other run writes there
        return _run(cfg, out, runtime, progress, prepared)


def _run(cfg, out, runtime, progress, prepared) -> TrainResult:
    """`train` in a claimed `out`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = training_device()
    compute_dtype = compute_dtype_for(cfg.dtype, device)
    metrics = MetricsWriter(out)
    state = _resume_state(cfg, out, metrics, runtime)
    checked = None
    if prepared is None:  # the plan's peak and pass size, before any weight or row is read
        checked = preflight(cfg, device, runtime.log)
    torch.manual_seed(cfg.seed)
    model, prepared = _base_for_run(prepared, cfg, runtime, device, compute_dtype)
    tokenizer, pad_id = prepared.tokenizer, pad_token_id(prepared.tokenizer)
    examples, eval_examples = list(prepared.examples), list(prepared.eval_examples)
    method = method_module(cfg.method)
    base_fingerprint(model)  # of the untouched base: methods that wrap modules change names
    summary = method.attach(model, cfg)
    runtime.log(str(summary))
    if cfg.neftune_alpha:  # on by default for the LoRA family: say so, and how to turn it off
        runtime.log(
            f"NEFTune: noise of strength {cfg.neftune_alpha:g} on the input embeddings while "
            "training (--neftune-alpha 0: off)"
        )
    pass_tokens_for = None
    if checked is not None:

        def pass_tokens_for(checkpointing: bool) -> int:
            return checked.pass_tokens(cfg, checkpointing, runtime.log)

    memory_plan = plan_memory(model, cfg, examples, runtime, compute_dtype, pass_tokens_for)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params, names = list(trainable.values()), {id(p): n for n, p in trainable.items()}
    runtime.prepare(model, params, fsdp=cfg.fsdp)
    total_steps = count_steps(len(examples), cfg)
    early = early_stop_for(trainable, cfg, eval_examples, tokenizer, len(examples), total_steps)
    optimizer, scheduler = make_optimizer(
        params, cfg, total_steps, early.lr_factor if early is not None else None
    )
    average = weight_average_for(trainable, cfg.ema_decay)
    hooks_class = getattr(method, "TrainingHooks", None)
    hooks = hooks_class(model, cfg, total_steps) if hooks_class else None
    plan = step_batches(examples, cfg, total_steps)
    share_prefix = _share_prefix(model, examples, pad_id, memory_plan, compute_dtype, device)
    if cfg.low_memory:  # the probe's forward pass left its temporaries in the heap
        release_free_heap()
    run_step = OptimizerStep(
        model, optimizer, scheduler, hooks, params, examples, cfg, runtime, pad_id, device,
        compute_dtype, share_prefix, memory_plan,
    )  # fmt: skip
    evals = RunEvaluation(
        model, cfg, eval_examples, tokenizer, pad_id, compute_dtype, runtime, share_prefix,
        early, total_steps, average,
    )  # fmt: skip
    stateful = {"hooks": hooks, "early_stop": early, "weight_average": average}
    checkpoint = ckpt.RunCheckpoint(out, cfg, model, optimizer, scheduler, names, stateful)
    start_step, elapsed_before = _restore(checkpoint, state, metrics, runtime, total_steps)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)

    bar = progress_bar(total_steps, start_step, enabled=progress and runtime.is_main)
    last_loss, interrupted = None, False
    t0 = time.perf_counter()
    step = start_step
    kernels = fused_forwards(model) if cfg.fused_kernels else contextlib.nullcontext(0)
    noise = embedding_noise(model, cfg.neftune_alpha)
    loss_rows = LOW_MEMORY_LOSS_ROWS if cfg.low_memory else None
    with StopFlag() as flag, kernels as fused, logits_buffer_scope(loss_rows), noise:
        logger.debug("fused kernels on %d modules", fused)
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            batch = [examples[i] for i in plan[step]]
            labelled = sum(sum(1 for y in e.labels[1:] if y != -100) for e in batch)
            total_loss, grad_norm, lr = run_step(step, plan[step], labelled)
            if average is not None:
                average.update()
            # ranks agree on stopping: a signal may reach them on either side of a step
            total_loss, stops = runtime.all_reduce_sum([total_loss, float(flag.stop)])
            interrupted = stops > 0
            last_loss = total_loss / max(labelled, 1)
            if not math.isfinite(last_loss):  # stop before it reaches a checkpoint or adapter
                sources = [e.source for e in batch]
                raise non_finite_loss(step + 1, last_loss, sources, ckpt.saved_step(out), out)
            elapsed = elapsed_before + time.perf_counter() - t0
            done = step + 1
            epoch = done * cfg.batch_size / len(examples)
            row = _step_row(
                done, batch, last_loss, lr, labelled, grad_norm, step_start, elapsed, epoch
            )
            row_eval = evals.after_step(done, elapsed)
            if runtime.is_main:
                _report_step(metrics, bar, row, row_eval)
            step = done
            if interrupted or (done % cfg.save_every == 0 and done < total_steps):
                if runtime.is_main:
                    checkpoint.write(done, elapsed)
            if interrupted or evals.stopped_early:
                break
    bar.close()
    result = TrainResult(
        out=out,
        steps=step,
        total_steps=total_steps,
        interrupted=interrupted,
        final_loss=last_loss,
        eval_loss=evals.eval_loss,
        train_seconds=elapsed_before + time.perf_counter() - t0,
        trainable_parameters=summary.trainable,
        total_parameters=summary.total,
        memory=memory_accounting(model, optimizer),
    )
    return _finish(result, model, cfg, metrics, runtime, evals, checkpoint, len(examples))


@dataclass
class Prepared:
    """A base model (in the compute dtype, on the training device) and the tokenized training
    and evaluation examples: what several runs on the same data share."""

    model: nn.Module
    tokenizer: Any
    examples: list[Example]
    eval_examples: list[Example]


def _base_for_run(prepared, cfg, runtime, device, compute_dtype) -> tuple[nn.Module, Prepared]:
    """The model this run trains: freshly loaded, or a copy of a shared prepared base (the
    shared one stays untouched for the next run)."""
    if prepared is None:
        prepared = prepare(cfg, runtime, device, compute_dtype)
        return prepared.model, prepared
    return copy.deepcopy(prepared.model), prepared


def _share_prefix(model, examples, pad_id, memory_plan, compute_dtype, device) -> bool:
    """Whether rows with a common prompt may share its forward pass (exact for this model)."""
    with autocast(compute_dtype, device):
        # checkpointed layers share a prefix only where they keep the cache (checkpointing.py)
        share = (
            not memory_plan.checkpointing or checkpointing.keeps_cache(model)
        ) and prefix_sharing_is_exact(model, max(examples, key=len), pad_id)
    logger.debug("shared-prefix forward: %s", "on" if share else "off")
    return share


def prepare(cfg: TrainConfig, runtime: Runtime, device, compute_dtype) -> Prepared:
    """Load `cfg.model` and read, check and tokenize `cfg.data` (and the evaluation split)."""
    # Frozen base weights are held in the compute dtype: no per-step casts of the big matrices.
    # A method that trains the base weights themselves (full) names the dtype it keeps them in.
    module = method_module(cfg.method)
    dtype = getattr(module, "WEIGHTS_DTYPE", None) or compute_dtype
    # a 4-bit base (QLoRA) is quantized as it is read: its full-precision linears never resident
    quantize = getattr(module, "BASE_QUANTIZATION", None)
    model, tokenizer = load_model(cfg.model, dtype=dtype, quantize=quantize)
    model.to(device)
    examples, eval_examples = read_examples(cfg, tokenizer, runtime)
    return Prepared(model, tokenizer, examples, eval_examples)


def _report_step(metrics: MetricsWriter, bar, row: dict, row_eval: dict | None) -> None:
    """One step into metrics.jsonl and onto the progress bar."""
    metrics.append(row, row_eval)
    bar.update(1)
    bar.set_postfix(
        loss=f"{row['loss']:.4f}",
        tok_s=f"{row['tokens_per_s']:.0f}",
        **({"eval": f"{row_eval['eval_loss']:.4f}"} if row_eval else {}),
    )


def _finish(
    result: TrainResult, model: nn.Module, cfg: TrainConfig, metrics: MetricsWriter,
    runtime: Runtime, evals: RunEvaluation, checkpoint: ckpt.RunCheckpoint, n_examples: int,
) -> TrainResult:  # fmt: skip
    """The end of a run. A stopped one says how to continue it. A finished one keeps its
    adapter (an adaptive run: the best one, whose eval loss the result then reports), and rank
    0 writes the adapter folder with graftlm.json, loss.png and the final checkpoint."""
    if result.interrupted:
        runtime.log(
            f"stopped at step {result.steps}/{result.total_steps}; continue with --resume "
            f"(checkpoint in {result.out / ckpt.FOLDER})"
        )
        return result
    evals.finish(result.steps, n_examples)
    result = dataclasses.replace(result, eval_loss=evals.eval_loss)
    if runtime.is_main:
        training = _training_record(cfg, result, n_examples, evals)
        if cfg.forgetting:  # the tuned model against its base, outside the task
            training["forgetting"] = forgetting_after_training(
                model, evals.tokenizer, cfg, evals.compute_dtype
            )
            runtime.log(f"forgetting: {format_forgetting(training['forgetting'])}")
        _write_outputs(model, cfg, metrics, training, runtime)
        # the finished run keeps its checkpoint: --resume on it is a no-op
        checkpoint.write(result.total_steps, result.train_seconds)
    return result


def _write_outputs(
    model, cfg: TrainConfig, metrics: MetricsWriter, training: dict, runtime
) -> None:
    """The adapter folder (with graftlm.json) and the loss plot of a finished run."""
    out = Path(cfg.out)
    save_trained(model, out, cfg.method, training=training)
    metrics.plot()
    runtime.log(f"adapter written to {out} ({training['train_seconds']:.0f} s of training)")
    runtime.log(f"memory: {format_memory(training['memory'])}")


def _restore(
    checkpoint: ckpt.RunCheckpoint, state: dict | None, metrics: MetricsWriter, runtime: Runtime,
    total_steps: int,
) -> tuple[int, float]:  # fmt: skip
    """The step and the seconds of training a run starts from: (0, 0.0) for a fresh run, else
    the checkpoint's, loaded into the run (metrics.jsonl cut back to that step)."""
    if state is None:
        return 0, 0.0
    start_step, elapsed_s = checkpoint.restore(state)
    if runtime.is_main:
        metrics.truncate(start_step)
    runtime.log(f"resumed from step {start_step}/{total_steps}")
    return start_step, elapsed_s


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


def read_examples(cfg: TrainConfig, tokenizer, runtime: Runtime):
    """Training and evaluation examples: `--eval-data`, else a held-out share of `--data`."""
    examples, stats = load_dataset(
        cfg.data, tokenizer, cfg.seq_len, skip_bad_rows=cfg.skip_bad_rows
    )
    if cfg.eval_data:
        eval_examples, _ = load_dataset(
            cfg.eval_data, tokenizer, cfg.seq_len, skip_bad_rows=cfg.skip_bad_rows
        )
    elif cfg.adaptive:
        texts = None
        if cfg.validation_split == "phrasings":
            texts = [prompt_text(e, tokenizer) for e in examples]
        examples, eval_examples = split_validation(examples, seed=cfg.seed, prompt_texts=texts)
    else:
        examples, eval_examples = split_eval(examples, seed=cfg.seed)
    if eval_examples:
        runtime.log(
            f"{len(eval_examples)} examples held out for evaluation, {len(examples)} for training"
        )
    return examples, eval_examples


def _step_row(
    done, batch, loss, lr, labelled, grad_norm, step_start, elapsed, epoch
) -> dict:  # fmt: skip
    """Optimizer step `done`'s row of metrics.jsonl (key order is the file format)."""
    tokens = sum(len(e) for e in batch)
    seconds = time.perf_counter() - step_start
    return {
        "step": done,
        "loss": round(loss, 6),
        "lr": lr,
        "tokens": tokens,
        "labelled_tokens": labelled,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "elapsed_s": round(elapsed, 3),
        "grad_norm": round(float(grad_norm), 5),
        "epoch": round(epoch, 4),
    }


def _training_record(
    cfg: TrainConfig, result: TrainResult, n_examples: int, evals: RunEvaluation
) -> dict:
    """The "training" entry of a finished run's graftlm.json (key order is the file format)."""
    return {
        "steps": result.steps,
        "epochs": round(result.steps * cfg.batch_size / n_examples, 3),
        "examples": n_examples,
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "train_seconds": round(result.train_seconds, 1),
        "data": os.path.basename(cfg.data),
        "settings": cfg.to_dict(),
        "memory": result.memory,
        **evals.summary(),
    }


def compute_dtype_for(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float32
