"""AdaLoRA's configuration: a frozen dataclass, validated on construction, and its JSON form on
disk, which is PEFT's `AdaLoraConfig` (`init_r`, `target_r`, `deltaT`, `rank_pattern`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from graftlm.errors import GraftError
from graftlm.methods.lora.config import ALL_LINEAR, LoraConfig

PEFT_TYPE = "ADALORA"
RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5); kept so logits match it to the last bit


# the fields AdaLoRA shares with LoRA, with LoRA's meaning, checks and messages
LORA_FIELDS = ("targets", "exclude", "layers", "alpha", "dropout")


@dataclass(frozen=True)
class AdaLoraConfig:
    """One AdaLoRA adapter: which layers, the rank budget, and its schedule.

    Attributes:
        init_r: triplets every adapted matrix starts with.
        target_r: triplets kept per matrix on average at the end (the budget is global, so
            single matrices may end anywhere between 0 and init_r).
        alpha: scale numerator: the update is multiplied by alpha / init_r.
        dropout: dropout probability on the adapter's input during training.
        targets: layers to adapt, as for LoRA: module names/suffixes, a regex, or "all-linear".
        exclude: module names/suffixes (list) or a regex (string) never to adapt.
        layers: only adapt modules inside these block indices; None = all.
        total_step: optimizer steps of the training run (set by the training hooks).
        tinit: steps before the budget starts falling (importance is gathered meanwhile).
        tfinal: steps at the end with the final ranks fixed.
        delta_t: the budget is re-allocated every `delta_t` steps while it falls.
        beta1: EMA factor of the sensitivity |w · dL/dw|.
        beta2: EMA factor of the sensitivity's uncertainty.
        orth_reg_weight: weight of the penalty ||PᵀP − I||_F + ||QQᵀ − I||_F (mean over matrices).
        rank_pattern: `{"<module>.lora_E": (kept, ...)}`, one bool per initial triplet, once a
            budget has been allocated; None before.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ALL_LINEAR
    exclude: tuple[str, ...] | str | None = None
    layers: tuple[int, ...] | None = None
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, tuple[bool, ...]] | None = None

    # what `surgery.set_adapter` and `surgery.find_targets` ask of every adapter config
    bias = "none"
    modules_to_save = ()
    method = "adalora"

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a positive integer" if low > 0 else "an integer >= 0"
                raise GraftError(f"{name} should be {kind}, got {value!r}")

        integer("init_r", 1)
        integer("target_r", 1)
        integer("tinit", 0)
        integer("tfinal", 0)
        integer("delta_t", 1)
        if self.target_r > self.init_r:
            raise GraftError(
                f"target_r ({self.target_r}) should not exceed init_r ({self.init_r}): AdaLoRA "
                "starts every matrix at init_r triplets and prunes down to target_r on average"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise GraftError(f"{name} should be in (0, 1), got {value!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise GraftError(f"orth_reg_weight should be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            integer("total_step", 1)
            if self.tinit >= self.total_step - self.tfinal:
                raise GraftError(
                    f"tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no step of the "
                    f"{self.total_step} for the budget to fall; lower them or train longer"
                )
        # targets, exclude, layers, alpha and dropout: LoRA's rules and messages
        lora = self.as_lora()
        for name in LORA_FIELDS:
            object.__setattr__(self, name, getattr(lora, name))
        if self.rank_pattern is not None:
            object.__setattr__(
                self,
                "rank_pattern",
                {k: tuple(bool(b) for b in v) for k, v in self.rank_pattern.items()},
            )

    def as_lora(self) -> LoraConfig:
        """The LoRA config with the same layers, alpha and dropout (rank = init_r)."""
        return LoraConfig(rank=self.init_r, **{name: getattr(self, name) for name in LORA_FIELDS})

    @property
    def scaling(self) -> float:
        """alpha / init_r (PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r)."""
        return self.alpha / (self.init_r + RANKNUM_EPS)

    def replace(self, **changes: Any) -> AdaLoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_peft_dict(
        self, *, base_model_name_or_path: str | None, target_modules: list[str] | str
    ) -> dict[str, Any]:
        """PEFT's `adapter_config.json` for this adapter (an `AdaLoraConfig` there)."""
        data = self.as_lora().to_peft_dict(
            base_model_name_or_path=base_model_name_or_path, target_modules=target_modules
        )
        # PEFT ignores `r` for AdaLoRA and warns when it is not its default 8
        data["r"] = 8
        tinit, tfinal = self.tinit, self.tfinal
        data.update(
            peft_type=PEFT_TYPE,
            init_r=self.init_r,
            target_r=self.target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=self.delta_t,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            # PEFT refuses a config without a positive total_step (and with no budget phase);
            # an adapter that never trained under the hooks gets the least value it accepts
            total_step=self.total_step or tinit + tfinal + 1,
            rank_pattern=None
            if self.rank_pattern is None
            else {k: list(v) for k, v in self.rank_pattern.items()},
        )
        return data

    @classmethod
    def from_peft_dict(
        cls, data: dict[str, Any], *, source: str = "adapter_config.json"
    ) -> AdaLoraConfig:
        """Build from PEFT's `adapter_config.json` fields.

        Raises:
            GraftError: another peft_type, a missing field, or a PEFT option graftlm's AdaLoRA
                does not implement (bias, modules_to_save, rsLoRA, DoRA), naming the field.
        """
        if str(data.get("peft_type", "")).upper() != PEFT_TYPE:
            raise GraftError(f"{source}: peft_type {data.get('peft_type')!r} is not ADALORA")
        missing = [k for k in ("init_r", "lora_alpha", "target_modules") if k not in data]
        if missing:
            raise GraftError(f"{source}: missing required field(s) {', '.join(missing)}")
        for flag in ("use_dora", "use_rslora", "lora_bias", "modules_to_save"):
            if data.get(flag):
                raise GraftError(f"{source}: {flag}={data[flag]!r} is not supported for AdaLoRA")
        if (data.get("bias") or "none") != "none":
            raise GraftError(f"{source}: bias={data['bias']!r} is not supported for AdaLoRA")
        total_step = data.get("total_step")
        try:
            return cls(
                init_r=data["init_r"],
                # PEFT accepts target_r > init_r (it only fails once training prunes); for
                # inference it means nothing, so it is capped rather than refused
                target_r=min(data.get("target_r", 8), data["init_r"]),
                alpha=data["lora_alpha"],
                dropout=data.get("lora_dropout") or 0.0,
                targets=data["target_modules"],
                exclude=data.get("exclude_modules"),
                layers=data.get("layers_to_transform"),
                total_step=total_step if total_step else None,
                tinit=data.get("tinit", 0),
                tfinal=data.get("tfinal", 0),
                delta_t=data.get("deltaT", 1),
                beta1=data.get("beta1", 0.85),
                beta2=data.get("beta2", 0.85),
                orth_reg_weight=data.get("orth_reg_weight", 0.5),
                rank_pattern=data.get("rank_pattern"),
            )
        except GraftError as exc:
            raise GraftError(f"{source}: {exc}") from None
