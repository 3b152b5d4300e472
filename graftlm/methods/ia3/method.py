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

from graftlm.adapters.layer_walk import is_conv1d, layer_dims, outer_modules
from graftlm.adapters.modules import check_adapter_name
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
# Chosen by experiment (SmolLM2-135M, examples/data/tickets, exact match on its test split):
# lr 1e-2 for 2 epochs reaches 0.87. The vectors are few (58k for SmolLM2) and start at one,
# so they need a learning rate ~10x LoRA's and more than one pass. Targets: PEFT's per-model
# defaults (`ia3_targets.PEFT_TARGETS`; Llama: k_proj, v_proj, down_proj).
DEFAULTS: dict[str, Any] = {"lr": 1e-2, "epochs": 2.0}

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY_SUFFIX = ".ia3_l"


# adapters / set_active / active_adapter / unload, shared with bottleneck adapters
IA3_ADAPTERS = WrappedLayerAdapters("(IA)³", IA3Linear, "graftlm_ia3", ("ia3_l",))
ia3_layers = IA3_ADAPTERS.layers
adapters = IA3_ADAPTERS.adapters
set_active = IA3_ADAPTERS.set_active
active_adapter = IA3_ADAPTERS.active_adapter
unload = IA3_ADAPTERS.unload


# -- attach / merge ---------------------------------------------------------------------------


def add_ia3(model: nn.Module, spec: IA3Spec, name: str = "default"):
    """Add adapter `name` (vectors at one) on every layer `spec` selects and make it the active,
    and only trainable, one.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the name is taken or not a plain identifier; no layer matched.
    """
    from graftlm.adapters.modules import set_module
    from graftlm.methods.lora.inject import base_fingerprint, summarize

    known = adapters(model)
    if name in known:
        raise GraftError(f"an (IA)³ adapter named {name!r} is already loaded")
    check_adapter_name(name)
    base_fingerprint(model)  # of the untouched base: the wrapped layers change module names
    added = []
    for module_name, feedforward in find_targets(model, spec):
        layer = model.get_submodule(module_name)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer)
            set_module(model, module_name, layer)
        layer.add(name, feedforward)
        added.append((module_name, "IA3-in" if feedforward else "IA3-out", 1))
    known[name] = spec
    set_active(model, name)
    return summarize(model, name, added)


def attach(model: nn.Module, cfg) -> Any:
    """Add (IA)³ adapter "default" to a freshly loaded base model as `cfg` describes."""
    return add_ia3(model, default_spec(model, cfg.targets))


def merge(model: nn.Module) -> None:
    """Fold the active adapter's vectors into the layers' weights (fp32 math); idempotent,
    all or nothing.

    Raises:
        GraftError: no (IA)³ adapter; a vector with NaN/inf (then nothing is merged).
    """
    name = active_adapter(model)
    if name is None:
        raise GraftError("the model holds no active (IA)³ adapter to merge")
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
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, restoring the base weights (up to the weight dtype's rounding)."""
    for _, layer in ia3_layers(model):
        layer.unmerge()


# -- save / load ------------------------------------------------------------------------------


def state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s (default: the active one's) vectors under PEFT's keys
    (`base_model.model.<module>.ia3_l`), fp32."""
    name = IA3_ADAPTERS.name_or_active(model, name)
    return {
        PREFIX + module_name + KEY_SUFFIX: layer.ia3_l[name].detach().float()
        for module_name, layer in ia3_layers(model)
        if name in layer.ia3_l
    }


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
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "exclude_modules": None,
        "feedforward_modules": list(ff) if isinstance(ff, tuple) else ff,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in layers),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write the active adapter as a PEFT `IA3` folder (config + safetensors, each atomically).

    Merged vectors are saved as they are (the file never depends on the merge state).

    Returns:
        The tensors written.
    """
    from graftlm.methods.lora.files import atomic_save_safetensors, atomic_write_json

    tensors = state_dict(model)
    folder = Path(folder)
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, peft_config(model, base_model_name))
    return tensors


def read_spec(folder: Path) -> IA3Spec:
    """The `IA3Spec` of an adapter folder's `adapter_config.json` (ours or PEFT's).

    Raises:
        GraftError: missing/invalid file, another peft_type, or a bad field (named).
    """
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise GraftError(
            f"{path}: not found (an adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if str(data.get("peft_type", "")).upper() != PEFT_TYPE:
        raise GraftError(f"{path}: peft_type is {data.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    targets = parse_names(data.get("target_modules"), "target_modules", str(path))
    if targets is None:
        raise GraftError(
            f"{path}: target_modules is missing; it names the layers the vectors belong to"
        )
    feedforward = parse_names(data.get("feedforward_modules"), "feedforward_modules", str(path))
    exclude = parse_names(data.get("exclude_modules"), "exclude_modules", str(path))
    return IA3Spec(targets=targets, feedforward=feedforward or (), exclude=exclude)


def load(model: nn.Module, folder: Path, name: str = "default") -> None:
    """Put a saved (IA)³ adapter (graftlm's or PEFT's) onto a base model.

    Several adapters may be loaded under different names; the last one loaded is active.

    Raises:
        GraftError: unreadable files; keys naming modules the model lacks, layers the config
            selects without a vector (all listed at once); a vector of the wrong shape (file,
            key, expected and found shapes); the name is taken.
    """
    from graftlm.methods.lora.files import read_adapter_weights

    folder = Path(folder)
    if name in adapters(model):
        raise GraftError(f"an (IA)³ adapter named {name!r} is already loaded")
    spec = read_spec(folder)
    tensors = read_adapter_weights(folder)
    weights_path = folder / WEIGHTS_FILE
    vectors: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        match = re.fullmatch(r"(?P<module>.+)\.ia3_l(?:\.[^.]+)?", bare)
        if match is None:
            unexpected.append(key)
        else:
            vectors[match.group("module")] = tensor
    if unexpected:
        raise GraftError(
            f"{weights_path}: unexpected keys (not '<module>.ia3_l'): {sorted(unexpected)[:10]}"
        )
    if not vectors:
        raise GraftError(f"{weights_path}: no (IA)³ vectors (keys like '...k_proj.ia3_l') found")
    modules = dict(model.named_modules())
    unknown = sorted(m for m in vectors if m not in modules)
    if unknown:
        raise GraftError(
            f"{weights_path}: keys name modules {type(model).__name__} does not have: "
            f"{[PREFIX + m + KEY_SUFFIX for m in unknown][:10]} (trained on another architecture?)"
        )
    selected = dict(find_targets(model, spec))
    missing = sorted(set(selected) - set(vectors))
    extra = sorted(set(vectors) - set(selected))
    if missing or extra:
        raise GraftError(
            f"{weights_path}: the vectors do not match {CONFIG_FILE}'s target_modules "
            f"{spec.targets!r}: "
            + (f"no vector for {missing[:10]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"vectors for layers it does not select: {extra[:10]}" if extra else "")
        )
    for module_name, feedforward in selected.items():
        out_f, in_f = layer_dims(modules[module_name])
        expected = (1, in_f) if feedforward else (out_f, 1)
        found = tuple(vectors[module_name].shape)
        if found != expected:
            kind = "feedforward: [1, in]" if feedforward else "[out, 1]"
            raise GraftError(
                f"{weights_path}: {PREFIX}{module_name}{KEY_SUFFIX}: expected shape {expected} "
                f"({kind}), found {found} (another base model, or feedforward_modules disagrees)"
            )
    add_ia3(model, spec, name)
    with torch.no_grad():
        for module_name, layer in ia3_layers(model):
            if name in layer.ia3_l:
                layer.ia3_l[name].copy_(vectors[module_name].float())


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`: layers scaled on the output and on the input."""
    from safetensors import safe_open

    out_count = in_count = 0
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            if len(shape) == 2 and shape[0] == 1 and shape[1] > 1:
                in_count += 1
            else:
                out_count += 1
    spec = read_spec(Path(folder))
    return {
        "method_facts": {
            "vectors": f"{out_count} on layer outputs, {in_count} on layer inputs (feedforward)",
            "feedforward": spec.feedforward
            if isinstance(spec.feedforward, str)
            else ", ".join(spec.feedforward),
        }
    }
