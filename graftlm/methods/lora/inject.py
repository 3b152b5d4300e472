"""Surgery on any `nn.Module`: pick target layers, swap in LoRA layers, freeze the rest.

No subclass of the user's model and no wrapper: `inject` replaces submodules in place and
records the adapter in the model's `AdapterState`. The rest is LoRA's side of the method
contract (`adapters.contract`), plain functions over that model: which adapters the layers
apply, disabling, deleting, merging. AdaLoRA's layers are LoRA layers, so AdaLoRA uses these
too. `adapters.switch` calls them for the public `graftlm.set_adapter`, `graftlm.merge`, ...
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

# embedding_hash and the switching functions stay importable from here for callers written
# before adapters.base_model and adapters.switch held them (export/gguf_base.py, examples/demo.py,
# bench/, tests/serve/test_registry.py); new code imports them from there
from graftlm.adapters.base_model import base_fingerprint, embedding_hash, quantize_base  # noqa: F401
from graftlm.adapters.contract import InjectSummary, summarize
from graftlm.adapters.modules import (
    LAYER_INDEX,
    freeze,
    is_linear,
    name_matches,
    output_head_names,
    set_module,
)
from graftlm.adapters.state import adapter_state, forget_state
from graftlm.adapters.switch import (  # noqa: F401
    adapter_names,
    delete_adapter,
    disable_adapters,
    row_adapters,
    set_adapter,
)
from graftlm.errors import GraftError
from graftlm.methods.lora.config import ALL_LINEAR, LoraConfig
from graftlm.methods.lora.conv_layer import CONV_TYPES, LoraConv, is_conv
from graftlm.methods.lora.layer import (
    LoraEmbedding,
    LoraLayerBase,
    LoraLinear,
    TrainedCopies,
)
from graftlm.methods.lora.loftq import loftq_init
from graftlm.methods.lora.nf4_layer import LoraNF4Linear


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts, in model order (PEFT's matching rules).

    Raises:
        GraftError: nothing matched; the message lists the model's linear-layer names.
    """
    heads = output_head_names(model)
    found = []
    for name, module in _candidate_modules(model):
        if config.exclude is not None and name_matches(config.exclude, name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save):
            continue
        # a layer already holding another adapter's LoRA counts as the layer it wraps
        linear = is_linear(module) or (
            isinstance(module, LoraLayerBase) and not isinstance(module, (LoraEmbedding, LoraConv))
        )
        if config.targets == ALL_LINEAR:
            hit = linear and name not in heads
        else:  # convs are adapted when named, as PEFT does ("all-linear" leaves them out)
            hit = name_matches(config.targets, name) and (
                linear
                or isinstance(module, (nn.Embedding, LoraEmbedding, LoraConv))
                or is_conv(module)
            )
        if hit and config.layers is not None:
            match = LAYER_INDEX.match(name)
            hit = match is not None and int(match.group("idx")) in config.layers
        if hit:
            found.append(name)
    if not found:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in _candidate_modules(model)
                if is_linear(m) or isinstance(m, LoraLinear)
            }
        )
        raise GraftError(
            f"targets {config.targets!r} matched no layer of {type(model).__name__}"
            + (f" within layers {list(config.layers)}" if config.layers is not None else "")
            + f"; its linear layers are named: {', '.join(linear)}"
        )
    return found


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules that may take an adapter: never the inside of a LoRA layer (its own A/B
    are nn.Linear too, and "all-linear" must not adapt them) nor a modules_to_save wrapper."""
    skip = None  # named_modules() is pre-order: a module's descendants follow it directly
    for name, module in model.named_modules():
        if not name or (skip is not None and name.startswith(skip)):
            continue
        if isinstance(module, (LoraLayerBase, TrainedCopies)):
            skip = name + "."
            if isinstance(module, TrainedCopies):
                continue
        yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayerBase]]:
    """Every LoRA layer in the model, with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayerBase):
            yield name, module


def _lora_modules(model: nn.Module) -> Iterator[nn.Module]:
    """LoRA layers and modules_to_save copies: the modules that hold LoRA adapters."""
    for module in model.modules():
        if isinstance(module, (LoraLayerBase, TrainedCopies)):
            yield module


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> InjectSummary:
    """Add a LoRA adapter called `name` to `model`, in place, and make it the active one.

    Targeted layers are replaced by LoRA layers that keep the base Parameters under their
    original names; every parameter but the new adapter's (and the biases / modules_to_save
    that `config` asks to train) is frozen.

    Args:
        model: any Hugging Face causal LM (or other `nn.Module`).
        config: the adapter's configuration.
        name: the adapter's name; several named adapters can live in one model.

    Returns:
        An `InjectSummary` (printable table of trainable parameters per module kind).

    Raises:
        GraftError: no module matched, the name is taken, or a layer cannot take LoRA.
    """
    state = adapter_state(model)
    state.check_new(name)
    if config.quantize == "nf4":
        quantize_base(model)
    base_fingerprint(model)
    targets = find_targets(model, config)
    if config.use_dora:
        _check_dora_targets(model, targets)
    added = []
    for module_name in targets:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoraLayerBase):
            if isinstance(module, nn.Embedding):
                wrapped: LoraLayerBase = LoraEmbedding(module)
            elif is_conv(module):
                wrapped = LoraConv(module)
            else:
                wrapped = _wrap_linear(module)
            set_module(model, module_name, wrapped)
            module = wrapped
        rank = config.rank_for(module_name)
        module.add(name, rank, config.scaling_for(module_name), config.dropout, config.init)
        added.append((module_name, type(module).__name__, rank))
    if config.init == "loftq":
        loftq_init(model, name)
    if config.use_dora:  # after every init that moves A, B or W: m starts at ‖W + s·B·A‖_row
        for module_name in targets:
            module = model.get_submodule(module_name)
            module.lora_magnitude_vector.init(module, name)
    for module_name in config.modules_to_save:
        _add_trained_copies(model, module_name, name)
    state.add(name, "lora", config)
    set_adapter(model, name)
    return summarize(model, name, added)


def _check_dora_targets(model: nn.Module, targets: list[str]) -> None:
    kinds = (nn.Embedding, LoraEmbedding, LoraConv, *CONV_TYPES)
    embeddings = [n for n in targets if isinstance(model.get_submodule(n), kinds)]
    if embeddings:
        raise GraftError(
            f"DoRA (use_dora) adapts linear layers only; targets include the embedding/conv(s) "
            f"{embeddings}: target linear layers, or use plain LoRA"
        )


def _wrap_linear(module: nn.Module) -> LoraLayerBase:
    if getattr(module, "is_quantized_linear", False):
        return LoraNF4Linear(module)
    return LoraLinear(module)


def _add_trained_copies(model: nn.Module, suffix: str, adapter: str) -> None:
    hits = [
        n
        for n, m in model.named_modules()
        if (n == suffix or n.endswith("." + suffix))
        and not isinstance(m, (LoraLayerBase,))
        and ".modules_to_save." not in n
        and not n.endswith(".original_module")
    ]
    if not hits:
        raise GraftError(f"modules_to_save: no module named {suffix!r} in {type(model).__name__}")
    for module_name in hits:
        module = model.get_submodule(module_name)
        if not isinstance(module, TrainedCopies):
            module = TrainedCopies(module)
            set_module(model, module_name, module)
        module.add(adapter)


# -- LoRA's side of the method contract (adapters.contract) -------------------------------------


def set_active(model: nn.Module, names: list[str]) -> None:
    """The LoRA layers apply those of `names` they hold (their updates add up), and these
    adapters' parameters train (and the biases their configs ask to train)."""
    held: set[str] = set()
    for module in _lora_modules(model):
        module.active_adapters = [n for n in names if _has(module, n)]
        held.update(module.active_adapters)
        if isinstance(module, TrainedCopies):
            for n in module.active_adapters:
                module.modules_to_save[n].requires_grad_(True)
        else:
            for n in module.active_adapters:
                for container in module._adapter_containers():
                    if n in container:
                        for param in (
                            container[n].parameters()
                            if isinstance(container, nn.ModuleDict)
                            else [container[n]]
                        ):
                            param.requires_grad_(True)
    configs = adapter_state(model).adapters
    for n in names:
        if n in held:
            _set_bias_trainable(model, configs[n].config)


def _has(module: nn.Module, name: str) -> bool:
    if isinstance(module, TrainedCopies):
        return name in module.modules_to_save
    return name in module.ranks


def _set_bias_trainable(model: nn.Module, config: LoraConfig) -> None:
    if config.bias == "all":
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            bias = getattr(layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)


def unload(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (unmerging it first if it was merged)."""
    state = adapter_state(model)
    state.require([name])
    for module in _lora_modules(model):
        module.delete(name)
    state.remove(name)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The LoRA layers compute the base alone inside the block (merged adapters are unmerged,
    then re-merged)."""
    merged = {id(layer): list(layer.merged_adapters) for _, layer in lora_layers(model)}
    modules = list(_lora_modules(model))
    try:
        for module in modules:
            if isinstance(module, LoraLayerBase):
                module.unmerge()
            module.disabled = True
        yield
    finally:
        for module in modules:
            module.disabled = False
            if isinstance(module, LoraLayerBase):
                module.merge(merged[id(module)])


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Merge the active adapters (or `names`) into the base weights; idempotent, fp32 math."""
    state = adapter_state(model)
    names = list(state.active) if names is None else names
    state.require(names)
    # all or nothing: look for NaN/inf updates before any layer changes, so a refused merge
    # leaves the model as it was rather than half merged
    for module_name, layer in lora_layers(model):
        for name in names:
            if name in layer.ranks and name not in layer.merged_adapters:
                if not torch.isfinite(layer.delta_weight(name)).all():
                    raise GraftError(
                        f"adapter {name!r} has NaN/inf values in {module_name}; refusing to merge "
                        "it (nothing was merged)"
                    )
    for _, layer in lora_layers(model):
        _untie_before_merge(model, layer, names)
        layer.merge([n for n in names if n in layer.ranks])


def unmerge(model: nn.Module) -> None:
    """Undo every merge, restoring the base weights (up to the weight dtype's rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def _untie_before_merge(model: nn.Module, layer: LoraLayerBase, names: list[str]) -> None:
    """A weight shared with another module (tied embeddings) gets its own copy before merging.

    Otherwise merging LoRA on `embed_tokens` would silently change `lm_head` too.
    """
    # `names`, not the active adapters: merge(model, ["x"]) may merge an inactive adapter
    if layer.merged_adapters or not any(n in layer.ranks for n in names):
        return
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is layer.weight]
    if len(owners) > 1:
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model (LoRA layers replaced by base layers).

    The result's state dict has the original class's keys, so it loads into a fresh instance.
    """
    merge(model)
    held: set[str] = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayerBase):
            held.update(module.ranks)
            set_module(model, name, module.to_plain())
        elif isinstance(module, TrainedCopies):
            held.update(module.modules_to_save)
            set_module(model, name, module.current())
    state = adapter_state(model)
    for name in held & set(state.adapters):
        state.remove(name)
    state.fingerprint = None  # it describes the base before merging, not the merged model
    if not state.adapters:
        forget_state(model)
    freeze(model)
    return model
