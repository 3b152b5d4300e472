"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after a sublayer's output.

::

    x ──► output projection (frozen) ──► h ──┬──────────────────────────────────────► (+) ──► h'
                                             └► down [size, d] ─► act ─► up [d, size] ─┘

So `h' = h + up(act(down(h)))`, applied to the output of a decoder block's attention and of its MLP
("both", Houlsby's placement) or of the MLP only ("mlp", Pfeiffer's), before the block's residual
addition. `up` starts at zero, so a fresh adapter leaves the model unchanged; `down` starts as
`nn.Linear` does (kaiming-uniform). The adapter's parameters are fp32 whatever the base dtype.

The adapter is nonlinear, so it cannot be folded into the base weights: `MERGEABLE = False`.
PEFT has no such method; the folder format is graftlm's own, described in
docs/bottleneck_format.md (`adapter_config.json` with `"peft_type": "BOTTLENECK"`, and
`adapter_model.safetensors` with four tensors per adapted module).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.layer_walk import outer_modules
from graftlm.adapters.modules import check_adapter_name
from graftlm.adapters.wrapped_layers import WrappedLayerAdapters
from graftlm.errors import GraftError
from graftlm.methods.bottleneck.layer import (
    DEFAULT_ACTIVATION,
    PLACEMENTS,
    BottleneckAdapter,
    BottleneckConfig,
    output_features,
)

NAME = "bottleneck"
PEFT_TYPE = "BOTTLENECK"
MERGEABLE = False
# Chosen by experiment (SmolLM2-135M, examples/data/tickets, exact match on its test split):
# size 64 after attention and MLP, lr 1e-3 (LoRA's), one epoch reaches 0.91.
DEFAULTS: dict[str, Any] = {"bottleneck_size": 64, "lr": 1e-3, "epochs": 1.0}

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# parameter name inside the adapted module -> shape, as a function of (hidden d, bottleneck size)
TENSORS = {
    "adapter_down.weight": lambda d, s: (s, d),
    "adapter_down.bias": lambda d, s: (s,),
    "adapter_up.weight": lambda d, s: (d, s),
    "adapter_up.bias": lambda d, s: (d,),
}

# A decoder block's sublayers, found by child name (Llama's self_attn/mlp, GPT-2's attn/mlp,
# GPT-NeoX's attention, ...); norms (post_attention_layernorm) are skipped: they have no linear.
_ATTENTION = re.compile(r".*(attn|attention).*", re.IGNORECASE)
_MLP = re.compile(r".*(mlp|feed_forward|ffn).*", re.IGNORECASE)


# -- where the adapters go --------------------------------------------------------------------


# adapters / set_active / active_adapter / unload, shared with (IA)³
BOTTLENECK_ADAPTERS = WrappedLayerAdapters(
    "bottleneck", BottleneckAdapter, "graftlm_bottleneck", ("adapter_down", "adapter_up")
)
adapter_layers = BOTTLENECK_ADAPTERS.layers
adapters = BOTTLENECK_ADAPTERS.adapters
set_active = BOTTLENECK_ADAPTERS.set_active
active_adapter = BOTTLENECK_ADAPTERS.active_adapter
unload = BOTTLENECK_ADAPTERS.unload


def _last_linear(module: nn.Module, prefix: str) -> str | None:
    """Name of the last linear layer inside `module` (a wrapper around one counts as one)."""
    names = [name for name, _, linear in outer_modules(module, prefix) if linear]
    return names[-1] if names else None


def find_sites(model: nn.Module, placement: str) -> list[tuple[str, str]]:
    """`(module name, "attention" | "mlp")` of each output projection to adapt, in model order.

    A decoder block is a member of an `nn.ModuleList` that has a child named like an attention
    (`*attn*`, `*attention*`) and one named like an MLP (`*mlp*`, `*feed_forward*`, `*ffn*`),
    each holding linear layers; the sublayer's output projection is its last linear layer in
    definition order (Llama `self_attn.o_proj` / `mlp.down_proj`, GPT-2 `attn.c_proj` /
    `mlp.c_proj`).

    Raises:
        GraftError: unknown placement, or no decoder block found.
    """
    if placement not in PLACEMENTS:
        raise GraftError(f"placement should be one of {PLACEMENTS}, got {placement!r}")
    sites: list[tuple[str, str]] = []
    for list_name, module_list in model.named_modules():
        if not isinstance(module_list, nn.ModuleList):
            continue
        for index, block in enumerate(module_list):
            found: dict[str, str] = {}
            for child_name, child in block.named_children():
                prefix = f"{list_name}.{index}.{child_name}"
                for kind, pattern in (("attention", _ATTENTION), ("mlp", _MLP)):
                    if kind not in found and pattern.fullmatch(child_name):
                        last = _last_linear(child, prefix)
                        if last is not None:
                            found[kind] = last
            if len(found) == 2:
                if placement == "both":
                    sites.append((found["attention"], "attention"))
                sites.append((found["mlp"], "mlp"))
    if not sites:
        raise GraftError(
            f"found no decoder blocks in {type(model).__name__} (a ModuleList whose members have "
            "an attention and an MLP child holding linear layers); bottleneck adapters need them"
        )
    return sites


# -- attach -----------------------------------------------------------------------------------


def add_bottleneck(model: nn.Module, config: BottleneckConfig, name: str = "default"):
    """Insert adapter `name` where `config.placement` says and make it the active, and only
    trainable, one.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the name is taken or not a plain identifier; no decoder blocks found.
    """
    from graftlm.adapters.modules import set_module
    from graftlm.methods.lora.inject import base_fingerprint, summarize

    known = adapters(model)
    if name in known:
        raise GraftError(f"a bottleneck adapter named {name!r} is already loaded")
    check_adapter_name(name)
    base_fingerprint(model)  # of the untouched base: wrapping changes module names
    added = []
    for module_name, kind in find_sites(model, config.placement):
        layer = model.get_submodule(module_name)
        if not isinstance(layer, BottleneckAdapter):
            layer = BottleneckAdapter(layer)
            set_module(model, module_name, layer)
        layer.add(name, config)
        added.append(
            (module_name, "bneck-attn" if kind == "attention" else "bneck-mlp", config.size)
        )
    known[name] = config
    set_active(model, name)
    return summarize(model, name, added)


def attach(model: nn.Module, cfg) -> Any:
    """Add bottleneck adapter "default" as `cfg` says (bottleneck_size/_placement, dropout)."""
    config = BottleneckConfig(
        size=cfg.bottleneck_size or DEFAULTS["bottleneck_size"],
        placement=cfg.bottleneck_placement,
        dropout=cfg.dropout,
    )
    return add_bottleneck(model, config)


def merge(model: nn.Module) -> None:
    """Always refuses: the adapter is nonlinear in the hidden state.

    Raises:
        GraftError: always.
    """
    raise GraftError(
        "bottleneck adapters cannot be merged into the base weights (down -> nonlinearity -> up "
        "is not a linear map); generate or serve with the adapter loaded instead"
    )


# -- save / load ------------------------------------------------------------------------------


def state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s (default: the active one's) tensors under their file keys
    (`base_model.model.<module>.adapter_down.weight`, ...), fp32."""
    name = BOTTLENECK_ADAPTERS.name_or_active(model, name)
    out = {}
    for module_name, layer in adapter_layers(model):
        if name not in layer.adapter_down:
            continue
        linears = {"adapter_down": layer.adapter_down[name], "adapter_up": layer.adapter_up[name]}
        for key in TENSORS:
            owner, leaf = key.split(".")
            out[f"{PREFIX}{module_name}.{key}"] = getattr(linears[owner], leaf).detach().float()
    return out


def config_dict(
    model: nn.Module, base_model_name: str | None, name: str | None = None
) -> dict[str, Any]:
    """`adapter_config.json` of adapter `name` (default: the active one); see
    docs/bottleneck_format.md."""
    name = BOTTLENECK_ADAPTERS.name_or_active(model, name)
    config = adapters(model)[name]
    layers = [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapter_down]
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": base_model_name,
        "bottleneck_size": config.size,
        "placement": config.placement,
        "non_linearity": config.activation,
        "scaling": config.scaling,
        "dropout": config.dropout,
        "hidden_size": layers[0][1].features,
        "target_modules": sorted({".".join(n.split(".")[-2:]) for n, _ in layers}),
        "num_adapters": len(layers),
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write the active adapter's `adapter_config.json` and `adapter_model.safetensors`, each
    atomically; returns the tensors written."""
    from graftlm.methods.lora.files import atomic_save_safetensors, atomic_write_json

    tensors = state_dict(model)
    folder = Path(folder)
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, config_dict(model, base_model_name))
    return tensors


def read_config(folder: Path) -> BottleneckConfig:
    """The `BottleneckConfig` of a folder's `adapter_config.json`.

    Raises:
        GraftError: missing/invalid file, another peft_type, a newer format_version, or a
            missing/bad field (named, with its value).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise GraftError(
            f"{path}: not found (a bottleneck adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if str(data.get("peft_type", "")).upper() != PEFT_TYPE:
        raise GraftError(f"{path}: peft_type is {data.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise GraftError(
            f"{path}: format_version {version!r}; this graftlm reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("bottleneck_size", "placement") if k not in data]
    if missing:
        raise GraftError(f"{path}: missing field(s) {missing}")
    try:
        return BottleneckConfig(
            size=data["bottleneck_size"],
            placement=data["placement"],
            activation=data.get("non_linearity", DEFAULT_ACTIVATION),
            dropout=data.get("dropout", 0.0),
            scaling=data.get("scaling", 1.0),
        )
    except GraftError as exc:
        raise GraftError(f"{path}: {exc}") from None


_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>adapter_(?:down|up)\.(?:weight|bias))")


def load(model: nn.Module, folder: Path, name: str = "default") -> None:
    """Put a saved bottleneck adapter onto a base model as adapter `name` (several may be
    loaded under different names; the last one loaded is active).

    Raises:
        GraftError: unreadable files; keys that are not adapter tensors, name modules the model
            lacks, or miss one of a module's four tensors; modules other than the placement's
            (all listed at once); a tensor of the wrong shape (file, key, expected and found).
    """
    from graftlm.methods.lora.files import read_adapter_weights

    folder = Path(folder)
    if name in adapters(model):
        raise GraftError(f"a bottleneck adapter named {name!r} is already loaded")
    config = read_config(folder)
    tensors = read_adapter_weights(folder)
    weights_path = folder / WEIGHTS_FILE
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if match is None:
            unexpected.append(key)
        else:
            groups.setdefault(match.group("module"), {})[match.group("tensor")] = tensor
    if unexpected:
        raise GraftError(
            f"{weights_path}: unexpected keys (not '<module>.adapter_down|adapter_up.weight|bias'): "
            f"{sorted(unexpected)[:10]}"
        )
    incomplete = {
        m: sorted(set(TENSORS) - set(g)) for m, g in groups.items() if set(g) != set(TENSORS)
    }
    if incomplete:
        first = sorted(incomplete)[0]
        raise GraftError(
            f"{weights_path}: {len(incomplete)} module(s) lack tensors, e.g. {PREFIX}{first} has "
            f"no {incomplete[first]}"
        )
    modules = dict(model.named_modules())
    unknown = sorted(m for m in groups if m not in modules)
    if unknown:
        raise GraftError(
            f"{weights_path}: keys name modules {type(model).__name__} does not have: "
            f"{[PREFIX + m + '.adapter_down.weight' for m in unknown][:10]} (trained on another architecture?)"
        )
    sites = [m for m, _ in find_sites(model, config.placement)]
    missing, extra = sorted(set(sites) - set(groups)), sorted(set(groups) - set(sites))
    if missing or extra:
        raise GraftError(
            f"{weights_path}: the adapted modules do not match placement {config.placement!r} "
            "on this model: "
            + (f"no tensors for {missing[:10]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"tensors for modules outside the placement: {extra[:10]}" if extra else "")
        )
    for module_name in sites:
        d = output_features(modules[module_name])
        for key, shape_of in TENSORS.items():
            expected, found = shape_of(d, config.size), tuple(groups[module_name][key].shape)
            if found != expected:
                raise GraftError(
                    f"{weights_path}: {PREFIX}{module_name}.{key}: expected shape {expected}, "
                    f"found {found} (hidden size {d}, bottleneck_size {config.size} in {CONFIG_FILE})"
                )
    add_bottleneck(model, config, name)
    with torch.no_grad():
        for module_name, layer in adapter_layers(model):
            if name not in layer.adapter_down:
                continue
            linears = {
                "adapter_down": layer.adapter_down[name],
                "adapter_up": layer.adapter_up[name],
            }
            for key in TENSORS:
                owner, leaf = key.split(".")
                getattr(linears[owner], leaf).copy_(groups[module_name][key].float())


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`: size, placement, nonlinearity."""
    config = read_config(Path(folder))
    return {
        "method_facts": {
            "bottleneck": f"size {config.size}, {config.activation}, placement {config.placement!r}"
        }
    }
