"""`plan_run`: a fine-tune's memory and time before it starts, beside full fine-tuning's; its text
and JSON forms (`graftlm plan`, and `graftlm train`'s check before it loads the data)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from graftlm.errors import GraftError, check_choice, check_fraction
from graftlm.methods import REGISTRY
from graftlm.plan import METHODS
from graftlm.plan.activations import ActivationProfile, activation_profile
from graftlm.plan.memory import (
    MemoryBreakdown,
    RunShape,
    largest_fit,
    memory_breakdown,
)
from graftlm.plan.shapes import ModelShape, Trainable, trainable
from graftlm.plan.step_time import measurable, measure_step_parts
from graftlm.plan.timing import Rates, measure_rates, step_flops, step_seconds
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import bf16_supported
from graftlm.train.steps import needs_checkpointing, tokens_per_pass

DEVICES = ("cpu", "cuda")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
QUANTIZED = ("qlora", "qdora")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a model (its config) and a run's settings, as `graftlm plan` takes them."""

    method: str = "lora"
    rank: int | None = None
    targets: str | None = None
    batch_size: int = 16
    micro_batch_size: int | None = None
    seq_len: int = 1024
    device: str = "cpu"
    dtype: str = "auto"
    activation_checkpointing: bool | None = None
    memory: int | None = None  # bytes available; None: no fit search
    matmul_tflops: float | None = None
    examples: int = 1000  # sequences of an epoch
    ema_decay: float = 0.0  # --ema-decay: 0 keeps no weight average

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("device", self.device, DEVICES)
        check_choice("dtype", self.dtype, ("auto", *DTYPE_BYTES))
        for name in ("batch_size", "seq_len", "examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GraftError(f"{name} should be a positive integer, got {value!r}")
        for name in ("rank", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise GraftError(f"{name} should be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise GraftError(f"seq_len should be at least 2, got {self.seq_len!r}")
        check_fraction("ema_decay", self.ema_decay)
        if self.matmul_tflops is not None and self.matmul_tflops <= 0:
            raise GraftError(f"matmul_tflops should be positive, got {self.matmul_tflops!r}")


@dataclass(frozen=True)
class MethodPlan:
    """One method's numbers."""

    method: str
    run: RunShape
    trainable: Trainable
    adapter_bytes: int  # as graftlm saves it: fp32 adapters, full weights in the compute dtype
    adapter_bytes_16bit: int  # the same tensors in fp16 / bf16 (what other tools often quote)
    memory: MemoryBreakdown
    profile: ActivationProfile  # bytes per token kept: re-plans other micro-batches
    flops_per_token: float
    step_seconds: float
    flops_step_seconds: float  # FLOPs / matmul rate (+ element-wise term): the GPU form
    largest_micro_batch: int | None
    largest_seq_len: int | None


@dataclass(frozen=True)
class Plan:
    """The plan of the asked method and, beside it, of full fine-tuning."""

    source: str
    shape: ModelShape
    request: PlanRequest
    rates: Rates
    chosen: MethodPlan
    full: MethodPlan | None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.request.examples // self.request.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`graftlm plan --json`): flat keys for the asked method, `full` beside."""
        out = {
            "model": self.source,
            "model_type": self.shape.model_type,
            "total_params": self.shape.total_params,
            **_method_dict(self.chosen),
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_seconds": round(self.chosen.step_seconds * self.steps_per_epoch, 1),
            "matmul_flops_per_s": round(self.rates.matmul_flops)
            if math.isfinite(self.rates.matmul_flops)
            else None,
            "elementwise_bytes_per_s": round(self.rates.elementwise_bytes)
            if self.rates.elementwise_bytes
            else None,
            "rates_measured": self.rates.measured,
        }
        if self.full is not None:
            out["full"] = _method_dict(self.full)
        return out


def _method_dict(plan: MethodPlan) -> dict[str, Any]:
    mem = plan.memory
    return {
        "method": plan.method,
        "dtype_bytes": plan.run.dtype_bytes,
        "batch_size": plan.run.batch_size,
        "micro_batch_size": plan.run.micro_batch_size,
        "seq_len": plan.run.seq_len,
        "activation_checkpointing": plan.run.checkpointing,
        "trainable_params": plan.trainable.params,
        "all_params": plan.trainable.total_params,
        "trainable_percent": round(plan.trainable.percent, 4),
        "adapter_bytes": plan.adapter_bytes,
        "adapter_bytes_16bit": plan.adapter_bytes_16bit,
        "base_weight_bytes": mem.base_weights,
        "trainable_weight_bytes": mem.trainable_weights,
        "gradient_bytes": mem.gradients,
        "optimizer_bytes": mem.optimizer_state,
        "weight_average_bytes": mem.weight_average,
        "activation_bytes": mem.activations,
        "loss_workspace_bytes": mem.loss_workspace,
        "runtime_bytes": mem.runtime,
        "slack_bytes": mem.slack,
        "load_peak_bytes": mem.load_peak,
        "training_peak_bytes": mem.training,
        "peak_bytes": mem.peak,
        "flops_per_token": round(plan.flops_per_token),
        "step_seconds": round(plan.step_seconds, 3),
        "flops_step_seconds": round(plan.flops_step_seconds, 3),
        "largest_micro_batch": plan.largest_micro_batch,
        "largest_seq_len": plan.largest_seq_len,
    }


def safetensors_bytes(tensors: dict[str, tuple[int, ...]], dtype_bytes: int = 4) -> int:
    """Size of a safetensors file holding `tensors` (key -> shape), all of one dtype, as
    `safetensors.torch.save(..., metadata={"format": "pt"})` writes it: 8 bytes of header length,
    the JSON header padded to 8 bytes, the data."""
    import json

    dtype = {2: "F16", 4: "F32"}.get(dtype_bytes, "BF16")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(tensors):
        size = dtype_bytes
        for dim in tensors[key]:
            size *= dim
        header[key] = {
            "dtype": dtype,
            "shape": list(tensors[key]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + -(-len(text) // 8) * 8 + offset


def plan_run(
    shape: ModelShape,
    request: PlanRequest,
    source: str = "",
    *,
    with_full: bool = True,
    timed: bool = True,
) -> Plan:
    """Plan `request` on `shape` (and full fine-tuning beside it, unless `with_full` is False;
    `timed=False` skips measuring the rates, and the times come out as 0)."""
    dtype = _compute_dtype(request)
    if not timed:
        rates = Rates(float("inf"), None, False)
    elif request.matmul_tflops is not None:
        rates = Rates(request.matmul_tflops * 1e12, None, False)
    else:
        rates = measure_rates(dtype)
    chosen = _plan_method(shape, request, request.method, dtype, rates)
    full = None
    if with_full and request.method != "full":
        full = _plan_method(shape, request, "full", dtype, rates)
    return Plan(source, shape, request, rates, chosen, full)


def _compute_dtype(request: PlanRequest) -> torch.dtype:
    if request.dtype == "auto":
        fast = request.device == "cuda" or bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, request.dtype)


def train_settings(request: PlanRequest, method: str) -> TrainConfig:
    """The TrainConfig `graftlm train` would run (a method graftlm trains under another name
    in this version, e.g. "full" before it lands, plans with LoRA's recipe)."""
    known = method in REGISTRY and method in _train_methods()
    cfg = TrainConfig(
        data="-",
        out="-",
        method=method if known else ("qlora" if method in QUANTIZED else "lora"),
        rank=request.rank,
        targets=request.targets,
        batch_size=request.batch_size,
        micro_batch_size=request.micro_batch_size,
        seq_len=request.seq_len,
        activation_checkpointing=request.activation_checkpointing,
    )
    return cfg.with_method_defaults()


def _train_methods() -> tuple[str, ...]:
    from graftlm.train import config

    return config.METHODS


def _plan_method(
    shape: ModelShape, request: PlanRequest, method: str, dtype: torch.dtype, rates: Rates
) -> MethodPlan:
    cfg = train_settings(request, method)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    checkpointing = needs_checkpointing(cfg, None)
    micro = cfg.micro_batch_size or max(1, tokens_per_pass(cfg, checkpointing) // request.seq_len)
    micro = min(micro, request.batch_size)
    base_method = "qlora" if method == "qdora" else method
    counted = dataclasses.replace(cfg, rank=cfg.rank or 8)
    adapter = trainable(shape, _with_method(counted, "dora" if method == "qdora" else method))
    run = RunShape(
        base_method, request.batch_size, micro, request.seq_len, dtype_bytes, checkpointing,
        request.device, weight_average=bool(request.ema_decay), low_memory=bool(cfg.low_memory),
    )  # fmt: skip
    profile = activation_profile(shape, counted, "dora" if method == "qdora" else method, dtype)
    memory = memory_breakdown(shape, adapter, profile, run)
    linear_trainable = sum(
        v for k, v in ((k, _numel(s)) for k, s in adapter.tensors.items()) if "lora_" in k
    )
    flops = step_flops(shape, linear_trainable, method == "full", request.seq_len, checkpointing)
    tokens = request.batch_size * request.seq_len
    kept = shape.layers * profile.per_layer + profile.outside_layers
    dequant = 0
    if base_method == "qlora":
        passes = -(-request.batch_size // micro) * (3 if checkpointing else 2)
        weights = sum(lin.out_features * lin.in_features for lin in shape.linears)
        dequant = passes * weights * dtype_bytes
    flops_seconds = step_seconds(flops, tokens, kept, dequant, rates)
    seconds = flops_seconds
    if _timed_by_parts(shape, request, rates):  # this machine's step, timed by its parts
        parts = measure_step_parts(
            shape, counted, "dora" if method == "qdora" else method, dtype, micro,
            request.seq_len, checkpointing, adapter.params,
        )  # fmt: skip
        passes = -(-request.batch_size // micro)
        seconds = parts.step_seconds(shape.layers, passes, micro * request.seq_len)
    largest_micro = largest_seq = None
    if request.memory is not None:

        def fits(change: dict) -> bool:
            trial = dataclasses.replace(run, **change)
            return memory_breakdown(shape, adapter, profile, trial).peak <= request.memory

        largest_micro = largest_fit(lambda m: fits({"micro_batch_size": m}), 1, 4096)
        largest_seq = largest_fit(lambda n: fits({"seq_len": n}), 2, 1 << 20)
    saved_bytes = 4  # adapters are fp32, and so are full fine-tuning's master weights
    return MethodPlan(
        method=method,
        run=run,
        trainable=adapter,
        adapter_bytes=safetensors_bytes(adapter.tensors, saved_bytes),
        adapter_bytes_16bit=safetensors_bytes(adapter.tensors, 2),
        memory=memory,
        profile=profile,
        flops_per_token=flops.total,
        step_seconds=seconds,
        flops_step_seconds=flops_seconds,
        largest_micro_batch=largest_micro,
        largest_seq_len=largest_seq,
    )


def _timed_by_parts(shape: ModelShape, request: PlanRequest, rates: Rates) -> bool:
    """A CPU plan with measured rates times the step's parts (`plan/step_time.py`); a given
    (GPU) rate, or a layer too large to time here, keeps the FLOP model."""
    return rates.measured and request.device == "cpu" and measurable(shape)


def _with_method(cfg: TrainConfig, method: str) -> TrainConfig:
    """`cfg` naming `method` even where TrainConfig does not know it yet (dora, full)."""
    copy = dataclasses.replace(cfg)
    object.__setattr__(copy, "method", method)
    return copy


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


# -- text ------------------------------------------------------------------------------------


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as a table: the asked method beside full fine-tuning."""
    plans = [plan.chosen] + ([plan.full] if plan.full is not None else [])
    shape, req = plan.shape, plan.request
    lines = [
        f"model: {plan.source} ({shape.model_type}, {shape.total_params:,} parameters, "
        f"{shape.layers} layers, hidden {shape.hidden})",
        f"run: batch {req.batch_size} x {req.seq_len} tokens, {req.device}",
        "",
        f"{'':28}" + "".join(f"{p.method:>18}" for p in plans),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:28}" + "".join(f"{v:>18}" for v in values))

    row("trainable parameters", [f"{p.trainable.params:,}" for p in plans])
    row("trainable %", [f"{p.trainable.percent:.4f}%" for p in plans])
    row("adapter file", [f"{p.adapter_bytes / 1e6:,.1f} MB" for p in plans])
    row("  in 16 bits", [f"{p.adapter_bytes_16bit / 1e6:,.1f} MB" for p in plans])
    row("compute dtype", [str(_compute_dtype(req)).removeprefix("torch.") for p in plans])
    row("micro-batch (sequences)", [str(p.run.micro_batch_size) for p in plans])
    row("activation checkpointing", ["on" if p.run.checkpointing else "off" for p in plans])
    row("base weights", [_gb(p.memory.base_weights) for p in plans])
    row("trainable weights", [_gb(p.memory.trainable_weights) for p in plans])
    row("gradients", [_gb(p.memory.gradients) for p in plans])
    row("AdamW state", [_gb(p.memory.optimizer_state) for p in plans])
    if req.ema_decay:
        row("weight average (EMA)", [_gb(p.memory.weight_average) for p in plans])
    row("activations / micro-batch", [_gb(p.memory.activations) for p in plans])
    row("fused loss workspace", [_gb(p.memory.loss_workspace) for p in plans])
    row("runtime + allocator", [_gb(p.memory.runtime + p.memory.slack) for p in plans])
    row("loading peak", [_gb(p.memory.load_peak) for p in plans])
    row("predicted peak", [_gb(p.memory.peak) for p in plans])
    if req.memory is not None:
        row(f"largest micro-batch @{req.seq_len}", [str(p.largest_micro_batch) for p in plans])
        row(
            f"largest seq-len @{plans[0].run.micro_batch_size}",
            [str(p.largest_seq_len) for p in plans],
        )
    row("GFLOP per token", [f"{p.flops_per_token / 1e9:.2f}" for p in plans])
    row("seconds per step", [f"{p.step_seconds:.1f}" for p in plans])
    row(
        f"hours per epoch ({req.examples} seq)",
        [f"{p.step_seconds * plan.steps_per_epoch / 3600:.2f}" for p in plans],
    )
    rates = plan.rates
    source = "measured here" if rates.measured else "given"
    lines.append("")
    lines.append(f"matmul rate {rates.matmul_flops / 1e9:,.0f} GFLOP/s ({source})")
    if _timed_by_parts(shape, req, rates):
        lines.append(
            "seconds per step: one decoder layer, the head + loss and the optimizer, each timed "
            f"here at the model's widths on {torch.get_num_threads()} thread(s) (--threads)"
        )
    if req.memory is not None:
        verdict = "fits" if plan.chosen.memory.peak <= req.memory else "does NOT fit"
        lines.append(
            f"{plan.chosen.method} {verdict} in {_gb(req.memory)} ({req.memory / 2**30:.1f} GiB)"
        )
    return "\n".join(lines)
