"""A CPU step's time from its parts, each timed at the model's own shapes on this machine.

FLOPs over one matrix-product rate (`plan/timing.py`) misses most of a CPU step: the products
are skinny (a pass of a few hundred tokens; LoRA's rank-r products move bytes, not FLOPs), and
the element-wise work (norms, rotary, SwiGLU, casts, NF4 dequantization) is ~40% of the time.
A decoder-only model's step is the same decoder layer `layers` times, the output head with the
fused loss, and the optimizer, so the plan times exactly those parts, built at the model's real
widths, with the method attached, under graftlm's own training forward and backward
(`train/forward.py: loss_sum`, fused kernels, autocast, activation checkpointing as the run):

    pass      = layers x (one layer's forward + backward) + head and loss (forward + backward)
    step      = passes x pass x (pass tokens / measured tokens) + optimizer
    one layer = time(2 layers) - time(1 layer), on models with a 256-word vocabulary: the
                median of `PAIRS` differences of steps timed back to back
    head      = `fused_lm_loss_sum` on random hidden states at the real vocabulary
    optimizer = gradient clipping, AdamW's step and zero_grad over one layer's trainable values,
                scaled to all of them

Each part is read cold, as in a real step, where the other layers pass through the cache
between a layer's forward and its backward: a buffer bigger than the last-level cache is written
before each timed forward and backward (not timed), and AdamW runs on as many values as the run
trains (up to `MEASURE_OPTIMIZER_PARAMS`), not a 2-layer model's few, cached MB.

Nothing is fitted: the layer is a median of paired differences, the head and the optimizer the
best of `REPEATS` timings, each after a warm-up. A --low-memory run's allocator settings
(unmapped blocks, heap trims) are applied as the run applies them, for the rest of the process.
A pass bigger than `MEASURE_FLOPS` is measured on fewer sequences (and, past that, fewer
tokens) and scaled linearly; the attention's quadratic share then grows less than it should.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graftlm.kernels.fused_ops import fused_forwards
from graftlm.plan.activations import attached_model
from graftlm.plan.shapes import ModelShape
from graftlm.train.checkpointing import enable as enable_checkpointing
from graftlm.train.config import TrainConfig
from graftlm.train.forward import autocast, loss_sum
from graftlm.train.loss import fused_lm_loss_sum
from graftlm.train.memory import release_free_heap, return_freed_memory_to_os
from graftlm.train.step import low_memory_mmap_threshold, make_optimizer

REPEATS = 3
# 2-layer minus 1-layer step pairs per layer timing (more while they add up to under 1 s)
PAIRS = 5
# matrix-product FLOPs of one measured layer pass at most (~0.3 s on one core of this machine):
# keeps `graftlm plan` quick on 7B-70B shapes
MEASURE_FLOPS = 1e11
SMALL_VOCAB = 256
# the largest decoder layer timed (parameters; an 8B model's are ~220M): a 70B layer in the fp32
# of full fine-tuning would take GBs to time, and such a plan keeps the FLOP model
MEASURE_LAYER_PARAMS = 300_000_000
# AdamW is timed on at most this many values and scaled (it moves bytes: linear in the count).
# Not fewer: its cost per value still grows past the last-level cache (one thread of the
# 2-core Xeon: 4.6 ns at 32M values, 5.3 at 96M, 6.0 at 256M; page and TLB misses), and a 32M
# cap made the 0.5B full fine-tune's step 30% too short. 128M values take ~2 GB while timed.
MEASURE_OPTIMIZER_PARAMS = 128_000_000


@dataclass(frozen=True)
class StepParts:
    """Seconds of each part of a step, measured on a pass of `rows` x `seq_len` tokens."""

    layer: float  # one decoder layer, forward + backward (+ recomputation with checkpointing)
    head: float  # output head + fused loss, forward + backward
    optimizer: float  # clipping + AdamW step over all trainable values
    rows: int
    seq_len: int

    def step_seconds(self, layers: int, passes: int, pass_tokens: int) -> float:
        """One optimizer step of `passes` passes of `pass_tokens` tokens each."""
        scale = pass_tokens / (self.rows * self.seq_len)
        return passes * (layers * self.layer + self.head) * scale + self.optimizer


def _paired_difference(run_more, run_fewer) -> float:
    """One layer's seconds: the median of `PAIRS` differences between a 2-layer and a 1-layer
    model's steps, timed one right after the other (after a warm-up of each).

    The difference of two separately taken minima swung by 2x between plans made a minute
    apart (the 1.1B LoRA at 2 x 128 tokens: 2.46 s then 5.02 s a step, against 2.2 s measured
    both times): a layer is a small part of each model's step, so the noise of either minimum
    is multiplied by the layer count. Pairs taken back to back see the same machine, and their
    median drops the pairs that one interruption hit."""
    run_more(), run_fewer()
    differences, spent = [], 0.0
    while len(differences) < PAIRS or (len(differences) < 3 * PAIRS and spent < 1.0):
        more, fewer = run_more(), run_fewer()
        differences.append(more - fewer)
        spent += more + fewer
    return max(0.0, statistics.median(differences))


def _best(run) -> float:
    """The least of `run()`'s returned seconds: after a warm-up (kernel selection, the
    allocator's first blocks), `REPEATS` runs, or up to 6 while they add up to under half a
    second (a small model's parts are short, and noisier)."""
    run()
    best, spent, runs = math.inf, 0.0, 0
    while runs < REPEATS or (runs < 6 and spent < 0.5):
        seconds = run()
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return best


def _cache_bytes() -> int:
    """Bytes that evict the CPU's last-level cache: its size, 64 MiB to 320 MiB (a VM reports
    its host's whole cache, of which it holds a share)."""
    size = 32 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
    except (OSError, ValueError):
        pass
    return min(max(size, 64 << 20), 320 << 20)


class _Evict:
    """Read a buffer bigger than the last-level cache: in a real step each layer's weights
    are read cold (the other layers and their activations passed through the cache since),
    while a 2-layer model's would stay cached between its forward and backward.

    Read, not written: a written buffer leaves the cache full of dirty lines, whose write-back
    to memory the timed work that follows would pay (a real step's cache holds mostly weights
    and activations read since their last write)."""

    def __init__(self) -> None:
        self.buffer = torch.ones(_cache_bytes() // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def layer_params(shape: ModelShape) -> float:
    """Weights of one decoder layer's linear layers."""
    return sum(lin.out_features * lin.in_features for lin in shape.linears) / shape.layers


def measurable(shape: ModelShape) -> bool:
    """Whether a layer of `shape` is small enough to time here (else the FLOP model)."""
    return layer_params(shape) <= MEASURE_LAYER_PARAMS


def measured_shape(shape: ModelShape, micro_batch: int, seq_len: int) -> tuple[int, int]:
    """(rows, tokens per row) of the measured pass: the run's, or fewer where one layer's
    products would pass `MEASURE_FLOPS`."""
    max_tokens = max(64, int(MEASURE_FLOPS // (6 * layer_params(shape))))  # forward 2, backward 4
    if micro_batch * seq_len <= max_tokens:
        return micro_batch, seq_len
    if seq_len <= max_tokens:
        return max_tokens // seq_len, seq_len
    return 1, max_tokens


def measure_step_parts(
    shape: ModelShape,
    cfg: TrainConfig,
    method: str,
    dtype: torch.dtype,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    trainable_params: int,
) -> StepParts:
    """Time one layer, the head and the optimizer of `method`'s step (see the module docstring).

    Args:
        shape: the model.
        cfg: the run's settings (rank, targets, the optimizer).
        method: as `plan/activations.py: attached_model` takes it.
        dtype: the compute dtype.
        micro_batch, seq_len: the run's pass.
        checkpointing: layers recompute their forward in the backward.
        trainable_params: trainable values of the whole model (the optimizer's share).
    """
    rows, tokens = measured_shape(shape, micro_batch, seq_len)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMALL_VOCAB, (rows, tokens), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    evict = _Evict()
    if cfg.low_memory:
        # as the run's allocator: freed big blocks unmapped (page faults on the next), the heap
        # trimmed after each checkpointed forward and each step (`train/step.py`); process-wide
        return_freed_memory_to_os(low_memory_mmap_threshold(checkpointing, dtype))

    def step(model) -> float:
        evict()
        start = time.perf_counter()
        with autocast(dtype):
            loss, _ = loss_sum(model, batch, dtype, share_prefix=False)
        if cfg.low_memory and checkpointing:
            release_free_heap()
        forward = time.perf_counter() - start
        evict()
        start = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cfg.low_memory:
            release_free_heap()
        return forward + time.perf_counter() - start

    with contextlib.ExitStack() as stack:
        models = {}
        for layers in (1, 2):
            model = attached_model(
                shape, cfg, method, dtype, 1, layers, SMALL_VOCAB, quick_init=True
            )
            if checkpointing:
                enable_checkpointing(model)
            stack.enter_context(fused_forwards(model))
            models[layers] = model
        more, fewer = models[2], models[1]
        layer = _paired_difference(functools.partial(step, more), functools.partial(step, fewer))
        optimizer_seconds = _optimizer_seconds(more, cfg, trainable_params)
    del models, model, more, fewer  # before the head's timing allocates its own
    head = _head_seconds(shape, method, dtype, rows, tokens, generator, evict)
    return StepParts(layer, head, optimizer_seconds, rows, tokens)


def _head_seconds(shape, method, dtype, rows, tokens, generator, evict) -> float:
    """The output head and fused loss on random hidden states at the real vocabulary."""
    # full fine-tuning trains the head in fp32 master weights; adapters leave it frozen in dtype
    full = method == "full"
    weight = (torch.randn(shape.vocab, shape.hidden, generator=generator) * 0.02).to(
        torch.float32 if full else dtype
    )
    weight.requires_grad_(full)
    hidden = torch.randn(rows, tokens, shape.hidden, generator=generator).to(dtype)
    hidden.requires_grad_(True)
    labels = torch.randint(0, shape.vocab, (rows, tokens), generator=generator)

    def run() -> float:
        evict()
        start = time.perf_counter()
        with autocast(dtype):
            loss, _ = fused_lm_loss_sum(hidden, weight, labels, compute_dtype=dtype)
        loss.backward()
        hidden.grad = weight.grad = None
        return time.perf_counter() - start

    return _best(run)


def _optimizer_seconds(model, cfg: TrainConfig, trainable_params: int) -> float:
    """Clip + AdamW step + zero_grad, scaled to the run's trainable values.

    Timed on tensors of the model's trainable shapes, repeated up to the run's count (at most
    `MEASURE_OPTIMIZER_PARAMS`): AdamW makes several passes over values, gradients and moments,
    which run from the cache for a 2-layer model's few MB and from memory for a real model's."""
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    if not shapes:
        return 0.0
    target = min(trainable_params, MEASURE_OPTIMIZER_PARAMS)
    params, count = [], 0
    while count < target:
        for shape in shapes:
            params.append(torch.zeros(shape, requires_grad=True))
            count += params[-1].numel()
    optimizer, _ = make_optimizer(params, cfg, total_steps=10)

    def run() -> float:
        start = time.perf_counter()
        # timed too: a run's zero_grad(set_to_none) frees the gradients, so each backward writes
        # them to fresh pages (big blocks are mmapped), whose page faults the layer timings of a
        # 2-layer model, with its few small, reused gradient blocks, do not see
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return _best(run) * trainable_params / count  # the warm-up allocates AdamW's moments
