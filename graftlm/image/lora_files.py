"""The LoRA files image users share: diffusers' `pytorch_lora_weights.safetensors` and kohya's.

diffusers' layout (what `StableDiffusionPipeline.load_lora_weights` reads and
`save_lora_weights` writes) is one safetensors file with PEFT's keys under the pipeline
component they belong to, and each component's PEFT config in the header::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   [r, in]
    unet.down_blocks.0.resnets.0.conv1.lora_A.weight                               [r, in, 3, 3]
    text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight                   [out, r]
    header "lora_adapter_metadata": {"unet.r": 4, "unet.lora_alpha": 8, ...}

Older diffusers files name A and B `lora.down` / `lora.up`. kohya / A1111 files (sd-scripts,
most files on model-sharing sites) flatten the module name with underscores and keep a scale
per module::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (A)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (B)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             (scalar)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

with the update `alpha / r · up @ down`. The flattened name is matched against the model's own
module names flattened the same way, which is exact where guessing dots from underscores is not.
kohya's names for the diffusers layout of SD 1.x/2.x UNets are read; SDXL's names from the
original (LDM) checkpoint layout (`lora_unet_input_blocks_...`) are refused with a message.
A file without alphas (diffusers files without the header) gets alpha = r, as diffusers does.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from graftlm.adapters.folder import strip_prefix
from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.files import PREFIX, adapter_state_dict, load_tensors, peft_target_modules

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry with each part's PEFT config
PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?:lora_A|lora_B|lora\.down|lora\.up)(?:\.[^.]+)?\.weight")
_KOHYA_KEY = re.compile(
    r"(?P<module>lora_[a-z0-9]+_.+?)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)"
)


class LoraFile:
    """What a diffusers or kohya LoRA file holds, per pipeline part.

    Attributes:
        path: the file.
        format: "diffusers" or "kohya".
        parts: part ("unet", "text_encoder", ...) -> module name -> {"lora_A", "lora_B"}
            tensors (A `[r, in, *k]`, B `[out, r, *1]`), and "alpha" (float) where the file has it.
        configs: part -> PEFT config dict from the file's header, where it has one.
    """

    def __init__(self, path: Path, fmt: str, parts: dict, configs: dict) -> None:
        self.path, self.format, self.parts, self.configs = path, fmt, parts, configs

    def config(self, part: str, module_names: dict[str, str] | None = None) -> LoraConfig:
        """The LoraConfig of `part`: the header's, else ranks from the shapes and alphas from
        the file (alpha = r where it has none); `module_names` maps the file's names to the
        model's."""
        rename = module_names or {}
        if part in self.configs:
            config = LoraConfig.from_peft_dict(self.configs[part], source=f"{self.path}: {part}")
            return config.replace(targets=sorted(rename.get(m, m) for m in self.parts[part]))
        ranks, alphas = {}, {}
        for module, entry in self.parts[part].items():
            name = rename.get(module, module)
            ranks[name] = int(entry["lora_A"].shape[0])
            alphas[name] = float(entry.get("alpha", ranks[name]))
        rank = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        return LoraConfig(
            rank=rank,
            alpha=alpha,
            targets=sorted(ranks),
            rank_pattern={n: r for n, r in ranks.items() if r != rank},
            alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
        )


def weights_path(path: str | os.PathLike) -> Path:
    """The file itself, or `pytorch_lora_weights.safetensors` in a folder.

    Raises:
        GraftError: neither exists.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise GraftError(f"{path}: no such LoRA file")
    return path


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a diffusers-format or kohya-format LoRA file (safetensors only).

    Raises:
        GraftError: not a safetensors file; keys of neither format (the first few are named);
            a module with A but no B (or B but no A).
    """
    path = weights_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise GraftError(f"{path}: not a readable safetensors file ({exc})") from None
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in tensors):
        return LoraFile(path, "kohya", _kohya_parts(path, tensors), {})
    configs = {}
    if header.get(METADATA_KEY):
        try:
            packed = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise GraftError(f"{path}: header {METADATA_KEY!r} is not JSON ({exc})") from None
        for key, value in packed.items():
            part, _, field = key.partition(".")
            configs.setdefault(part, {})[field] = value
    return LoraFile(path, "diffusers", _diffusers_parts(path, tensors), configs)


def _diffusers_parts(path: Path, tensors: dict) -> dict:
    parts: dict = {}
    unexpected = []
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        match = _PEFT_KEY.fullmatch(rest)
        if part not in PARTS or match is None:
            unexpected.append(key)
            continue
        kind = "lora_A" if ".lora_A" in rest or ".lora.down" in rest else "lora_B"
        parts.setdefault(part, {}).setdefault(match.group("module"), {})[kind] = tensor
    if unexpected:
        raise GraftError(
            f"{path}: keys that are neither diffusers' LoRA keys ('unet.<module>.lora_A.weight') "
            f"nor kohya's ('lora_unet_<module>.lora_down.weight'): {unexpected[:5]}"
        )
    _check_pairs(path, parts)
    return parts


def _kohya_parts(path: Path, tensors: dict) -> dict:
    parts: dict = {}
    unexpected = []
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.fullmatch(key)
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        if match is None or prefix is None:
            unexpected.append(key)
            continue
        module = match.group("module")[len(prefix) :]
        entry = parts.setdefault(KOHYA_PREFIXES[prefix], {}).setdefault(module, {})
        kind = match.group("kind")
        if kind == "alpha":
            entry["alpha"] = float(tensor.float().item())
        else:
            entry["lora_A" if kind.startswith("lora_down") else "lora_B"] = tensor
    if unexpected:
        raise GraftError(
            f"{path}: kohya keys graftlm cannot read (LoRA's lora_down / lora_up / alpha only; "
            f"LoHa, LoKr, DoRA scales are not LoRA): {unexpected[:5]}"
        )
    _check_pairs(path, parts)
    return parts


def _check_pairs(path: Path, parts: dict) -> None:
    for part, modules in parts.items():
        for module, entry in modules.items():
            missing = [k for k in ("lora_A", "lora_B") if k not in entry]
            if missing:
                raise GraftError(f"{path}: {part} module {module!r} has no {'/'.join(missing)}")


def save_lora_weights(
    folder: str | os.PathLike, parts: dict[str, nn.Module], name: str = "default"
) -> Path:
    """Write adapter `name` of each part into `folder/pytorch_lora_weights.safetensors`,
    diffusers' layout (`StableDiffusionPipeline.load_lora_weights` reads it).

    Args:
        folder: created if missing.
        parts: pipeline part ("unet", "text_encoder", "text_encoder_2") -> its model, each
            holding adapter `name` (graftlm.inject).
        name: the adapter to save.

    Returns:
        The file written (atomically: a temporary file renamed into place).

    Raises:
        GraftError: an unknown part name, or a model without adapter `name`.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise GraftError(f"parts {unknown}: diffusers' LoRA files hold only {list(PARTS)}")
    tensors: dict[str, torch.Tensor] = {}
    header: dict = {}
    for part, model in parts.items():
        for key, tensor in adapter_state_dict(model, name).items():
            tensors[f"{part}.{strip_prefix(key)}"] = tensor.contiguous()
        config = _state_config(model, name)
        peft = config.to_peft_dict(
            base_model_name_or_path=None, target_modules=peft_target_modules(model, name)
        )
        peft["task_type"] = None
        header.update({f"{part}.{field}": value for field, value in peft.items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / WEIGHTS_NAME
    staged = folder / (WEIGHTS_NAME + ".tmp")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)}
    save_file(tensors, str(staged), metadata=metadata)
    os.replace(staged, target)
    return target


def _state_config(model: nn.Module, name: str) -> LoraConfig:
    # adapter_state_dict has already refused a model without adapter `name`
    return adapter_state(model).adapters[name].config


def load_lora_weights(
    path: str | os.PathLike, parts: dict[str, nn.Module], name: str = "default"
) -> dict[str, LoraConfig]:
    """Load a diffusers- or kohya-format LoRA file into the parts it covers, as adapter `name`.

    Args:
        path: the file, or a folder holding `pytorch_lora_weights.safetensors`.
        parts: pipeline part -> model ("unet", "text_encoder", "text_encoder_2").
        name: the adapter's name in each model.

    Returns:
        part -> the LoraConfig loaded into it.

    Raises:
        GraftError: the file holds a part not given (named), a module a model lacks, shapes
            that do not fit (the first one named), or keys of neither format.
    """
    lora = read_lora_file(path)
    missing = sorted(set(lora.parts) - set(parts))
    if missing:
        raise GraftError(
            f"{lora.path}: holds LoRA weights for {missing}, which were not given "
            f"(given: {sorted(parts)})"
        )
    plans = {}
    for part, modules in lora.parts.items():  # every part checked before any model changes
        names = _module_names(lora, part, parts[part], modules)
        plans[part] = (names, lora.config(part, names))
    loaded = {}
    for part, (names, config) in plans.items():
        tensors = {}
        for module, entry in lora.parts[part].items():
            target = parts[part].get_submodule(names[module])
            for kind in ("lora_A", "lora_B"):
                tensors[f"{PREFIX}{names[module]}.{kind}.weight"] = _fit(entry[kind], target)
        loaded[part] = load_tensors(parts[part], config, tensors, name, source=lora.path)
    return loaded


def _module_names(lora: LoraFile, part: str, model: nn.Module, modules: dict) -> dict[str, str]:
    """The file's module names -> the model's (kohya's flattened names; "text_model." that
    transformers 5's CLIPTextModel no longer has)."""
    own = [n for n, _ in model.named_modules() if n]
    lookup = {n: n for n in own}
    if lora.format == "kohya":
        lookup = {n.replace(".", "_"): n for n in own}
        lookup.update({"text_model_" + k: v for k, v in list(lookup.items())})
    else:
        lookup.update({"text_model." + n: n for n in own})
    names, unknown = {}, []
    for module in modules:
        if module in lookup:
            names[module] = lookup[module]
        else:
            unknown.append(module)
    if unknown:
        hint = (
            " (SDXL's original-checkpoint names are not read: convert the file with diffusers)"
            if any(m.startswith(("input_blocks", "middle_block", "output_blocks")) for m in unknown)
            else ""
        )
        raise GraftError(
            f"{lora.path}: {part} has no module(s) {unknown[:5]} that the file adapts "
            f"({type(model).__name__}){hint}"
        )
    return names


def _fit(tensor: torch.Tensor, target: nn.Module) -> torch.Tensor:
    """A/B of a 1x1 conv and of a linear layer are the same numbers: files written for a UNet
    whose proj_in / proj_out are 1x1 convs (SD 1.x) fit one where they are linear (SD 2.x,
    `use_linear_projection`), and the other way round."""
    weight = target.weight  # the base layer's ([out, in] or [out, in, *k]); LoRA layers keep it
    if weight.dim() == 2 and tensor.dim() > 2 and all(s == 1 for s in tensor.shape[2:]):
        return tensor.flatten(1)
    if weight.dim() > 2 and tensor.dim() == 2 and all(s == 1 for s in weight.shape[2:]):
        return tensor.view(*tensor.shape, *weight.shape[2:])
    return tensor
