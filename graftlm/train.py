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
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm import checkpoint as ckpt
from graftlm.adapter_io import save_trained
from graftlm.data import Example, collate, length_grouped_batches, load_dataset, split_eval
from graftlm.errors import GraftError
from graftlm.fused_ops import fused_forwards
from graftlm.loss import (
    fused_lm_loss_sum,
    head_lm_loss_sum,
    logits_buffer_scope,
    release_logits_buffer,
)
from graftlm.memory import format_memory, memory_accounting, return_freed_memory_to_os
from graftlm.methods import method_module
from graftlm.runtime import Runtime, bf16_supported
from graftlm.small_batch_linear import is_plain_linear
from graftlm.surgery import base_fingerprint
from graftlm.train_config import TrainConfig

logger = logging.getLogger("graftlm")

# Padded tokens per forward pass when --micro-batch-size is not given. Activations grow with the
# tokens of one pass, the speed barely moves: on SmolLM2-135M (LoRA r8 q/v, batch 8 x 256, this
# 2-core CPU, fused kernels) 2048 tokens per pass peaked at 4.7 GB RSS and took 11.7 s/step,
# 1024 tokens 3.0 GB and 11.2 s, 512 tokens 2.0 GB and 12.4 s (matrix products of 512 rows run
# ~15% below their 2048-row speed), 256 tokens 1.4 GB and 13.5 s. The loss is the same for all.
MICRO_BATCH_TOKENS = 1024
# --low-memory: smaller passes instead of recomputing layers. Against PEFT on the run above
# (bench/train_vs_peft.py): 512 tokens per pass with blocks of 4 MiB or more unmapped on free
# (memory.return_freed_memory_to_os) 1.11x its speed at 0.31x its peak (the default: 1.14x at
# 0.46x); with a 1 MiB threshold 0.26x the peak but 0.80x the speed (page faults of fresh
# temporaries); activation checkpointing (the old mode) 0.23x at 0.51x. Checkpointing stays for
# rows longer than LOW_MEMORY_CHECKPOINT_TOKENS, whose activations no micro-batch can bound.
LOW_MEMORY_BATCH_TOKENS = 512
LOW_MEMORY_CHECKPOINT_TOKENS = 1024
# With activation checkpointing a pass keeps only each layer's input (~2.3 KB per token on the
# built-in model), so bigger passes cost little memory and save work: every pass runs each
# layer three times (forward, recompute, backward), and a QLoRA layer dequantizes its weight
# each time.
CHECKPOINTED_BATCH_TOKENS = 2048
LOW_MEMORY_MMAP_THRESHOLD = 4 << 20
# with checkpointing too, memory comes first: every block of 128 KiB or more is unmapped on free
# (QLoRA on tickets peaked at 1.19 GB with it, 1.96 GB with 4 MiB)
CHECKPOINTED_MMAP_THRESHOLD = 128 << 10
EVAL_BATCH_TOKENS = 4096  # evaluation keeps no activations for a backward: bigger passes are fine


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
    memory: dict[str, int] | None = None  # graftlm.memory.memory_accounting at the end


# -- the data plan ----------------------------------------------------------------------------


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


def needs_checkpointing(cfg: TrainConfig, examples: list[Example]) -> bool:
    """`--activation-checkpointing` if set; else low-memory mode recomputes activations only
    when rows are too long for small passes."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    if not cfg.low_memory or not examples:
        return False
    return max(map(len, examples)) > LOW_MEMORY_CHECKPOINT_TOKENS


def count_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


# -- model pieces -----------------------------------------------------------------------------


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading tokens every row of the batch has in common (at most shortest row - 1)."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    prefix = int(same.long().cumprod(0).sum())
    return max(0, min(prefix, int(attention_mask.sum(dim=1).min()) - 1))


def decoder_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor], *, share_prefix: bool = True
) -> torch.Tensor:
    """Final hidden states `(batch, seq, d)` of the decoder (the model without its head).

    Chat rows share a long prefix (the system prompt, the template's header): 40-55% of the
    tokens in our example tasks. With `share_prefix`, that prefix runs once for the whole
    micro-batch and its key/value cache is repeated for every row; gradients flow through it
    exactly as through the full forward, so only the cost changes.
    """
    inner = model.base_model  # the decoder without the head (model.model, transformer, ...)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    # No padding in the micro-batch (length grouping makes that common): let attention take
    # its plain causal path instead of building a 4-D mask.
    attention_mask = None if bool(mask.all()) else mask
    if "position_ids" in batch:  # packed rows: positions restart inside a row
        out = inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=batch["position_ids"],
            use_cache=False,
        )
        return out[0]
    rows = input_ids.shape[0]
    prefix = shared_prefix_length(input_ids, mask) if share_prefix and rows > 1 else 0
    if prefix < MIN_SHARED_PREFIX:
        return inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    head = inner(input_ids=input_ids[:1, :prefix], use_cache=True)
    cache = head.past_key_values
    cache.batch_repeat_interleave(rows)  # [1, heads, prefix, dim] -> [rows, ...], differentiable
    positions = torch.arange(prefix, input_ids.shape[1], device=input_ids.device).expand(rows, -1)
    tail = inner(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(inner): cache},
    )
    return torch.cat([head[0].expand(rows, -1, -1), tail[0]], dim=1)


@torch.no_grad()
def prefix_sharing_is_exact(model: nn.Module, example: Example, pad_id: int) -> bool:
    """Check once per run that the shared-prefix forward equals the plain one on this model.

    Most decoder implementations take a repeated key/value cache as is; a few handle
    positions or masks with a cache differently (GPT-2 in transformers 5), and those run
    without sharing. The probe is two rows made from one example: a shared prefix, one row
    two tokens shorter (so right padding is exercised too).
    """
    ids = example.input_ids[:64]
    if len(ids) < MIN_SHARED_PREFIX + 3:
        return False
    other = ids[:-3] + [ids[-1]]
    batch = collate([Example(ids, ids, "probe"), Example(other[:-1], other[:-1], "probe")], pad_id)
    batch = on_device(batch, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        plain = decoder_hidden(model, batch, share_prefix=False).float()
        shared = decoder_hidden(model, batch, share_prefix=True).float()
    except Exception as exc:  # a decoder that refuses a cache here: no sharing
        logger.debug("shared-prefix forward failed (%s); using the plain forward", exc)
        return False
    finally:
        model.train(was_training)
    mask = batch["attention_mask"].bool()
    error = (plain - shared)[mask].abs().max() / plain[mask].abs().max().clamp_min(1e-6)
    return bool(error < 1e-2)


def _cache_kwarg(inner: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning)
    import inspect

    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def loss_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    compute_dtype: torch.dtype,
    *,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a micro-batch over its labelled tokens, and their count."""
    hidden = decoder_hidden(model, batch, share_prefix=share_prefix)
    head = model.get_output_embeddings()
    if is_plain_linear(head) and head.bias is None:
        return fused_lm_loss_sum(hidden, head.weight, batch["labels"], compute_dtype=compute_dtype)
    return head_lm_loss_sum(hidden, head, batch["labels"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    compute_dtype: torch.dtype,
    runtime: Runtime,
    *,
    share_prefix: bool = True,
) -> tuple[float, int]:
    """Mean loss over the labelled tokens of `examples` (teacher-forced), and the token count."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    lengths = [len(e) for e in examples]
    # large batches: one shared-prefix pass serves many rows (no backward, so memory is small)
    batches = length_grouped_batches(lengths, 32, shuffle=False, max_tokens=EVAL_BATCH_TOKENS)
    for indices in runtime.shard(batches):
        device = next(model.parameters()).device
        batch = on_device(collate([examples[i] for i in indices], pad_id), device)
        with autocast(compute_dtype, device):
            loss, count = loss_sum(model, batch, compute_dtype, share_prefix=share_prefix)
        if runtime.is_padding(indices):  # run only to keep FSDP ranks in step
            continue
        total += loss.item()
        tokens += count
    total, tokens = runtime.all_reduce_sum([total, float(tokens)])
    model.train(was_training)
    return total / max(tokens, 1.0), int(tokens)


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu"):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def training_device() -> torch.device:
    """The accelerator this process owns (torchrun's LOCAL_RANK was set as current), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return (
        batch
        if device.type == "cpu"
        else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    )


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


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
    from graftlm.models import load_model

    runtime = runtime or Runtime.single()
    cfg = cfg.with_method_defaults()
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = training_device()
    compute_dtype = _compute_dtype(cfg.dtype, device)
    metrics_path = out / "metrics.jsonl"
    state = ckpt.read(out) if cfg.resume else None
    if cfg.resume and state is None:
        raise GraftError(f"--resume: no checkpoint in {out / ckpt.FOLDER}")
    if state is not None:
        ckpt.check_settings(state, cfg)
    elif runtime.is_main and metrics_path.exists() and not cfg.resume:
        raise GraftError(
            f"{out} already holds a training run (metrics.jsonl); use --resume or another --out"
        )

    for label, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path and not Path(path).is_file():
            raise GraftError(f"{label} {path}: file not found")
    torch.manual_seed(cfg.seed)
    # Frozen base weights are held in the compute dtype: no per-step casts of the big matrices.
    model, tokenizer = load_model(cfg.model, dtype=compute_dtype)
    model.to(device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

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

    method = method_module(cfg.method)
    base_fingerprint(model)  # of the untouched base: methods that wrap modules change names
    summary = method.attach(model, cfg)
    runtime.log(str(summary))
    planned = memory_accounting(model, None)
    runtime.log(
        f"memory: base weights {planned['base_weight_bytes'] / 1e6:.1f} MB, adapter "
        f"{planned['adapter_bytes'] / 1e6:.1f} MB, AdamW state "
        f"{2 * planned['adapter_bytes'] / 1e6:.1f} MB (two moments per trainable value)"
    )
    checkpointing = needs_checkpointing(cfg, examples)
    pass_tokens = tokens_per_pass(cfg, checkpointing)
    if cfg.low_memory:
        threshold = CHECKPOINTED_MMAP_THRESHOLD if checkpointing else LOW_MEMORY_MMAP_THRESHOLD
        return_freed_memory_to_os(threshold)
    if checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runtime.log("activation checkpointing on")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    runtime.prepare(model, params, fsdp=cfg.fsdp)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
    )
    total_steps = count_steps(len(examples), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.warmup_ratio)
    )
    hooks_class = getattr(method, "TrainingHooks", None)
    hooks = hooks_class(model, cfg, total_steps) if hooks_class else None
    plan = step_batches(examples, cfg, total_steps)
    eval_every = cfg.eval_every or max(1, total_steps // 3)
    with autocast(compute_dtype, device):
        # activation checkpointing recomputes layers without a cache: no sharing with it
        share_prefix = not checkpointing and prefix_sharing_is_exact(
            model, max(examples, key=len), pad_id
        )
    logger.debug("shared-prefix forward: %s", "on" if share_prefix else "off")

    start_step, elapsed_before = 0, 0.0
    if state is not None:
        start_step, elapsed_before = ckpt.restore(state, model, optimizer, scheduler, names, hooks)
        _truncate_metrics(metrics_path, start_step) if runtime.is_main else None
        runtime.log(f"resumed from step {start_step}/{total_steps}")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step_reached: int, elapsed_s: float) -> None:
        ckpt.write(
            out,
            model,
            optimizer,
            scheduler,
            names,
            step=step_reached,
            elapsed_s=elapsed_s,
            cfg=cfg,
            hooks=hooks,
        )

    bar = _progress(total_steps, start_step, enabled=progress and runtime.is_main)
    last_loss = eval_loss = None
    interrupted = False
    t0 = time.perf_counter()
    step = start_step
    kernels = fused_forwards(model) if cfg.fused_kernels else contextlib.nullcontext(0)
    with StopFlag() as flag, kernels as fused, logits_buffer_scope():
        logger.debug("fused kernels on %d modules", fused)
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            chunks = micro_batches(plan[step], examples, cfg, runtime, pass_tokens)
            labelled = sum(sum(1 for y in examples[i].labels[1:] if y != -100) for i in plan[step])
            tokens = sum(len(examples[i]) for i in plan[step])
            total_loss = 0.0
            for indices in chunks:
                batch = on_device(collate([examples[i] for i in indices], pad_id), device)
                with autocast(compute_dtype, device):
                    loss, _ = loss_sum(model, batch, compute_dtype, share_prefix=share_prefix)
                if runtime.is_padding(indices):  # run only to keep FSDP ranks in step
                    loss = loss * 0.0
                objective = loss / max(labelled, 1)
                extra = hooks.extra_loss() if hooks else None
                if extra is not None:  # a regularizer: its share per micro-batch
                    objective = objective + extra * (len(indices) / len(plan[step]))
                objective.backward()
                total_loss += loss.item()
            runtime.reduce_gradients(params)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if cfg.grad_clip
                else _norm(params)
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            if hooks:
                hooks.after_step(step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # ranks agree on stopping: a signal may reach them on either side of a step
            total_loss, stops = runtime.all_reduce_sum([total_loss, float(flag.stop)])
            stop = stops > 0
            last_loss = total_loss / max(labelled, 1)
            elapsed = elapsed_before + time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": round(last_loss, 6),
                "lr": lr,
                "tokens": tokens,
                "labelled_tokens": labelled,
                "tokens_per_s": round(tokens / max(time.perf_counter() - step_start, 1e-9), 1),
                "elapsed_s": round(elapsed, 3),
                "grad_norm": round(float(grad_norm), 5),
                "epoch": round((step + 1) * cfg.batch_size / len(examples), 4),
            }
            done = step + 1
            if eval_examples and (done % eval_every == 0 or done == total_steps):
                eval_loss, eval_tokens = evaluate(
                    model, eval_examples, pad_id, compute_dtype, runtime, share_prefix=share_prefix
                )
                release_logits_buffer()  # evaluation's passes are larger than training's
                row_eval = {
                    "step": done,
                    "eval_loss": round(eval_loss, 6),
                    "eval_tokens": eval_tokens,
                    "elapsed_s": round(elapsed, 3),
                }
            else:
                row_eval = None
            if runtime.is_main:
                _append_metrics(metrics_path, row, row_eval)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_loss:.4f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    **({"eval": f"{eval_loss:.4f}"} if row_eval else {}),
                )
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
        save_trained(
            model,
            out,
            cfg.method,
            training={
                "steps": total_steps,
                "epochs": round(total_steps * cfg.batch_size / len(examples), 3),
                "examples": len(examples),
                "final_loss": last_loss,
                "eval_loss": eval_loss,
                "train_seconds": round(train_seconds, 1),
                "data": os.path.basename(cfg.data),
                "settings": cfg.to_dict(),
                "memory": memory,
            },
        )
        _plot(metrics_path, out / "loss.png")
        # the finished run keeps its checkpoint: --resume on it is a no-op
        save_checkpoint(total_steps, train_seconds)
        runtime.log(f"adapter written to {out} ({train_seconds:.0f} s of training)")
        runtime.log(f"memory: {format_memory(memory)}")
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


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def _append_metrics(path: Path, row: dict, eval_row: dict | None) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        if eval_row:
            handle.write(json.dumps(eval_row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint, so a resumed run's file has each step once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _plot(metrics_path: Path, png: Path) -> None:
    """loss.png: training loss per step (and a smoothed line), eval loss as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        (eval_rows if "eval_loss" in row else train_rows).append(row)
    if not train_rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in train_rows]
    losses = [r["loss"] for r in train_rows]
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="#3182bd", linewidth=2, label=f"train loss (mean of {window})")
    if eval_rows:
        ax.plot(
            [r["step"] for r in eval_rows],
            [r["eval_loss"] for r in eval_rows],
            "o-",
            color="#e6550d",
            label="eval loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (labelled tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
