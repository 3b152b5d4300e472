"""Adapter folders in Hugging Face PEFT's format: save, load, and the checks in between.

A folder holds `adapter_config.json` (PEFT's field names) and `adapter_model.safetensors`
(PEFT's keys, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
B `[out, r]`), so PEFT, vLLM, TGI and LoRAX load what graftlm writes and graftlm loads what they
write. graftlm's own facts (base fingerprint, creation time, training summary) go to a side file
`graftlm.json` that PEFT never reads. Weights are read with safetensors only: no pickle.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# atomic_write_json, read_adapter_weights and save_adapter stay importable from here for callers
# written before adapters.folder and adapters.io held them (cli/infer.py, export/, tests/export)
from graftlm.adapters.base_model import check_fingerprint
from graftlm.adapters.folder import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    atomic_write_json,  # noqa: F401
    group_keys,
    read_config,
    read_graft,
    strip_prefix,
    write_folder,
)
from graftlm.adapters.folder import read_weights as read_adapter_weights
from graftlm.adapters.io import save_adapter  # noqa: F401
from graftlm.adapters.modules import LAYER_INDEX, is_linear, linear_dims, name_matches
from graftlm.adapters.state import adapter_state
from graftlm.adapters.switch import adapter_names, set_adapter
from graftlm.errors import GraftError
from graftlm.methods.lora.config import ALL_LINEAR, LoraConfig
from graftlm.methods.lora.conv_layer import CONV_TYPES, LoraConv, is_conv
from graftlm.methods.lora.inject import inject, lora_layers
from graftlm.methods.lora.layer import LoraEmbedding, LoraLayerBase, TrainedCopies

# -- saving -----------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's checkpoint keys (adapter name removed).

    PiSSA adapters are converted to a plain LoRA over the *original* base weight: with
    initial (A0, B0) the update relative to W is s·(B A − B0 A0) = s·[B, −B0]·[A; A0], a
    rank-2r LoRA (the config written alongside doubles r and alpha so the scale stays).
    """
    config = _config(model, name)
    out: dict[str, torch.Tensor] = {}
    for module_name, layer in lora_layers(model):
        if name not in layer.ranks:
            continue
        key = PREFIX + module_name
        if isinstance(layer, LoraEmbedding):
            out[f"{key}.lora_embedding_A"] = layer.lora_embedding_A[name].detach().float()
            out[f"{key}.lora_embedding_B"] = layer.lora_embedding_B[name].detach().float()
            continue
        lora_a = layer.lora_A[name].weight.detach().float()
        lora_b = layer.lora_B[name].weight.detach().float()
        if name in layer.pissa_init:
            a0, b0 = layer.pissa_init[name]
            lora_a = torch.cat([lora_a, a0])
            lora_b = torch.cat([lora_b, -b0], dim=1)
        out[f"{key}.lora_A.weight"] = lora_a
        out[f"{key}.lora_B.weight"] = lora_b
        if name in layer.lora_magnitude_vector:  # DoRA's m, `[out]`, under PEFT's key
            out[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].detach().float()
        if config.bias != "none" and getattr(layer, "bias", None) is not None:
            out[f"{key}.base_layer.bias"] = layer.bias.detach()
    if config.bias == "all":
        adapted = {n for n, _ in lora_layers(model)}
        for param_name, param in model.named_parameters():
            owner = param_name.rsplit(".", 1)[0]
            if param_name.endswith("bias") and owner not in adapted:
                out[PREFIX + param_name] = param.detach()
    for module_name, module in model.named_modules():
        if isinstance(module, TrainedCopies) and name in module.modules_to_save:
            for key, value in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{module_name}.{key}"] = value.detach()
    return out


def _config(model: nn.Module, name: str) -> LoraConfig:
    state = adapter_state(model)
    if name not in state.adapters:
        raise GraftError(
            f"no adapter named {name!r}; the model has {state.names() or 'no adapters'}"
        )
    return state.adapters[name].config


def peft_target_modules(model: nn.Module, name: str) -> list[str] | str:
    """`target_modules` for PEFT that selects exactly the layers adapter `name` adapted.

    The user's spec is kept when PEFT's rules reproduce the same set (a list of suffixes for
    "all-linear", as PEFT itself writes); otherwise an anchored regex of the exact names.
    """
    config = _config(model, name)
    adapted = sorted(n for n, layer in lora_layers(model) if name in layer.ranks)
    candidates = [
        n
        for n, m in model.named_modules()
        if n
        and (
            isinstance(m, LoraLayerBase)
            or is_linear(m)
            or isinstance(m, nn.Embedding)
            or is_conv(m)
        )
        and not _inside_adapter(n)
    ]
    if config.targets == ALL_LINEAR:
        spec: list[str] | str = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    elif isinstance(config.targets, str):
        spec = config.targets
    else:
        spec = list(config.targets)

    def peft_selects(module_name: str) -> bool:
        if config.exclude is not None and name_matches(config.exclude, module_name):
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, module_name) is not None  # PEFT ignores layers for a regex
        if not name_matches(tuple(spec), module_name):
            return False
        if config.layers is not None:
            match = LAYER_INDEX.match(module_name)
            return match is not None and int(match.group("idx")) in config.layers
        return True

    if sorted(n for n in candidates if peft_selects(n)) == adapted:
        return spec
    return "^(?:" + "|".join(re.escape(n) for n in adapted) + ")$"


def _inside_adapter(module_name: str) -> bool:
    return bool(
        re.search(
            r"\.(lora_A|lora_B|lora_dropout|modules_to_save|original_module)(\.|$)", module_name
        )
    )


def save(
    model: nn.Module, folder: Path, base_model_name: str | None, name: str = "default"
) -> dict[str, torch.Tensor]:
    """Write adapter `name`'s `adapter_config.json` and weights, PEFT's format, atomically.

    Returns:
        The tensors written.
    """
    config = _config(model, name)
    tensors = adapter_state_dict(model, name)
    has_pissa = any(name in layer.pissa_init for _, layer in lora_layers(model))
    written = config
    if has_pissa:
        factor = math.sqrt(2) if config.use_rslora else 2.0
        written = config.replace(
            rank=config.rank * 2,
            alpha=config.alpha * factor,
            rank_pattern={k: v * 2 for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
            init="kaiming",
        )
    peft_config = written.to_peft_dict(
        base_model_name_or_path=base_model_name, target_modules=peft_target_modules(model, name)
    )
    if not hasattr(model, "prepare_inputs_for_generation"):
        # not a causal LM (a conv net, a diffusers UNet, a text encoder): PEFT would wrap it
        # in PeftModelForCausalLM, which needs generation methods; no task type loads it as is
        peft_config["task_type"] = None
    if isinstance(peft_config["target_modules"], str):
        # PEFT refuses layers_to_transform next to a regex target (ValueError on load); the
        # regex selects the layers by itself (an exact-name regex when layers were given)
        peft_config["layers_to_transform"] = None
    if any(
        getattr(layer, "fan_in_fan_out", False) and name in layer.ranks
        for _, layer in lora_layers(model)
    ):
        peft_config["fan_in_fan_out"] = True
    write_folder(Path(folder), peft_config, tensors)
    return tensors


def graft_facts(model: nn.Module, name: str) -> dict:
    """LoRA's entries of `graftlm.json`: the base's quantization, the init, the targets given."""
    config = _config(model, name)
    return {
        "quantize": config.quantize,
        "init": config.init,
        "targets": config.targets if isinstance(config.targets, str) else list(config.targets),
    }


# -- loading ----------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Parse `adapter_config.json` (and `graftlm.json` if present) of an adapter folder.

    Returns:
        (config, graftlm facts or {}).

    Raises:
        GraftError: missing folder/file, invalid JSON, or a config field that is missing or wrong.
    """
    data = read_config(path)
    graft = read_graft(path)
    config = LoraConfig.from_peft_dict(data, source=str(Path(path) / CONFIG_FILE))
    if graft.get("quantize"):
        config = config.replace(quantize=graft["quantize"])
    return config, graft


# a weights-file key (less PEFT's prefix) of a linear layer's / an embedding's A or B; PEFT's
# own files may name the adapter ("...q_proj.lora_A.default.weight")
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMB_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")
# DoRA's magnitude: PEFT's files write "...q_proj.lora_magnitude_vector" (its model holds
# "...lora_magnitude_vector.<adapter>.weight")
_MAG_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_magnitude_vector)(?:\.[^.]+\.weight)?")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    force: bool = False,
    activate: bool = True,
) -> LoraConfig:
    """Load a PEFT-format LoRA folder into `model` as adapter `name`.

    Args:
        model: the base model (plain or already holding other adapters).
        path: the adapter folder.
        name: the name it gets in this model.
        force: load even if the base fingerprint says the adapter was trained on another
            base model with the same shapes.
        activate: make it the active adapter.

    Returns:
        The adapter's config.

    Raises:
        GraftError: unreadable files; a key naming a module the model lacks, or a shape
            mismatch (the first one, with expected and found shapes); a fingerprint mismatch.
    """
    folder = Path(path)
    config, graft = read_adapter_config(folder)
    tensors = read_adapter_weights(folder)
    # architecture first; the weights fingerprint only after the shapes, because for a base
    # with other layer sizes the first mismatching key and its shapes say more than a hash
    check_fingerprint(model, graft, folder, force=True)
    return load_tensors(
        model,
        config,
        tensors,
        name,
        source=folder / WEIGHTS_FILE,
        activate=activate,
        check_base=lambda: check_fingerprint(model, graft, folder, force),
    )


def load_tensors(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    name: str = "default",
    *,
    source: Path,
    activate: bool = True,
    check_base: Callable[[], None] | None = None,
) -> LoraConfig:
    """Load LoRA tensors under PEFT's keys (`tensors`, as a PEFT weights file holds them) into
    `model` as adapter `name`: every key and shape is checked before the model changes.

    Args:
        model: the base model (plain or already holding other adapters).
        config: the adapter's config (ranks, alphas, targets).
        tensors: PEFT's keys to tensors.
        name: the name it gets in this model.
        source: the file the tensors came from, named in errors.
        activate: make it the active adapter.
        check_base: called after the shape checks, before the model changes (the folder's
            base fingerprint check).

    Returns:
        `config`.

    Raises:
        GraftError: a key naming a module the model lacks, a shape mismatch, a rank that is
            not the config's.
    """

    lora, rest = group_keys(tensors, _LORA_KEY)
    magnitudes, rest = group_keys(rest, _MAG_KEY)
    embeddings, rest = group_keys(rest, _EMB_KEY)
    for module_name, pair in embeddings.items():
        lora[module_name] = {k.replace("lora_embedding_", "lora_"): v for k, v in pair.items()}
    others = {strip_prefix(key): tensor for key, tensor in rest.items()}
    if not lora:
        raise GraftError(f"{source}: no LoRA tensors (keys like '...lora_A.weight') found")

    modules = dict(model.named_modules())
    for module_name, pair in lora.items():
        missing = [k for k in ("lora_A", "lora_B") if k not in pair]
        if missing:
            raise GraftError(f"{source}: {module_name} has no {' / '.join(missing)} tensor")
        module = modules.get(module_name)
        if module is None:
            raise GraftError(
                f"{source}: key {PREFIX}{module_name}.lora_A names module {module_name!r}, "
                f"which {type(model).__name__} does not have: the adapter was trained on another architecture"
            )
        _check_shapes(source, module_name, module, pair, config)
    _check_magnitudes(source, lora, magnitudes, config)
    if check_base is not None:
        check_base()

    exact = "^(?:" + "|".join(re.escape(n) for n in lora) + ")$"
    inject(model, config.replace(targets=exact, exclude=None, layers=None, init="kaiming"), name)
    adapter_state(model).add(name, "lora", config)  # its own spec, not the exact-name regex
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for module_name, pair in lora.items():
            layer = layers[module_name]
            if isinstance(layer, LoraEmbedding):
                layer.lora_embedding_A[name].copy_(pair["lora_A"])
                layer.lora_embedding_B[name].copy_(pair["lora_B"])
            else:
                layer.lora_A[name].weight.copy_(pair["lora_A"])
                layer.lora_B[name].weight.copy_(pair["lora_B"])
                if module_name in magnitudes:
                    magnitude = magnitudes[module_name]["lora_magnitude_vector"]
                    layer.lora_magnitude_vector[name].copy_(magnitude)
        _load_others(model, name, config, others, source)
    if activate:
        set_adapter(model, name)
    elif len(adapter_names(model)) > 1:
        set_adapter(model, [n for n in adapter_names(model) if n != name][:1])
    return config


def _check_shapes(
    source: Path, module_name: str, module: nn.Module, pair: dict, config: LoraConfig
) -> None:
    if isinstance(module, (LoraConv, *CONV_TYPES)):
        _check_conv_shapes(source, module_name, module, pair, config)
        return
    if isinstance(module, LoraLayerBase) and not isinstance(module, LoraEmbedding):
        in_f, out_f = module.in_features, module.out_features
    elif isinstance(module, (nn.Embedding, LoraEmbedding)):
        in_f, out_f = module.num_embeddings, module.embedding_dim
    elif is_linear(module):
        out_f, in_f = linear_dims(module)
    else:
        raise GraftError(
            f"{source}: {module_name} is a {type(module).__name__}, which LoRA cannot adapt"
        )
    rank = pair["lora_A"].shape[0]
    for kind, expected in (("lora_A", (rank, in_f)), ("lora_B", (out_f, rank))):
        found = tuple(pair[kind].shape)
        if found != expected:
            raise GraftError(
                f"{source}: {PREFIX}{module_name}.{kind}: expected shape {expected}, found {found} "
                "(the adapter was trained on a base model with other layer sizes)"
            )
    if rank != config.rank_for(module_name):
        raise GraftError(
            f"{source}: {module_name} has rank {rank}, but {CONFIG_FILE} gives it "
            f"rank {config.rank_for(module_name)} (r / rank_pattern)"
        )


def _check_conv_shapes(
    source: Path, module_name: str, module: nn.Module, pair: dict, config: LoraConfig
) -> None:
    """A conv's A is `[r, in, *kernel]` and B `[out, r, 1, ...]` (PEFT's layout)."""
    weight = module.weight  # [out, in, *kernel]
    rank = pair["lora_A"].shape[0]
    ones = (1,) * (weight.dim() - 2)
    expected_a = (rank, weight.shape[1], *weight.shape[2:])
    expected_b = (weight.shape[0], rank, *ones)
    for kind, expected in (("lora_A", expected_a), ("lora_B", expected_b)):
        found = tuple(pair[kind].shape)
        if found != expected:
            raise GraftError(
                f"{source}: {PREFIX}{module_name}.{kind}: expected shape {expected}, "
                f"found {found} (the adapter was trained on a base model with other layer sizes)"
            )
    if rank != config.rank_for(module_name):
        raise GraftError(
            f"{source}: {module_name} has rank {rank}, but {CONFIG_FILE} gives it "
            f"rank {config.rank_for(module_name)} (r / rank_pattern)"
        )


def _check_magnitudes(source: Path, lora: dict, magnitudes: dict, config: LoraConfig) -> None:
    """DoRA: a `[out]` magnitude for every adapted module when `use_dora`, none otherwise."""
    if not config.use_dora:
        if magnitudes:
            raise GraftError(
                f"{source}: has lora_magnitude_vector tensors (DoRA), but "
                f"{CONFIG_FILE} does not set use_dora: true"
            )
        return
    missing = sorted(set(lora) - set(magnitudes))
    if missing:
        raise GraftError(
            f"{source}: {CONFIG_FILE} sets use_dora: true, but these modules have "
            f"no lora_magnitude_vector: {missing[:10]}"
        )
    for module_name, entry in magnitudes.items():
        if module_name not in lora:
            raise GraftError(
                f"{source}: {PREFIX}{module_name}.lora_magnitude_vector has no "
                "lora_A / lora_B beside it"
            )
        found, out_f = (
            tuple(entry["lora_magnitude_vector"].shape),
            lora[module_name]["lora_B"].shape[0],
        )
        if found != (out_f,):
            raise GraftError(
                f"{source}: {PREFIX}{module_name}.lora_magnitude_vector: expected "
                f"shape {(out_f,)}, found {found}"
            )


def _load_others(
    model: nn.Module, name: str, config: LoraConfig, others: dict, source: Path
) -> None:
    """Biases and modules_to_save; PEFT's copies of untouched base embeddings are skipped."""
    params = dict(model.named_parameters())
    copies = {n: m for n, m in model.named_modules() if isinstance(m, TrainedCopies)}
    unexpected = []
    for key, tensor in others.items():
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".base_layer") and leaf == "bias":
            target = params.get(owner[: -len(".base_layer")] + ".bias")
        elif owner.endswith(".base_layer") and leaf == "weight":
            continue  # PEFT saves the base embedding when an embedding is targeted
        else:
            target = None
            for copy_name, module in copies.items():
                if key.startswith(copy_name + ".") and name in module.modules_to_save:
                    sub = module.modules_to_save[name].state_dict()
                    rel = key[len(copy_name) + 1 :]
                    if rel in sub:
                        target = sub[rel]
            if target is None and leaf == "bias":
                target = params.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            raise GraftError(
                f"{source}: {key}: expected shape {tuple(target.shape)}, found {tuple(tensor.shape)}"
            )
        target.copy_(tensor.to(target.dtype))
    if unexpected:
        raise GraftError(f"{source}: unexpected keys the model cannot place: {unexpected[:10]}")
