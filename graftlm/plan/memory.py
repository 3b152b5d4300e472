"""Where a run's memory goes, before it starts: weights, adapter, optimizer, activations, peak.

The terms follow `graftlm train` (`train/step.py`, `train/steps.py`, `train/loss.py`):

- the base weights in the compute dtype (QLoRA: its linear layers in NF4 with double-quantized
  scales, `quant/nf4.py`, byte for byte, plus the one reused dequantization buffer);
- the trainable values in fp32, their fp32 gradients and AdamW's two fp32 moments (full
  fine-tuning: fp32 master weights, and under bf16 autocast their cached bf16 copies);
- with `--ema-decay`, the fp32 moving average of the trainable values, and the step's own values
  kept aside while validation scores the average (`train/weight_average.py`);
- a micro-batch's activations, measured on a scaled-down model (`plan/activations.py`); with
  activation checkpointing each layer keeps only its input, and one layer at a time is
  recomputed in full;
- the fused loss's workspace: a kept fp32 logits buffer of up to 1024 rows x vocabulary, and its
  compute-dtype temporaries (`train/loss.py`);
- the runtime (Python, torch, transformers, tokenizer) and the allocator's slack.

The peak is the larger of loading (weights being read, one tensor's read buffer beside them;
a QLoRA base is read whole before it is quantized, and its freed full-precision weights stay
in the heap beside their NF4 copies until the trim after attach) and training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graftlm.plan.activations import ActivationProfile
from graftlm.plan.shapes import ModelShape, Trainable
from graftlm.train.step import LOW_MEMORY_LOSS_ROWS  # rows per projection in --low-memory

NF4_BLOCK, NF4_GROUP = 64, 256  # graftlm's QLoRA format (quant/nf4.py)
LOSS_CHUNK = 1024  # rows the fused loss projects at once (train/loss.py: fused_lm_loss_sum)
# The resident memory of a `graftlm train` process before any weight is read (Python, torch,
# transformers, the tokenizer: 0.39 GB measured here, 2026-12-05, plus the data), and of a CUDA
# context.
RUNTIME_BYTES = {"cpu": 450 * 2**20, "cuda": 600 * 2**20}
# What the allocator holds beyond the live tensors: freed blocks kept for reuse, one layer's
# backward temporaries, as a share of the activations and loss workspace (checked against
# measured peaks in bench/results/plan_validation.txt).
SLACK = 0.25


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight in graftlm's NF4 format: packed codes, 8-bit block scales, one fp32
    scale per 256 blocks, the fp32 offset (`NF4Tensor.nbytes`)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_GROUP) + 4


@dataclass(frozen=True)
class RunShape:
    """How the run is cut: sequences per step and per pass, tokens per sequence, precision."""

    method: str
    batch_size: int
    micro_batch_size: int
    seq_len: int
    dtype_bytes: int  # the compute dtype: 2 (bf16) or 4 (fp32)
    checkpointing: bool
    device: str = "cpu"
    weight_average: bool = False  # --ema-decay: an fp32 average of the trainable tensors
    low_memory: bool = False  # --low-memory: fewer rows per vocabulary projection


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of each term of a run's memory, and the peak."""

    base_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    loss_workspace: int
    runtime: int
    slack: int
    load_peak: int
    weight_average: int = 0

    @property
    def training(self) -> int:
        return (
            self.base_weights
            + self.trainable_weights
            + self.gradients
            + self.optimizer_state
            + self.weight_average
            + self.activations
            + self.loss_workspace
            + self.runtime
            + self.slack
        )

    @property
    def peak(self) -> int:
        return max(self.training, self.load_peak)


def base_weight_bytes(shape: ModelShape, run: RunShape) -> int:
    """The frozen weights as the run holds them (all of them for full fine-tuning: trainable)."""
    if run.method == "full":
        return 0
    if run.method != "qlora":
        return shape.total_params * run.dtype_bytes
    quantized = [lin.out_features * lin.in_features for lin in shape.linears]
    rest = shape.total_params - sum(quantized)  # embeddings, norms, head, biases
    # NF4 layers dequantize into one reused buffer the size of the largest weight
    return sum(nf4_bytes(n) for n in quantized) + (rest + max(quantized)) * run.dtype_bytes


def memory_breakdown(
    shape: ModelShape, adapter: Trainable, profile: ActivationProfile, run: RunShape
) -> MemoryBreakdown:
    """Every term of the run's memory (bytes)."""
    n = adapter.params
    if run.method == "full":
        # fp32 master weights (methods/full: loaded in float32); under bf16 autocast the
        # matrix products use bf16 copies of them, cached for the forward and the backward
        autocast_copies = 2 * n if run.dtype_bytes < 4 else 0
        trainable_weights, gradients = 4 * n + autocast_copies, 4 * n
    else:
        trainable_weights, gradients = 4 * n, 4 * n
    tokens = run.micro_batch_size * run.seq_len
    if run.checkpointing:
        kept = shape.layers * profile.layer_input + profile.per_layer
    else:
        kept = shape.layers * profile.per_layer
    activations = tokens * (kept + profile.outside_layers)
    chunk = LOW_MEMORY_LOSS_ROWS if run.low_memory else LOSS_CHUNK
    rows = min(chunk, run.micro_batch_size * (run.seq_len - 1))
    # the kept fp32 logits buffer; in bf16 also the product and the gradient of one chunk, except
    # on the CPU, whose C kernel works in place over the buffer seen as bf16 (half its bytes)
    if run.device == "cpu" and run.dtype_bytes < 4:
        loss = rows * shape.vocab * run.dtype_bytes
    else:
        loss = rows * shape.vocab * (4 + (2 * run.dtype_bytes if run.dtype_bytes < 4 else 0))
    runtime = RUNTIME_BYTES.get(run.device, RUNTIME_BYTES["cpu"])
    weights = shape.total_params * (4 if run.method == "full" else run.dtype_bytes)
    # a file's tensor is read whole before the cast, in host memory (a GPU receives it cast)
    read_buffer = shape.largest_tensor * shape.file_dtype_bytes if run.device == "cpu" else 0
    load_peak = runtime + weights + read_buffer
    if run.method == "qlora" and run.device == "cpu":
        # each linear layer turns 4-bit as its weight is read (`load_model(quantize="nf4")`), and
        # its full-precision weight is never written (docs/architecture.md, "Memory of a load"):
        # the base as the run holds it (but the dequantization buffer, which the first step
        # allocates), the file's tensor being read and one layer's fp32 copy that the
        # quantization works on
        largest = max(lin.out_features * lin.in_features for lin in shape.linears)
        held = base_weight_bytes(shape, run) - largest * run.dtype_bytes
        load_peak = runtime + held + read_buffer + 4 * largest
    return MemoryBreakdown(
        base_weights=base_weight_bytes(shape, run),
        trainable_weights=trainable_weights,
        gradients=gradients,
        optimizer_state=8 * n,
        activations=activations,
        loss_workspace=loss,
        runtime=runtime,
        slack=int(SLACK * (activations + loss)),
        load_peak=load_peak,
        # the fp32 average, and the step's own tensors kept aside while validation scores it
        weight_average=8 * n if run.weight_average else 0,
    )


def largest_fit(fits, low: int, high: int) -> int:
    """The largest value in [low, high] for which `fits(value)` holds (0 if none); `fits` grows
    false as the value grows."""
    if not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
