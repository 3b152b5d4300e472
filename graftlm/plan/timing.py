"""Time of a step from its FLOPs: over a given GPU rate, or beside the CPU plan's timed parts.

`graftlm plan` on a CPU times the step's parts at the model's own widths (`plan/step_time.py`);
this FLOP model is what a given rate (`--matmul-tflops`, a GPU) plans with, and what the plan
shows beside the timed one (`flops_step_seconds`; both against measured steps:
bench/results/plan_validation.txt).

Per token, with N the weights of the linear layers a token passes through (the output head
included: the plan assumes every token has a label, the fused loss projects only those):

    forward                      2 N   + attention 2 x seq x d_attn per layer (causal: half of
                                         QK^T and AV over the context)
    backward, activations        2 N   + attention twice its forward
    backward, weight gradients   2 x (trainable values in linear layers): LoRA's A and B,
                                 every weight for full fine-tuning
    recomputation                one more forward when activation checkpointing is on

A CPU step is not only matrix products: the element-wise work (norms, rotary, SwiGLU, casts,
the optimizer) grows with the bytes of activations written and read. So the estimate is

    seconds = FLOPs / matmul rate + PASSES x activation bytes / element-wise rate

with both rates measured here by a short torch run in the compute dtype (`measure_rates`), or a
matmul rate the user gives (`--matmul-tflops`, for a GPU: the element-wise term is then left out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from graftlm.plan.shapes import ModelShape

# How many times the element-wise ops of a step read or write each byte of kept activations:
# written once and read once in the forward, read, and its gradient written and read, in the
# backward, plus the casts. An estimate: the validation runs shared the machine with other jobs
# and could not check step times (bench/results/plan_validation.txt)
PASSES = 6.0
# NF4 layers dequantize their weight on every use: passes over the weight per forward / backward
DEQUANT_PASSES = 2.0


@dataclass(frozen=True)
class Rates:
    """Measured (or given) speeds: FLOP/s of a matrix product and bytes/s of an element-wise op."""

    matmul_flops: float
    elementwise_bytes: float | None  # None: not modelled (a given GPU rate)
    measured: bool


def measure_rates(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> Rates:
    """Time a `size` x `size` matrix product and an element-wise multiply-add in `dtype` on the
    CPU; the best of `repeats` (the others were slowed by something else on the machine)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    x = torch.randn(16 * 2**20 // 4).to(dtype)
    y = torch.empty_like(x)
    best_mm = best_ew = float("inf")
    torch.matmul(a, b)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        torch.mul(x, 1.0001, out=y).add_(x)
        best_ew = min(best_ew, time.perf_counter() - start)
    # the multiply-add reads x twice and writes y twice
    return Rates(2 * size**3 / best_mm, 4 * x.numel() * x.element_size() / best_ew, True)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token of one training step, by part."""

    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def step_flops(
    shape: ModelShape, trainable_linear: int, full: bool, seq_len: int, checkpointing: bool
) -> StepFlops:
    """FLOPs per token (see the module docstring).

    Args:
        shape: the model.
        trainable_linear: trainable values that are multiplied with activations (LoRA's A and
            B; every linear weight for full fine-tuning).
        full: every weight trains (weight gradients for all of N).
        seq_len: tokens per sequence (attention's context).
        checkpointing: the forward runs twice.
    """
    linear = sum(lin.out_features * lin.in_features for lin in shape.linears)
    head = shape.vocab * shape.hidden
    n = linear + head
    attention = 2.0 * seq_len * shape.heads * shape.head_dim * shape.layers
    extra = 0 if full else trainable_linear  # LoRA's own products, forward
    forward = 2.0 * (n + extra) + attention
    weight_grads = 2.0 * (linear + head if full else trainable_linear)
    backward = 2.0 * (n + extra) + 2 * attention + weight_grads
    return StepFlops(forward, backward, forward if checkpointing else 0.0)


def step_seconds(
    flops: StepFlops,
    tokens: int,
    activation_bytes: int,
    dequant_bytes: int,
    rates: Rates,
) -> float:
    """Seconds of one optimizer step of `tokens` tokens.

    Args:
        flops: per token.
        tokens: tokens per optimizer step.
        activation_bytes: bytes kept per token (all layers), read and written element-wise.
        dequant_bytes: bytes of NF4 weights dequantized per pass (0 unless QLoRA), times the
            passes of the step.
        rates: measured or given speeds.
    """
    seconds = flops.total * tokens / rates.matmul_flops
    if rates.elementwise_bytes:
        moved = PASSES * activation_bytes * tokens + DEQUANT_PASSES * dequant_bytes
        seconds += moved / rates.elementwise_bytes
    return seconds
