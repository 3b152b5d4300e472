"""`TrainConfig`: every knob of `graftlm train`, one frozen dataclass.

The CLI flags, the `--config run.yaml` file and the Python API all build this same dataclass;
its field docstrings are the CLI help. The defaults are a recipe that works (see README,
"Choosing the defaults", for the experiments behind them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from graftlm.adapters.blocks import check_block_spec
from graftlm.errors import GraftError, check_choice, check_fraction

METHODS = (
    "lora",
    "qlora",
    "dora",
    "qdora",
    "adalora",
    "prompt",
    "prefix",
    "bottleneck",
    "ia3",
    "full",
)
# the methods whose adapters sit on chosen blocks' linear layers (--layers)
LAYERED_METHODS = ("lora", "qlora", "dora", "qdora", "adalora")
PLACEMENTS = ("both", "mlp")
DTYPES = ("auto", "bfloat16", "float32")
VALIDATION_SPLITS = ("random", "phrasings")


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A `TrainConfig` field: its default (none: a required setting) and its help, which
    `graftlm train --help` shows for the flag built from it."""
    return field(default=default, metadata={"help": help})


# Settings every method shares unless its own DEFAULTS say otherwise.
FALLBACKS: dict[str, Any] = {
    "lr": 1e-3,
    "max_epochs": 4.0,
    "low_memory": False,
    "neftune_alpha": 0.0,
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run."""

    data: str = setting(help="training data file (.jsonl, .csv, .parquet)")
    out: str = setting(help="output folder: adapter, metrics.jsonl, loss.png, checkpoint/")
    model: str = setting("smollm2-135m-instruct", "base model: built-in name, HF folder or .gguf")
    method: str = setting("lora", f"fine-tuning method: {', '.join(METHODS)}")
    rank: int | None = setting(
        None, "LoRA rank r (AdaLoRA: the target average rank); default per method"
    )
    alpha: float | None = setting(None, "LoRA alpha (default: 2 x rank)")
    dropout: float = setting(0.0, "dropout on the adapter input")
    targets: str | None = setting(
        None,
        "layers to adapt: 'all-linear', names 'q_proj,v_proj', or a regex; "
        "default per method (LoRA, IA3: all-linear)",
    )
    layers: str | None = setting(
        None,
        "adapt only these decoder blocks (LoRA, QLoRA, DoRA, AdaLoRA): 'top-half', 'top-K' "
        "(the last K), or indices such as '15-29'; default: every block. Blocks below the "
        "lowest adapted one need no backward pass, so the steps are faster",
    )
    lora_init: str | None = setting(
        None,
        "LoRA start: kaiming (B = 0), gaussian, pissa, or loftq (QLoRA: A, B from "
        "the 4-bit rounding error, so the 4-bit base plus the update starts near W)",
    )
    use_rslora: bool = setting(False, "scale alpha/sqrt(r) instead of alpha/r")
    epochs: float | None = setting(
        None,
        "a fixed number of passes over the training data (ignored with --steps); "
        "default: adaptive, stopped by validation",
    )
    steps: int | None = setting(None, "a fixed number of optimizer steps (overrides --epochs)")
    max_epochs: float | None = setting(
        None,
        "adaptive runs (no --epochs/--steps): the longest run, in passes over the "
        "data; default per method",
    )
    patience: int = setting(
        2,
        "adaptive runs: stop after this many evaluations without a better "
        "validation score (three evaluations an epoch)",
    )
    time_budget: float | None = setting(
        900.0, "adaptive runs: stop after this many seconds of training"
    )
    lr: float | None = setting(None, "peak learning rate (AdamW); default per method")
    batch_size: int = setting(16, "sequences per optimizer step")
    micro_batch_size: int | None = setting(
        None, "sequences per forward pass (default: by length, ~1024 tokens)"
    )
    seq_len: int = setting(1024, "maximum tokens per sequence (longer rows are truncated)")
    eval_data: str | None = setting(None, "validation file (default: 5%% held back if >= 200 rows)")
    validation_split: str = setting(
        "random",
        "adaptive runs without --eval-data: which rows validation holds back: 'random' "
        "(distinct prompts) or 'phrasings' (every row with one of a few rare word pairs of "
        "the prompt, so training never sees that wording; bench/results/zoo.md)",
    )
    seed: int = setting(0, "random seed (init, data order, dropout)")
    warmup_ratio: float = setting(0.06, "fraction of steps of linear warmup")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    neftune_alpha: float | None = setting(
        None,
        "NEFTune: uniform noise of this strength on the input embeddings while training "
        "(0: off); default per method (LoRA, QLoRA, DoRA, QDoRA: 5; the others: 0)",
    )
    ema_decay: float = setting(
        0.0,
        "keep an exponential moving average of the trainable tensors with this decay per "
        "step (e.g. 0.95; 0: off): validation, the kept adapter and the saved one use the "
        "average",
    )
    lean_optimizer: bool = setting(
        False,
        "AdamW with bfloat16 moments (half the optimizer state; full fine-tuning's largest "
        "share of memory), stepped one tensor at a time",
    )
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")
    save_every: int = setting(50, "write a resumable checkpoint every N steps")
    eval_every: int | None = setting(None, "evaluate every N steps (default: 3 times a run)")
    dtype: str = setting(
        "auto", "compute dtype: auto (bf16 where the CPU has it), bfloat16, float32"
    )
    low_memory: bool | None = setting(
        None,
        "bound a step's activations (activation checkpointing, unless "
        "--no-activation-checkpointing: then passes of ~384 tokens) and return large freed "
        "blocks to the OS (default per method: on for qlora, off otherwise)",
    )
    activation_checkpointing: bool | None = setting(
        None,
        "recompute each layer in the backward instead of keeping its activations: "
        "the least memory; float32 steps take ~1.4-2x as long (default: on with "
        "--low-memory, off otherwise)",
    )
    fused_kernels: bool = setting(
        True,
        "run RMSNorm, rotary embedding, SwiGLU and (bf16 on a CPU) causal attention of "
        "Llama-family models and the LoRA update on graftlm's fused kernels (float32: same "
        "results; bf16: the same "
        "up to rounding; faster, less memory); --no-fused-kernels: transformers' code",
    )
    fsdp: bool = setting(
        False,
        "under torchrun: shard each decoder layer's frozen weights across the "
        "processes (FSDP2); the adapter stays whole on every process",
    )
    num_virtual_tokens: int | None = setting(
        None, "prompt/prefix tuning: virtual tokens; default per method"
    )
    prompt_init: str | None = setting(
        None,
        "prompt/prefix tuning init: 'random', 'vocab' (random vocabulary tokens) or a "
        "text whose tokens' embeddings (prefix: keys/values) start it; default per method",
    )
    prefix_projection: bool = setting(
        False, "prefix tuning: train through a reparameterization MLP (folded at save)"
    )
    bottleneck_size: int | None = setting(
        None, "bottleneck adapters: hidden size; default per method"
    )
    bottleneck_placement: str = setting(
        "both", "bottleneck adapters: 'both' (Houlsby) or 'mlp' (Pfeiffer)"
    )
    init_rank: int | None = setting(None, "AdaLoRA: starting rank per matrix; default per method")
    forgetting: bool = setting(
        True,
        "at the end, measure what the model kept of its base outside the task (kept_exact, "
        "kl, ppl_ratio into graftlm.json; docs/forgetting.md); --no-forgetting: skip it",
    )
    keep: str | None = setting(None, "the forgetting meter's keep set (default: graftlm's own)")
    keep_limit: int | None = setting(
        64, "the forgetting meter scores about this many keep rows (every k-th; 0: all)"
    )
    skip_bad_rows: bool = setting(False, "warn about and skip bad data rows instead of failing")
    resume: bool = setting(False, "continue from OUT/checkpoint")
    force: bool = setting(
        False, "train even when `graftlm plan` predicts a peak above this machine's memory"
    )
    threads: int | None = setting(None, "torch threads (default: all cores)")

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise GraftError(f"{name} should be a positive number, got {value!r}")

        check_choice("method", self.method, METHODS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("bottleneck_placement", self.bottleneck_placement, PLACEMENTS)
        check_choice("validation_split", self.validation_split, VALIDATION_SPLITS)
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
        if self.keep_limit is not None and (
            isinstance(self.keep_limit, bool) or not isinstance(self.keep_limit, int)
            or self.keep_limit < 0
        ):  # fmt: skip
            raise GraftError(f"keep_limit should be an integer >= 0, got {self.keep_limit!r}")
        if self.layers is not None:
            check_block_spec(self.layers)
            if self.method not in LAYERED_METHODS:
                raise GraftError(
                    f"layers: --method {self.method} adapts no chosen blocks; --layers "
                    f"applies to {', '.join(LAYERED_METHODS)}"
                )
        check_fraction("warmup_ratio", self.warmup_ratio)
        check_fraction("ema_decay", self.ema_decay)
        if self.ema_decay and self.method == "adalora":
            # its rank allocation zeroes triplets in place; an average would bring them back
            raise GraftError(
                "ema_decay: AdaLoRA prunes ranks during training, which an average over "
                "steps would undo; use it with the other methods"
            )
        if self.grad_clip < 0 or self.weight_decay < 0 or (self.neftune_alpha or 0) < 0:
            raise GraftError("grad_clip, weight_decay and neftune_alpha must be >= 0")

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

        module = method_module(self.method)
        recipe = {**FALLBACKS, **module.DEFAULTS}
        unset = {k: v for k, v in recipe.items() if getattr(self, k, None) is None}
        resolved = dataclasses.replace(self, **unset) if unset else self
        # defaults that depend on other settings (AdaLoRA's starting rank on the target rank)
        derive = getattr(module, "derived_defaults", None)
        derived = derive(self, resolved) if derive else {}
        return dataclasses.replace(resolved, **derived) if derived else resolved

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
