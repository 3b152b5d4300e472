"""Adapter configurations: frozen dataclasses, validated on construction, one JSON form on disk.

The on-disk form is Hugging Face PEFT's `adapter_config.json`, so adapters move freely between
graftlm, PEFT, vLLM, TGI and LoRAX. `LoraConfig` uses graftlm's field names (`rank`, `alpha`,
`targets`, ...); `to_peft_dict` / `from_peft_dict` translate to and from PEFT's names
(`r`, `lora_alpha`, `target_modules`, ...).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graftlm.adapters.blocks import block_count, block_indices
from graftlm.adapters.modules import plain_names
from graftlm.errors import GraftError, check_choice, check_fraction

if TYPE_CHECKING:
    from torch import nn

ALL_LINEAR = "all-linear"
INIT_CHOICES = ("kaiming", "gaussian", "pissa", "loftq")
BIAS_CHOICES = ("none", "lora_only", "all")
QUANTIZE_CHOICES = (None, "nf4")


def _as_tuple(value: Any, field_name: str) -> tuple[str, ...] | str | None:
    """Normalise a targets-like field: None, a regex/shorthand string, or a tuple of names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise GraftError(
                    f"{field_name}: every entry must be a non-empty string, got {item!r}"
                )
        return tuple(items)
    raise GraftError(
        f"{field_name} must be a list of module names, a regex string or None, got {value!r}"
    )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: W x + scale * B A x, with A `[rank, in]`, B `[out, rank]`, W frozen.

    Attributes:
        rank: rank r of the update B·A (a positive integer; 4–32 is typical).
        alpha: scale numerator: the update is multiplied by alpha / rank (or alpha / sqrt(rank)
            with `use_rslora`).
        dropout: dropout probability applied to the adapter's input during training.
        targets: which layers get an adapter: a list of module names or name suffixes
            (`["q_proj", "v_proj"]`), a regex string matched against the full module name, or
            `"all-linear"` = every linear layer except the output head.
        exclude: module names/suffixes (list) or a regex (string) never to adapt.
        layers: only adapt modules inside these block indices (e.g. `[0, 1, 2]`); None = all.
        rank_pattern: per-module rank overrides `{pattern: rank}`; a pattern matches a module
            whose name ends with it as a regex (PEFT's rule).
        alpha_pattern: per-module alpha overrides `{pattern: alpha}`, same matching.
        use_rslora: rank-stabilised LoRA: scale alpha / sqrt(rank) instead of alpha / rank.
        init: `"kaiming"` (A kaiming-uniform, B zero: the update starts at zero), `"gaussian"`
            (A normal with std 1/rank, B zero), or `"pissa"` (A, B from the top-rank SVD of W,
            W replaced by its residual; saved as a plain LoRA over the original W), or `"loftq"`
            (QLoRA only: A, B from the SVD of the 4-bit rounding error, W - NF4(W)).
        bias: which existing biases train: `"none"`, `"lora_only"` (those of adapted layers), `"all"`.
        modules_to_save: whole modules trained and saved in full (e.g. a classifier head).
        quantize: `None`, or `"nf4"` for a QLoRA base (frozen linear weights stored in 4 bits).
        use_dora: DoRA (weight-decomposed LoRA, Liu et al. 2024): each adapted linear computes
            `m * (W + scale·B·A) x / ||W + scale·B·A||_row` with a trainable magnitude `m` per
            output feature, initialised to the row norms of W (`methods/lora/dora_layer.py`).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ALL_LINEAR
    exclude: tuple[str, ...] | str | None = None
    layers: tuple[int, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    quantize: str | None = None
    use_dora: bool = False

    method = "lora"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__ once, here
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise GraftError(f"rank should be a positive integer, got {self.rank!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or self.alpha <= 0
        ):
            raise GraftError(f"alpha should be a positive number, got {self.alpha!r}")
        set_(self, "alpha", float(self.alpha))
        check_fraction("dropout", self.dropout)
        set_(self, "dropout", float(self.dropout))
        targets = _as_tuple(self.targets, "targets")
        if targets is None or (isinstance(targets, tuple) and not targets):
            raise GraftError(
                "targets must name at least one module (e.g. ['q_proj', 'v_proj']) or be 'all-linear'"
            )
        if isinstance(targets, str) and targets != ALL_LINEAR:
            if plain_names(targets) is not None:
                targets = plain_names(targets)
            else:
                _check_regex(targets, "targets")
        set_(self, "targets", targets)
        exclude = _as_tuple(self.exclude, "exclude")
        if isinstance(exclude, str):
            _check_regex(exclude, "exclude")
        set_(self, "exclude", exclude)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            for index in layers:
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise GraftError(f"layers must be non-negative block indices, got {index!r}")
            set_(self, "layers", layers)
        set_(self, "rank_pattern", dict(self.rank_pattern or {}))
        set_(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        for pattern, value in self.rank_pattern.items():
            _check_regex(pattern, "rank_pattern")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GraftError(
                    f"rank_pattern[{pattern!r}] should be a positive integer, got {value!r}"
                )
        for pattern, value in self.alpha_pattern.items():
            _check_regex(pattern, "alpha_pattern")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise GraftError(
                    f"alpha_pattern[{pattern!r}] should be a positive number, got {value!r}"
                )
        check_choice("init", self.init, INIT_CHOICES)
        if self.init == "loftq" and self.quantize != "nf4":
            raise GraftError("init 'loftq' starts a QLoRA adapter: it needs quantize='nf4'")
        check_choice("bias", self.bias, BIAS_CHOICES)
        set_(
            self, "modules_to_save", tuple(_as_tuple(self.modules_to_save, "modules_to_save") or ())
        )
        check_choice("quantize", self.quantize, QUANTIZE_CHOICES)
        if not isinstance(self.use_dora, bool):
            raise GraftError(f"use_dora should be true or false, got {self.use_dora!r}")

    # -- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on `module_name` (rank_pattern first, else `rank`)."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on `module_name` (alpha_pattern first, else `alpha`)."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA, for `module_name`."""
        rank = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / (rank**0.5) if self.use_rslora else alpha / rank

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- PEFT's JSON form ----------------------------------------------------------------------

    def to_peft_dict(
        self, *, base_model_name_or_path: str | None, target_modules: list[str] | str
    ) -> dict[str, Any]:
        """PEFT's `adapter_config.json` fields for this config.

        Args:
            base_model_name_or_path: recorded for PEFT and for humans.
            target_modules: the resolved targets (see `inject.peft_target_modules`): PEFT
                resolves "all-linear" to the module suffixes it matched, and so do we.
        """
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "exclude_modules": list(self.exclude)
            if isinstance(self.exclude, tuple)
            else self.exclude,
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": True,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) or None,
            "fan_in_fan_out": False,
            "use_dora": self.use_dora,
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(
        cls, data: dict[str, Any], *, source: str = "adapter_config.json"
    ) -> LoraConfig:
        """Build a LoraConfig from PEFT's `adapter_config.json` fields.

        Raises:
            GraftError: a required field is missing, or the file asks for a LoRA variant
                graftlm does not implement (lora_bias, QALoRA), naming the field.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise GraftError(f"{source}: peft_type {peft_type!r} is not LoRA")
        missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in data]
        if missing:
            raise GraftError(f"{source}: missing required field(s) {', '.join(missing)}")
        for unsupported in ("lora_bias", "use_qalora"):
            if data.get(unsupported):
                raise GraftError(f"{source}: {unsupported}=true is not supported by graftlm")
        targets = data["target_modules"]
        if isinstance(targets, list) and not targets:
            raise GraftError(f"{source}: target_modules is empty")
        graft = data.get("graftlm") or {}
        return cls(
            rank=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout") or 0.0,
            targets=targets,
            exclude=data.get("exclude_modules"),
            layers=data.get("layers_to_transform"),
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)),
            bias=data.get("bias") or "none",
            modules_to_save=tuple(data.get("modules_to_save") or ()),
            quantize=graft.get("quantize"),
            use_dora=bool(data.get("use_dora", False)),
        )


def training_settings(cfg, model: nn.Module) -> dict[str, Any]:
    """The fields a training config (`TrainConfig`) sets alike for every method built on LoRA's
    layers (LoRA, QLoRA, AdaLoRA): `alpha` (`--alpha`, else 2 x rank), `dropout`, `targets`,
    and `layers` (`--layers`: block indices of `model`).

    One mapping, so that a flag means the same to each of them.
    """
    return {
        "alpha": cfg.lora_alpha,
        "dropout": cfg.dropout,
        "targets": cfg.targets,
        "layers": block_indices(cfg.layers, block_count(model)) if cfg.layers else None,
    }


def match_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rank/alpha pattern rule: the first pattern p with `(.*\\.)?(p)$` matching the name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


def _check_regex(pattern: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise GraftError(
            f"{field_name}: {pattern!r} is not a valid regular expression ({exc})"
        ) from None
