"""Surgery on any `nn.Module`: pick target layers, swap in LoRA layers, freeze the rest.

No subclass of the user's model and no wrapper: `inject` replaces submodules in place and
records the adapter configs on the model (`model.graftlm_configs`). Everything else here is a
plain function over that model: switch, disable, delete, merge, per-row adapter choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from graftlm.adapters.modules import (
    LAYER_INDEX,
    check_adapter_name,
    is_linear,
    linear_dims,
    name_matches,
    output_head_names,
    set_module,
)
from graftlm.errors import GraftError
from graftlm.methods.lora.config import ALL_LINEAR, LoraConfig
from graftlm.methods.lora.layer import (
    LoraEmbedding,
    LoraLayerBase,
    LoraLinear,
    TrainedCopies,
)


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
            isinstance(module, LoraLayerBase) and not isinstance(module, LoraEmbedding)
        )
        if config.targets == ALL_LINEAR:
            hit = linear and name not in heads
        else:
            hit = name_matches(config.targets, name) and (
                linear or isinstance(module, (nn.Embedding, LoraEmbedding))
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


@dataclass
class InjectSummary:
    """What `inject` did: trainable/total parameters and the adapted modules."""

    adapter: str
    trainable: int
    total: int
    modules: list[tuple[str, str, int]]  # (module name, layer type, rank)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [
            f"adapter {self.adapter!r}: {len(self.modules)} modules, "
            f"trainable {self.trainable:,} / {self.total:,} parameters ({self.percent:.3f}%)"
        ]
        by_suffix: dict[tuple[str, str, int], int] = {}
        for name, kind, rank in self.modules:
            key = (name.rsplit(".", 1)[-1], kind, rank)
            by_suffix[key] = by_suffix.get(key, 0) + 1
        for (suffix, kind, rank), count in sorted(by_suffix.items()):
            lines.append(f"  {suffix:<16} {kind:<10} rank {rank:<4} x{count}")
        return "\n".join(lines)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayerBase]]:
    """Every LoRA layer in the model, with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayerBase):
            yield name, module


def _adapted_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Modules that compute per-row adapters: LoRA layers and any method's row-aware modules."""
    for module in model.modules():
        if isinstance(module, (LoraLayerBase, TrainedCopies)) or getattr(
            module, "graftlm_row_aware", False
        ):
            yield module


def base_fingerprint(model: nn.Module) -> dict:
    """Identify a base model: architecture, layer shapes, and a hash of a few weight slices.

    Computed once, before any adapter touches the weights (merging or PiSSA change them), and
    cached on the model. The weight hash reads input-embedding rows cast to bf16, which stay
    the same whether the base is loaded in fp32, bf16, or with 4-bit linear layers.
    """
    cached = getattr(model, "graftlm_fingerprint", None)
    if cached is not None:
        return cached
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    shapes = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            shapes.update(f"{name}:{module.out_features}x{module.in_features};".encode())
        elif isinstance(module, (LoraEmbedding, nn.Embedding)):
            shapes.update(f"{name}:{module.num_embeddings}x{module.embedding_dim};".encode())
        elif is_linear(module) and not isinstance(module, LoraLayerBase):
            out_f, in_f = linear_dims(module)
            shapes.update(f"{name}:{out_f}x{in_f};".encode())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = embeddings.weight.detach() if embeddings is not None else None
    fingerprint = {
        "architecture": arch,
        "model_type": getattr(config, "model_type", None),
        "shapes_sha256": shapes.hexdigest()[:16],
        "weights_sha256": embedding_hash(table),
    }
    model.graftlm_fingerprint = fingerprint
    return fingerprint


def embedding_hash(table: torch.Tensor | None) -> str:
    """The ``weights_sha256`` of a base fingerprint: the first, middle and last 8 rows of the
    input-embedding table `(vocab, dim)`, as bf16 (also computed from GGUF files on export)."""
    weights = hashlib.sha256()
    if table is not None:
        rows = torch.cat(
            [table[:8], table[table.shape[0] // 2 : table.shape[0] // 2 + 8], table[-8:]]
        )
        weights.update(rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return weights.hexdigest()[:16]


def quantize_base(model: nn.Module) -> None:
    """Turn the base's linear layers into NF4 (QLoRA), once; a no-op if already quantized.

    The fingerprint is taken first, from the 16/32-bit weights, so a QLoRA adapter and a LoRA
    adapter trained on the same base carry the same fingerprint.
    """
    if any(getattr(m, "is_quantized_linear", False) for m in model.modules()):
        return
    from graftlm.quant.nf4_linear import quantize_model_linears

    base_fingerprint(model)
    quantize_model_linears(model)


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
    configs = getattr(model, "graftlm_configs", None)
    if configs is None:
        configs = {}
        model.graftlm_configs = configs
    if name in configs:
        raise GraftError(
            f"adapter {name!r} already exists; delete_adapter() it first or pick a new name"
        )
    check_adapter_name(name)
    if config.quantize == "nf4":
        quantize_base(model)
    base_fingerprint(model)
    targets = find_targets(model, config)
    added = []
    for module_name in targets:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoraLayerBase):
            if isinstance(module, nn.Embedding):
                wrapped: LoraLayerBase = LoraEmbedding(module)
            else:
                wrapped = _wrap_linear(module)
            set_module(model, module_name, wrapped)
            module = wrapped
        rank = config.rank_for(module_name)
        module.add(name, rank, config.scaling_for(module_name), config.dropout, config.init)
        added.append((module_name, type(module).__name__, rank))
    for module_name in config.modules_to_save:
        _add_trained_copies(model, module_name, name)
    configs[name] = config
    set_adapter(model, name)
    return summarize(model, name, added)


def _wrap_linear(module: nn.Module) -> LoraLayerBase:
    if getattr(module, "is_quantized_linear", False):
        from graftlm.methods.lora.nf4_layer import LoraNF4Linear

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


def summarize(model: nn.Module, adapter: str, modules: list[tuple[str, str, int]]) -> InjectSummary:
    """Count trainable and total parameters (shared Parameters counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        # a 4-bit weight packs two values per byte: count logical parameters
        count *= getattr(param, "graftlm_values_per_element", 1)
        total += count
        if param.requires_grad:
            trainable += count
    for buffer in model.buffers():
        total += buffer.numel() * getattr(buffer, "graftlm_values_per_element", 0)
    return InjectSummary(adapter=adapter, trainable=trainable, total=total, modules=modules)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in `model`, in the order they were added."""
    return list(getattr(model, "graftlm_configs", {}) or {})


def _require(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model) + list(getattr(model, "graftlm_other_adapters", {}) or {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GraftError(f"unknown adapter(s) {unknown}; the model has {known or 'no adapters'}")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s) (their updates add up) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in _adapted_modules(model):
        module.active_adapters = [n for n in names if _has(module, n)]
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
    for n in names:
        _set_bias_trainable(model, model.graftlm_configs[n])
    model.graftlm_active = names


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


def active_adapters(model: nn.Module) -> list[str]:
    """The currently active adapter names."""
    return list(getattr(model, "graftlm_active", []))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (unmerging it first if it was merged)."""
    _require(model, [name])
    for module in _adapted_modules(model):
        module.delete(name)
    del model.graftlm_configs[name]
    remaining = [n for n in active_adapters(model) if n != name]
    model.graftlm_active = remaining


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (merged adapters are unmerged, then re-merged)."""
    merged = {id(layer): list(layer.merged_adapters) for _, layer in lora_layers(model)}
    modules = list(_adapted_modules(model))
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


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Give each batch row its own adapter inside the block (None or "base": no adapter).

    Rows sharing an adapter are computed together: one base product for the whole batch,
    then one low-rank product per adapter over its rows.

    Args:
        names: one entry per batch row.
    """
    rows_by_name: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        key = None if name in (None, "base") else name
        rows_by_name.setdefault(key, []).append(row)
    _require(model, [n for n in rows_by_name if n is not None])
    groups = [(name, torch.tensor(rows, dtype=torch.long)) for name, rows in rows_by_name.items()]
    modules = list(_adapted_modules(model))
    for module in modules:
        device = next(iter(module.parameters()), torch.empty(0)).device
        module.row_groups = [(n, r.to(device)) for n, r in groups]
    try:
        yield
    finally:
        for module in modules:
            module.row_groups = None


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Merge the active adapters (or `names`) into the base weights; idempotent, fp32 math."""
    names = active_adapters(model) if names is None else names
    _require(model, names)
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
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayerBase):
            set_module(model, name, module.to_plain())
        elif isinstance(module, TrainedCopies):
            set_module(model, name, module._current())
    # the fingerprint too: it describes the base before merging, not the merged model
    for attr in ("graftlm_configs", "graftlm_active", "graftlm_fingerprint"):
        if hasattr(model, attr):
            delattr(model, attr)
    for param in model.parameters():
        param.requires_grad_(False)
    return model
