"""`TrainConfig`: every knob of `graftlm train`, one frozen dataclass.

The CLI flags, the `--config run.yaml` file and the Python API all build this same dataclass;
its field docstrings are the CLI help. The defaults are a recipe that works (see README,
"Choosing the defaults", for the experiments behind them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from graftlm.errors import GraftError

METHODS = ("lora", "qlora", "adalora", "prompt", "prefix", "bottleneck", "ia3")
PLACEMENTS = ("both", "mlp")
DTYPES = ("auto", "bfloat16", "float32")


# Settings every method shares unless its own DEFAULTS say otherwise.
FALLBACKS: dict[str, Any] = {"lr": 1e-3, "max_epochs": 4.0, "low_memory": False}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run."""

    data: str = field(metadata={"help": "training data file (.jsonl, .csv, .parquet)"})
    out: str = field(
        metadata={"help": "output folder: adapter, metrics.jsonl, loss.png, checkpoint/"}
    )
    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "base model: built-in name, HF folder or .gguf"},
    )
    method: str = field(
        default="lora", metadata={"help": f"fine-tuning method: {', '.join(METHODS)}"}
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "LoRA rank r (AdaLoRA: the target average rank); default per method"},
    )
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    targets: str | None = field(
        default=None,
        metadata={
            "help": "layers to adapt: 'all-linear', names 'q_proj,v_proj', or a regex; "
            "default per method (LoRA: all-linear; IA3: k_proj,v_proj,down_proj)"
        },
    )
    lora_init: str | None = field(
        default=None,
        metadata={
            "help": "LoRA start: kaiming (B = 0), gaussian, pissa, or loftq (QLoRA: A, B from "
            "the 4-bit rounding error, so the 4-bit base plus the update starts near W)"
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "scale alpha/sqrt(r) instead of alpha/r"}
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "a fixed number of passes over the training data (ignored with --steps); "
            "default: adaptive, stopped by validation"
        },
    )
    steps: int | None = field(
        default=None, metadata={"help": "a fixed number of optimizer steps (overrides --epochs)"}
    )
    max_epochs: float | None = field(
        default=None,
        metadata={
            "help": "adaptive runs (no --epochs/--steps): the longest run, in passes over the "
            "data; default per method"
        },
    )
    patience: int = field(
        default=2,
        metadata={
            "help": "adaptive runs: stop after this many evaluations without a better "
            "validation score (three evaluations an epoch)"
        },
    )
    time_budget: float | None = field(
        default=900.0,
        metadata={"help": "adaptive runs: stop after this many seconds of training"},
    )
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate (AdamW); default per method"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step"})
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "sequences per forward pass (default: by length, ~1024 tokens)"},
    )
    seq_len: int = field(
        default=1024, metadata={"help": "maximum tokens per sequence (longer rows are truncated)"}
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "validation file (default: 5%% held back if >= 200 rows)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, dropout)"})
    warmup_ratio: float = field(
        default=0.06, metadata={"help": "fraction of steps of linear warmup"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(
        default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"}
    )
    save_every: int = field(
        default=50, metadata={"help": "write a resumable checkpoint every N steps"}
    )
    eval_every: int | None = field(
        default=None, metadata={"help": "evaluate every N steps (default: 3 times a run)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (bf16 where the CPU has it), bfloat16, float32"},
    )
    low_memory: bool | None = field(
        default=None,
        metadata={
            "help": "half-size passes (~512 tokens), large freed blocks returned to the OS, "
            "activation checkpointing for rows over 1024 tokens: ~2/3 of the default's peak "
            "memory (default per method: on for qlora, off otherwise)"
        },
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "recompute each layer in the backward instead of keeping its activations: "
            "the least memory, ~1/2 the speed (default: on in the qlora recipe; otherwise on "
            "only with --low-memory and rows over 1024 tokens)"
        },
    )
    fused_kernels: bool = field(
        default=True,
        metadata={
            "help": "run RMSNorm, rotary embedding and SwiGLU of Llama-family models on graftlm's "
            "fused kernels (same results, faster, less memory); --no-fused-kernels: transformers' code"
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "under torchrun: shard each decoder layer's frozen weights across the "
            "processes (FSDP2); the adapter stays whole on every process"
        },
    )
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": "prompt/prefix tuning: virtual tokens; default per method"}
    )
    prompt_init: str | None = field(
        default=None,
        metadata={
            "help": "prompt/prefix tuning init: 'random', 'vocab' (random vocabulary tokens) or a "
            "text whose tokens' embeddings (prefix: keys/values) start it; default per method"
        },
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "prefix tuning: train through a reparameterization MLP (folded at save)"},
    )
    bottleneck_size: int | None = field(
        default=None, metadata={"help": "bottleneck adapters: hidden size; default per method"}
    )
    bottleneck_placement: str = field(
        default="both",
        metadata={"help": "bottleneck adapters: 'both' (Houlsby) or 'mlp' (Pfeiffer)"},
    )
    init_rank: int | None = field(
        default=None, metadata={"help": "AdaLoRA: starting rank per matrix; default per method"}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "warn about and skip bad data rows instead of failing"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint"})
    threads: int | None = field(
        default=None, metadata={"help": "torch threads (default: all cores)"}
    )

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise GraftError(f"{name} should be a positive number, got {value!r}")

        if self.method not in METHODS:
            raise GraftError(f"method should be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise GraftError(f"dtype should be one of {DTYPES}, got {self.dtype!r}")
        if self.bottleneck_placement not in PLACEMENTS:
            raise GraftError(
                f"bottleneck_placement should be one of {PLACEMENTS}, got {self.bottleneck_placement!r}"
            )
        for name in ("batch_size", "seq_len", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GraftError(f"{name} should be a positive integer, got {value!r}")
        positive("epochs", self.epochs, allow_none=True)
        positive("max_epochs", self.max_epochs, allow_none=True)
        positive("time_budget", self.time_budget, allow_none=True)
        positive("lr", self.lr, allow_none=True)
        positive("alpha", self.alpha, allow_none=True)
        for name in (
            "rank",
            "steps",
            "micro_batch_size",
            "eval_every",
            "patience",
            "threads",
            "num_virtual_tokens",
            "bottleneck_size",
            "init_rank",
        ):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise GraftError(f"{name} should be a positive integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise GraftError(f"warmup_ratio should be in [0, 1), got {self.warmup_ratio!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise GraftError("grad_clip and weight_decay must be >= 0")

    @property
    def adaptive(self) -> bool:
        """True when the data decides the length: neither --epochs nor --steps was given."""
        return self.epochs is None and self.steps is None

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def with_method_defaults(self) -> TrainConfig:
        """This config with every unset (None) setting taken from the method's recipe."""
        # the methods import torch; TrainConfig stays light, as `graftlm --help` builds flags from it
        from graftlm.methods import method_module

        recipe = {**FALLBACKS, **method_module(self.method).DEFAULTS}
        unset = {k: v for k, v in recipe.items() if getattr(self, k, None) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict (YAML file, JSON): unknown keys are an error naming them all."""
        names = {f.name for f in fields(cls)}
        normalised = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise GraftError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}")
        missing = [n for n in ("data", "out") if n not in normalised]
        if missing:
            raise GraftError(f"{source}: missing required setting(s) {missing}")
        return cls(**normalised)
