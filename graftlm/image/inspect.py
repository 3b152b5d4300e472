"""`graftlm inspect` on the LoRA files image users share (diffusers' and kohya's formats).

No model is loaded: the facts come from the file's keys, shapes and header.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from graftlm.image.lora_files import WEIGHTS_NAME, read_lora_file


def is_image_lora(path: str | os.PathLike) -> bool:
    """A `.safetensors` file, or a folder with diffusers' `pytorch_lora_weights.safetensors`
    (and no PEFT `adapter_config.json`, which the ordinary inspect reads)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".safetensors" and path.name != "adapter_model.safetensors"
    return (path / WEIGHTS_NAME).is_file() and not (path / "adapter_config.json").is_file()


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a diffusers or kohya LoRA file: format, and per part (unet, text_encoder)
    the adapted modules, their kinds, ranks and alphas, and parameter counts.

    Raises:
        GraftError: the file cannot be read as either format (read_lora_file).
    """
    lora = read_lora_file(path)
    parts = {}
    for part, modules in lora.parts.items():
        ranks = collections.Counter(int(e["lora_A"].shape[0]) for e in modules.values())
        header = lora.configs.get(part, {})
        alphas = collections.Counter(
            e["alpha"] for e in modules.values() if "alpha" in e
        ) or collections.Counter({header.get("lora_alpha", "= r (none in the file)"): len(modules)})
        parts[part] = {
            "modules": len(modules),
            "conv_modules": sum(e["lora_A"].dim() > 2 for e in modules.values()),
            "module_kinds": sorted({_kind(m) for m in modules}),
            "ranks": {str(r): n for r, n in sorted(ranks.items())},
            "alphas": {str(a): n for a, n in alphas.items()},
            "parameters": sum(e["lora_A"].numel() + e["lora_B"].numel() for e in modules.values()),
        }
    return {
        "path": str(lora.path),
        "method": "lora",
        "format": lora.format,
        "parts": parts,
        "file_bytes": lora.path.stat().st_size,
    }


# layer names that hold "_" themselves, longest first (kohya's flattened names end with them)
_KOHYA_KINDS = (
    "ff_net_0_proj", "ff_net_2", "to_out_0", "conv_shortcut", "proj_in", "proj_out", "out_proj",
    "q_proj", "k_proj", "v_proj", "to_q", "to_k", "to_v", "conv1", "conv2", "fc1", "fc2",
)  # fmt: skip


def _kind(module: str) -> str:
    """The layer's own name: "to_q", "to_out.0", "conv1" (kohya's names: the last segment)."""
    if "." not in module:  # kohya flattens names with "_"
        return next((k for k in _KOHYA_KINDS if module.endswith("_" + k)), module.rsplit("_")[-1])
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def format_description(facts: dict[str, Any]) -> str:
    """Human-readable lines for `describe`'s facts."""
    lines = [
        f"adapter        {facts['path']}",
        f"method         lora ({facts['format']} format, for diffusers pipelines)",
    ]
    for part, info in facts["parts"].items():
        ranks = ", ".join(f"r={r}: {n}" for r, n in info["ranks"].items())
        alphas = ", ".join(f"{a}: {n}" for a, n in info["alphas"].items())
        lines += [
            f"{part:<14} {info['modules']} modules ({info['conv_modules']} conv), "
            f"{info['parameters']:,} parameters",
            f"  ranks        {ranks}",
            f"  alphas       {alphas}",
            f"  targets      {', '.join(info['module_kinds'])}",
        ]
    lines.append(f"file size      {facts['file_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)
