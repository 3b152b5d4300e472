"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, in PEFT's format.

::

    attention (k_proj, v_proj):   x ──► W ──► ⊙ l  [out, 1]   (scales each output feature)
    feedforward (down_proj):      x ──► ⊙ l [1, in] ──► W      (scales each input feature)

Every vector starts at ones, so a fresh adapter leaves the model unchanged. Because the scaling
is diagonal it folds into the weight exactly: rows of W (and its bias) for an output vector,
columns of W for an input vector, so the adapter merges without any runtime cost.

On disk it is PEFT's `IA3` folder: `adapter_config.json` (`peft_type` "IA3", `target_modules`,
`feedforward_modules`, `fan_in_fan_out`, ...) and `adapter_model.safetensors` with one key per
adapted layer, `base_model.model.<module>.ia3_l`, shaped `[out, 1]` or (feedforward) `[1, in]`.
GPT-2's `Conv1D` stores its weight `[in, out]`; the vectors keep the same shapes there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.contract import InjectSummary
from graftlm.adapters.folder import CONFIG_FILE, peft_header, weight_shapes
from graftlm.adapters.folder import read_config as read_config_file
from graftlm.adapters.layer_walk import is_conv1d, layer_dims, outer_modules
from graftlm.adapters.wrapped_layers import WrappedLayerAdapters
from graftlm.errors import GraftError
from graftlm.methods.ia3.layer import IA3Linear
from graftlm.methods.ia3.targets import (
    IA3Spec,
    default_spec,
    find_targets,
    parse_names,
    peft_feedforward,
    peft_match,
    suffix_spec,
)

NAME = "ia3"
PEFT_TYPE = "IA3"
MERGEABLE = True
ROW_ADAPTERS = True
# Chosen by experiment (SmolLM2-135M, examples/data/tickets, exact match on its test split):
# lr 1e-2 for 2 epochs reaches 0.87. The vectors are few and start at one, so they need a
# learning rate ~10x LoRA's and more than one pass. Targets: every linear layer (184k values on
# SmolLM2), not PEFT's per-model defaults (`ia3.targets.PEFT_TARGETS`; Llama: k_proj, v_proj,
# down_proj: 58k), which `default_spec(model, None)` still gives: on the task zoo every linear
# layer scored higher in four comparisons of four, at the same step time (bench/results/zoo.md,
# "Seeds").
# max_epochs bounds the adaptive run; validation stops it sooner (train/adaptive.py).
DEFAULTS: dict[str, Any] = {"lr": 1e-2, "max_epochs": 6.0, "targets": "all-linear"}

# names, switching, unloading, the weights file and its checks: shared with bottleneck adapters
IA3_ADAPTERS = WrappedLayerAdapters(
    "ia3",
    "(IA)³",
    IA3Linear,
    ("ia3_l",),
    re.compile(r"(?P<module>.+)\.(?P<kind>ia3_l)(?:\.[^.]+)?"),
)
ia3_layers = IA3_ADAPTERS.layers
set_active = IA3_ADAPTERS.set_active
disabled = IA3_ADAPTERS.disabled
unload = IA3_ADAPTERS.unload


# -- attach / merge ---------------------------------------------------------------------------


def add_ia3(model: nn.Module, spec: IA3Spec, name: str = "default") -> InjectSummary:
    """Add adapter `name` (vectors at one) on every layer `spec` selects and make it the active,
    and only trainable, one.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the name is taken or not a plain identifier; no layer matched.
    """
    IA3_ADAPTERS.begin(model, name)
    added = []
    for module_name, feedforward in find_targets(model, spec):
        IA3_ADAPTERS.wrapped(model, module_name).add(name, feedforward)
        added.append((module_name, "IA3-in" if feedforward else "IA3-out", 1))
    return IA3_ADAPTERS.finish(model, name, spec, added)


def attach(model: nn.Module, cfg) -> InjectSummary:
    """Add (IA)³ adapter "default" to a freshly loaded base model as `cfg` describes."""
    return add_ia3(model, default_spec(model, cfg.targets))


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold an adapter's vectors (default: the active adapter's) into the layers' weights
    (fp32 math); idempotent, all or nothing.

    Raises:
        GraftError: no (IA)³ adapter, or more than one named; another one is merged; a layer
            that is not a plain linear one; a vector with NaN/inf (then nothing is merged).
    """
    names = [n for n in [IA3_ADAPTERS.active_adapter(model)] if n] if names is None else names
    if len(names) != 1:
        raise GraftError(f"(IA)³ merges one adapter at a time; got {names or 'no active one'}")
    name = IA3_ADAPTERS.name_or_active(model, names[0])
    # all or nothing: every reason to refuse is checked before any weight changes
    for module_name, layer in ia3_layers(model):
        if name not in layer.ia3_l:
            continue
        if layer.merged not in (None, name):
            raise GraftError(f"(IA)³ adapter {layer.merged!r} is merged; unmerge() it first")
        if not (isinstance(layer.base_layer, nn.Linear) or is_conv1d(layer.base_layer)):
            raise GraftError(
                f"{module_name}: (IA)³ merges into nn.Linear / Conv1D weights, not a "
                f"{type(layer.base_layer).__name__} (nothing was merged)"
            )
        if not torch.isfinite(layer.ia3_l[name]).all():
            raise GraftError(
                f"(IA)³ adapter {name!r} has NaN/inf values in {module_name}; refusing to merge "
                "it (nothing was merged)"
            )
    for _, layer in ia3_layers(model):
        layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, restoring the base weights (up to the weight dtype's rounding)."""
    for _, layer in ia3_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return the model with its plain layers back in place."""
    merge(model)
    return IA3_ADAPTERS.unwrap(model)


# -- save / load ------------------------------------------------------------------------------


def peft_config(
    model: nn.Module, base_model_name: str | None, name: str | None = None
) -> dict[str, Any]:
    """`adapter_config.json` for (IA)³ adapter `name` (default: the active one), PEFT's fields.

    `target_modules` / `feedforward_modules` are suffix lists when PEFT's matching rules select
    exactly the adapted layers with them, else anchored regexes of the exact names.
    """
    name = IA3_ADAPTERS.name_or_active(model, name)
    layers = [(n, layer) for n, layer in ia3_layers(model) if name in layer.ia3_l]
    adapted = [n for n, _ in layers]
    feedforward = [n for n, layer in layers if layer.feedforward[name]]
    everything = [n for n, _, _ in outer_modules(model)]
    targets = suffix_spec(adapted, everything, peft_match)
    ff: tuple[str, ...] | str = ()
    if feedforward and isinstance(targets, tuple):
        # PEFT wants feedforward_modules ⊆ target_modules when both are lists: reuse entries
        ff = tuple(t for t in targets if any(peft_match((t,), n) for n in feedforward))
        if sorted(n for n in adapted if peft_feedforward(ff, n)) != sorted(feedforward):
            ff = "^(?:" + "|".join(re.escape(n) for n in feedforward) + ")$"
    elif feedforward:
        ff = suffix_spec(feedforward, adapted, peft_feedforward)
    return {
        **peft_header(PEFT_TYPE, base_model_name),
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "exclude_modules": None,
        "feedforward_modules": list(ff) if isinstance(ff, tuple) else ff,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in layers),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


def save(
    model: nn.Module, folder: Path, base_model_name: str | None, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Write adapter `name` (default: the active one) as a PEFT `IA3` folder (config and
    safetensors, each atomically); returns the tensors written."""
    name = IA3_ADAPTERS.name_or_active(model, name)
    return IA3_ADAPTERS.save(model, folder, peft_config(model, base_model_name, name), name)


def read_config(folder: Path) -> IA3Spec:
    """The `IA3Spec` of an adapter folder's `adapter_config.json` (ours or PEFT's).

    Raises:
        GraftError: missing/invalid file, another peft_type, or a bad field (named).
    """
    data = read_config_file(folder, PEFT_TYPE)
    path = str(Path(folder) / CONFIG_FILE)
    targets = parse_names(data.get("target_modules"), "target_modules", path)
    if targets is None:
        raise GraftError(
            f"{path}: target_modules is missing; it names the layers the vectors belong to"
        )
    feedforward = parse_names(data.get("feedforward_modules"), "feedforward_modules", path)
    exclude = parse_names(data.get("exclude_modules"), "exclude_modules", path)
    return IA3Spec(targets=targets, feedforward=feedforward or (), exclude=exclude)


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    """Put a saved (IA)³ adapter (graftlm's or PEFT's) onto a base model as adapter `name`,
    the active one (several may be loaded under different names).

    Raises:
        GraftError: the name is taken; unreadable files; keys naming modules the model lacks,
            layers the config selects without a vector (all listed at once); a vector of the
            wrong shape (file, key, expected and found shapes); another base (see `force`).
    """
    folder = Path(folder)
    spec = read_config(folder)
    vectors = IA3_ADAPTERS.read_weights(model, folder, name, force)
    selected = dict(find_targets(model, spec))
    IA3_ADAPTERS.check_modules(folder, vectors, list(selected), f"target_modules {spec.targets!r}")
    modules = dict(model.named_modules())
    expected = {}
    for module_name, feedforward in selected.items():
        out_f, in_f = layer_dims(modules[module_name])
        shape = (1, in_f) if feedforward else (out_f, 1)
        why = "feedforward: [1, in]" if feedforward else "[out, 1]"
        expected[module_name] = (
            {"ia3_l": shape},
            f"{why}; another base model, or feedforward_modules disagrees",
        )
    IA3_ADAPTERS.check_shapes(folder, vectors, expected)
    add_ia3(model, spec, name)
    IA3_ADAPTERS.copy_in(model, name, vectors)


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`: layers scaled on the output and on the input."""
    out_count = in_count = 0
    for shape in weight_shapes(folder).values():
        if len(shape) == 2 and shape[0] == 1 and shape[1] > 1:
            in_count += 1
        else:
            out_count += 1
    spec = read_config(Path(folder))
    return {
        "method_facts": {
            "vectors": f"{out_count} on layer outputs, {in_count} on layer inputs (feedforward)",
            "feedforward": spec.feedforward
            if isinstance(spec.feedforward, str)
            else ", ".join(spec.feedforward),
        }
    }
