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

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.contract import InjectSummary, merge_refused
from graftlm.adapters.folder import CONFIG_FILE
from graftlm.adapters.folder import read_config as read_config_file
from graftlm.adapters.layer_walk import outer_modules
from graftlm.adapters.wrapped_layers import WrappedLayerAdapters
from graftlm.errors import GraftError, check_choice
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
ROW_ADAPTERS = True
# Chosen by experiment (SmolLM2-135M, examples/data/tickets, exact match on its test split):
# size 64 after attention and MLP, lr 1e-3 (LoRA's), one epoch reaches 0.91.
# max_epochs bounds the adaptive run; validation stops it sooner (train/adaptive.py).
DEFAULTS: dict[str, Any] = {"bottleneck_size": 64, "lr": 1e-3, "max_epochs": 4.0}

FORMAT_VERSION = 1
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

# names, switching, unloading, the weights file and its checks: shared with (IA)³
BOTTLENECK_ADAPTERS = WrappedLayerAdapters(
    "bottleneck",
    "bottleneck",
    BottleneckAdapter,
    tuple(TENSORS),
    re.compile(r"(?P<module>.+)\.(?P<kind>adapter_(?:down|up)\.(?:weight|bias))"),
)
adapter_layers = BOTTLENECK_ADAPTERS.layers
set_active = BOTTLENECK_ADAPTERS.set_active
disabled = BOTTLENECK_ADAPTERS.disabled
unload = BOTTLENECK_ADAPTERS.unload


# -- where the adapters go --------------------------------------------------------------------


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
    check_choice("placement", placement, PLACEMENTS)
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


def add_bottleneck(
    model: nn.Module, config: BottleneckConfig, name: str = "default"
) -> InjectSummary:
    """Insert adapter `name` where `config.placement` says and make it the active, and only
    trainable, one.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the name is taken or not a plain identifier; no decoder blocks found.
    """
    BOTTLENECK_ADAPTERS.begin(model, name)
    added = []
    for module_name, kind in find_sites(model, config.placement):
        BOTTLENECK_ADAPTERS.wrapped(model, module_name).add(name, config)
        kind_label = "bneck-attn" if kind == "attention" else "bneck-mlp"
        added.append((module_name, kind_label, config.size))
    return BOTTLENECK_ADAPTERS.finish(model, name, config, added)


def attach(model: nn.Module, cfg) -> Any:
    """Add bottleneck adapter "default" as `cfg` says (bottleneck_size/_placement, dropout)."""
    config = BottleneckConfig(
        size=cfg.bottleneck_size or DEFAULTS["bottleneck_size"],
        placement=cfg.bottleneck_placement,
        dropout=cfg.dropout,
    )
    return add_bottleneck(model, config)


# the adapter is nonlinear in the hidden state
merge = merge_refused(
    "bottleneck adapters cannot be merged into the base weights (down -> nonlinearity -> up "
    "is not a linear map); generate or serve with the adapter loaded instead"
)


# -- save / load ------------------------------------------------------------------------------


def config_dict(
    model: nn.Module, base_model_name: str | None, name: str | None = None
) -> dict[str, Any]:
    """`adapter_config.json` of adapter `name` (default: the active one); see
    docs/bottleneck_format.md."""
    name = BOTTLENECK_ADAPTERS.name_or_active(model, name)
    config = BOTTLENECK_ADAPTERS.adapters(model)[name]
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


def save(
    model: nn.Module, folder: Path, base_model_name: str | None, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Write adapter `name`'s (default: the active one's) `adapter_config.json` and
    `adapter_model.safetensors`, each atomically; returns the tensors written."""
    name = BOTTLENECK_ADAPTERS.name_or_active(model, name)
    config = config_dict(model, base_model_name, name)
    return BOTTLENECK_ADAPTERS.save(model, folder, config, name)


def read_config(folder: Path) -> BottleneckConfig:
    """The `BottleneckConfig` of a folder's `adapter_config.json`.

    Raises:
        GraftError: missing/invalid file, another peft_type, a newer format_version, or a
            missing/bad field (named, with its value).
    """
    data = read_config_file(folder, PEFT_TYPE)
    path = Path(folder) / CONFIG_FILE
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


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    """Put a saved bottleneck adapter onto a base model as adapter `name`, the active one
    (several may be loaded under different names).

    Raises:
        GraftError: the name is taken; unreadable files; keys that are not adapter tensors,
            name modules the model lacks, or miss one of a module's four tensors; modules other
            than the placement's (all listed at once); a tensor of the wrong shape (file, key,
            expected and found); another base (see `force`).
    """
    folder = Path(folder)
    config = read_config(folder)
    groups = BOTTLENECK_ADAPTERS.read_weights(model, folder, name, force)
    sites = [m for m, _ in find_sites(model, config.placement)]
    BOTTLENECK_ADAPTERS.check_modules(folder, groups, sites, f"placement {config.placement!r}")
    expected = {}
    for module_name in sites:
        d = output_features(model.get_submodule(module_name))
        shapes = {key: shape_of(d, config.size) for key, shape_of in TENSORS.items()}
        why = f"hidden size {d}, bottleneck_size {config.size} in {CONFIG_FILE}"
        expected[module_name] = (shapes, why)
    BOTTLENECK_ADAPTERS.check_shapes(folder, groups, expected)
    add_bottleneck(model, config, name)
    BOTTLENECK_ADAPTERS.copy_in(model, name, groups)


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`: size, placement, nonlinearity."""
    config = read_config(Path(folder))
    return {
        "method_facts": {
            "bottleneck": f"size {config.size}, {config.activation}, placement {config.placement!r}"
        }
    }
