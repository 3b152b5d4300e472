"""Which layers an (IA)³ adapter scales, in PEFT's terms (`target_modules`, `feedforward_modules`).

PEFT's matching rules, reproduced exactly so that folders move both ways: a list of names
selects a module whose name equals one or ends with "." + one; a string is a regex that must
match the whole name; `feedforward_modules` as a list uses a plain `endswith`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from graftlm.adapters.layer_walk import outer_modules
from graftlm.adapters.modules import output_head_names, plain_names
from graftlm.errors import GraftError

# PEFT's defaults per `model_type` (peft.utils.constants, 0.21): the layers to adapt, and those
# among them that are "feedforward" (vector on the input, not the output).
PEFT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
}
# Names of MLP output projections (PEFT's feedforward lists, all architectures together): a
# targeted layer whose name ends with one of them gets its vector on the input.
FEEDFORWARD_SUFFIXES = (
    "down_proj",
    "mlp.c_proj",
    "fc2",
    "fc_out",
    "dense_4h_to_h",
    "w2",
    "wo",
    "output.dense",
)


@dataclass(frozen=True)
class IA3Spec:
    """Which layers carry a vector, in PEFT's terms (`target_modules`, `feedforward_modules`).

    Each is a tuple of names (a module matches when its name equals one or ends with
    "." + one), or a string regex matched against the whole module name.
    """

    targets: tuple[str, ...] | str
    feedforward: tuple[str, ...] | str
    exclude: tuple[str, ...] | str | None = None


def parse_names(value: Any, field: str, source: str) -> tuple[str, ...] | str | None:
    """PEFT's list-or-regex fields; a comma list of plain names is a list (CLI: 'k_proj,v_proj')."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, str):
        if plain_names(value) is not None:
            return plain_names(value)
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise GraftError(
                    f"{source}: {field} {value!r} is not a valid regex ({exc})"
                ) from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise GraftError(
        f"{source}: {field} should be a list of module names or a regex string, got {value!r}"
    )


def peft_match(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's `target_modules` rule: regex full match, or exact name / '.'-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def peft_feedforward(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's `feedforward_modules` rule: regex full match, or a plain `endswith`."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(key) for key in spec)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m, linear in outer_modules(model) if linear]


def find_targets(model: nn.Module, spec: IA3Spec) -> list[tuple[str, bool]]:
    """`(module name, is feedforward)` for every layer `spec` selects, in model order.

    Raises:
        GraftError: nothing matched (listing the model's linear-layer names), or a name in a
            list of targets names a module that is not a linear layer.
    """
    layers = _layers(model)
    heads = output_head_names(model)
    found = []
    for name, _ in layers:
        if spec.targets == "all-linear":
            hit = name not in heads
        else:
            hit = peft_match(spec.targets, name)
        if hit and not (spec.exclude is not None and peft_match(spec.exclude, name)):
            found.append((name, peft_feedforward(spec.feedforward, name)))
    if isinstance(spec.targets, tuple):  # PEFT refuses a named module it cannot adapt
        for name, module, linear in outer_modules(model):
            if not linear and peft_match(spec.targets, name):
                raise GraftError(
                    f"target {name!r} is a {type(module).__name__}; (IA)³ adapts linear layers only"
                )
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in layers if n not in heads})
        raise GraftError(
            f"targets {spec.targets!r} matched no layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(names)}"
        )
    return found


def default_spec(model: nn.Module, targets: str | None) -> IA3Spec:
    """The layers to adapt: `targets` if given, else PEFT's default for this `model_type`.

    Feedforward layers are the targeted ones named like an MLP output projection
    (`FEEDFORWARD_SUFFIXES`).
    """
    parsed = parse_names(targets, "targets", "--targets")
    if parsed is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PEFT_TARGETS:
            raise GraftError(
                f"(IA)³ has no default targets for model type {model_type!r}; pass targets "
                "(CLI: --targets), e.g. 'k_proj,v_proj,down_proj'"
            )
        parsed = PEFT_TARGETS[model_type]
    return IA3Spec(targets=parsed, feedforward=FEEDFORWARD_SUFFIXES)


def suffix_spec(names: list[str], candidates: list[str], rule) -> tuple[str, ...] | str:
    """The shortest PEFT spec that selects exactly `names` among `candidates`.

    Tries the last name segment ('k_proj'), then the last two ('mlp.c_proj'), then an anchored
    regex of the exact names.
    """
    for depth in (1, 2):
        spec = tuple(sorted({".".join(n.split(".")[-depth:]) for n in names}))
        if sorted(c for c in candidates if rule(spec, c)) == sorted(names):
            return spec
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
