"""Adapter folders in Hugging Face PEFT's format: save, load, and the checks in between.

A folder holds `adapter_config.json` (PEFT's field names) and `adapter_model.safetensors`
(PEFT's keys, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
B `[out, r]`), so PEFT, vLLM, TGI and LoRAX load what graftlm writes and graftlm loads what they
write. graftlm's own facts (base fingerprint, creation time, training summary) go to a side file
`graftlm.json` that PEFT never reads. Weights are read with safetensors only: no pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.modules import LAYER_INDEX, is_linear, name_matches
from graftlm.errors import GraftError
from graftlm.methods.lora.config import ALL_LINEAR, LoraConfig
from graftlm.methods.lora.inject import (
    adapter_names,
    base_fingerprint,
    inject,
    lora_layers,
    set_adapter,
)
from graftlm.methods.lora.layer import LoraEmbedding, LoraLayerBase, TrainedCopies

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GRAFT_FILE = "graftlm.json"
PREFIX = "base_model.model."


# -- atomic file writes -----------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata or {"format": "pt"}))


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
    configs = getattr(model, "graftlm_configs", {}) or {}
    if name not in configs:
        raise GraftError(
            f"no adapter named {name!r}; the model has {list(configs) or 'no adapters'}"
        )
    return configs[name]


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
        and (isinstance(m, LoraLayerBase) or is_linear(m) or isinstance(m, nn.Embedding))
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


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    training: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write adapter `name` as a PEFT-format folder (each file written atomically).

    Args:
        model: a model with the adapter injected.
        path: the folder (created if needed; other files in it are left alone).
        name: which adapter to save.
        training: a training summary to record in `graftlm.json`.
        extra: further graftlm facts for `graftlm.json`.

    Returns:
        The folder path.
    """
    config = _config(model, name)
    folder = Path(path)
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
    base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    peft_config = written.to_peft_dict(
        base_model_name_or_path=base_name, target_modules=peft_target_modules(model, name)
    )
    if isinstance(peft_config["target_modules"], str):
        # PEFT refuses layers_to_transform next to a regex target (ValueError on load); the
        # regex selects the layers by itself (an exact-name regex when layers were given)
        peft_config["layers_to_transform"] = None
    if any(
        getattr(layer, "fan_in_fan_out", False) and name in layer.ranks
        for _, layer in lora_layers(model)
    ):
        peft_config["fan_in_fan_out"] = True
    graft = {
        "format_version": 1,
        "method": "lora",
        "graftlm_version": graftlm_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_fingerprint": base_fingerprint(model),
        "quantize": config.quantize,
        "init": config.init,
        "targets": config.targets if isinstance(config.targets, str) else list(config.targets),
        "trainable_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    if training:
        graft["training"] = training
    if extra:
        graft.update(extra)
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, peft_config)
    atomic_write_json(folder / GRAFT_FILE, graft)
    return folder


def graftlm_version() -> str:
    from graftlm import __version__

    return __version__


# -- loading ----------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Parse `adapter_config.json` (and `graftlm.json` if present) of an adapter folder.

    Returns:
        (config, graftlm facts or {}).

    Raises:
        GraftError: missing folder/file, invalid JSON, or a config field that is missing or wrong.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise GraftError(f"adapter folder {str(folder)!r} does not exist")
    if not config_path.is_file():
        raise GraftError(
            f"{config_path}: not found (an adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraftError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GraftError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
    graft: dict = {}
    graft_path = folder / GRAFT_FILE
    if graft_path.is_file():
        try:
            graft = json.loads(graft_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GraftError(f"{graft_path}: not valid JSON ({exc})") from None
    config = LoraConfig.from_peft_dict(data, source=str(config_path))
    if graft.get("quantize"):
        config = config.replace(quantize=graft["quantize"])
    return config, graft


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` (safetensors only; never pickle).

    Raises:
        GraftError: missing, truncated or corrupt file.
    """
    from safetensors.torch import load_file

    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        if (Path(path) / "adapter_model.bin").is_file():
            raise GraftError(
                f"{Path(path)}: only adapter_model.bin (pickle) found; graftlm reads safetensors only. "
                "Convert it with PEFT (save_pretrained(safe_serialization=True)) first"
            )
        raise GraftError(f"{weights_path}: not found")
    try:
        return load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for bad headers / short files
        raise GraftError(
            f"{weights_path}: cannot read, file is truncated or corrupt ({exc})"
        ) from None


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_EMB_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$"
)


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

    lora: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        match = _LORA_KEY.match(bare) or _EMB_KEY.match(bare)
        if match:
            kind = match.group("kind").replace("lora_embedding_", "lora_")
            lora.setdefault(match.group("module"), {})[kind] = tensor
        else:
            others[bare] = tensor
    if not lora:
        raise GraftError(
            f"{folder / WEIGHTS_FILE}: no LoRA tensors (keys like '...lora_A.weight') found"
        )

    modules = dict(model.named_modules())
    for module_name, pair in lora.items():
        missing = [k for k in ("lora_A", "lora_B") if k not in pair]
        if missing:
            raise GraftError(
                f"{folder / WEIGHTS_FILE}: {module_name} has no {' / '.join(missing)} tensor"
            )
        module = modules.get(module_name)
        if module is None:
            raise GraftError(
                f"{folder / WEIGHTS_FILE}: key {PREFIX}{module_name}.lora_A names module {module_name!r}, "
                f"which {type(model).__name__} does not have: the adapter was trained on another architecture"
            )
        _check_shapes(folder, module_name, module, pair, config)
    check_fingerprint(model, graft, folder, force)

    exact = "^(?:" + "|".join(re.escape(n) for n in lora) + ")$"
    inject(model, config.replace(targets=exact, exclude=None, layers=None, init="kaiming"), name)
    model.graftlm_configs[name] = (
        config  # remember the adapter's own spec, not the exact-name regex
    )
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
        _load_others(model, name, config, others, folder)
    if activate:
        set_adapter(model, name)
    elif len(adapter_names(model)) > 1:
        set_adapter(model, [n for n in adapter_names(model) if n != name][:1])
    return config


def check_fingerprint(model: nn.Module, graft: dict, folder: Path, force: bool) -> None:
    expected = graft.get("base_fingerprint")
    if not expected:
        return  # trained elsewhere (PEFT, ...): shapes are checked key by key instead
    found = base_fingerprint(model)
    if expected.get("architecture") != found.get("architecture"):
        raise GraftError(
            f"{folder}: adapter was trained on a {expected.get('architecture')} base, "
            f"this model is a {found.get('architecture')}"
        )
    if expected.get("weights_sha256") != found.get("weights_sha256") and not force:
        raise GraftError(
            f"{folder}: adapter was trained on a different base model with the same architecture "
            f"(weights fingerprint {expected.get('weights_sha256')} != {found.get('weights_sha256')}); "
            "pass force=True (CLI: --force) to load it anyway"
        )


def _check_shapes(
    folder: Path, module_name: str, module: nn.Module, pair: dict, config: LoraConfig
) -> None:
    if isinstance(module, LoraLayerBase) and not isinstance(module, LoraEmbedding):
        in_f, out_f = module.in_features, module.out_features
    elif isinstance(module, (nn.Embedding, LoraEmbedding)):
        in_f, out_f = module.num_embeddings, module.embedding_dim
    elif is_linear(module):
        from graftlm.adapters.modules import linear_dims

        out_f, in_f = linear_dims(module)
    else:
        raise GraftError(
            f"{folder / WEIGHTS_FILE}: {module_name} is a {type(module).__name__}, which LoRA cannot adapt"
        )
    rank = pair["lora_A"].shape[0]
    for kind, expected in (("lora_A", (rank, in_f)), ("lora_B", (out_f, rank))):
        found = tuple(pair[kind].shape)
        if found != expected:
            raise GraftError(
                f"{folder / WEIGHTS_FILE}: {PREFIX}{module_name}.{kind}: expected shape {expected}, found {found} "
                "(the adapter was trained on a base model with other layer sizes)"
            )
    if rank != config.rank_for(module_name):
        raise GraftError(
            f"{folder / WEIGHTS_FILE}: {module_name} has rank {rank}, but {CONFIG_FILE} gives it "
            f"rank {config.rank_for(module_name)} (r / rank_pattern)"
        )


def _load_others(
    model: nn.Module, name: str, config: LoraConfig, others: dict, folder: Path
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
                f"{folder / WEIGHTS_FILE}: {key}: expected shape {tuple(target.shape)}, found {tuple(tensor.shape)}"
            )
        target.copy_(tensor.to(target.dtype))
    if unexpected:
        raise GraftError(
            f"{folder / WEIGHTS_FILE}: unexpected keys the model cannot place: {unexpected[:10]}"
        )
