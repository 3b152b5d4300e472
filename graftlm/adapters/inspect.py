"""`graftlm inspect`: what an adapter folder holds, read without loading any model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from graftlm.adapters.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    parameter_count,
    read_config,
    read_graft,
    reading,
    weight_shapes,
)
from graftlm.errors import GraftError
from graftlm.methods import PEFT_TYPES, method_module


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about an adapter folder: method, ranks, targets, parameters, size, fingerprint, training.

    Only the safetensors header is read (shapes), not the weights. The method's own
    `describe(folder)` adds its facts (and may name the method more precisely: "qlora").

    Raises:
        GraftError: not an adapter folder, or unreadable files.
    """
    with reading(path):
        return _facts(Path(path))


def _facts(folder: Path) -> dict[str, Any]:
    if not (folder / CONFIG_FILE).is_file():
        full = method_module("full")
        if full.is_model_folder(folder):
            return _full_facts(folder, full)
        raise GraftError(f"{folder}: not an adapter folder (no {CONFIG_FILE})")
    config = read_config(folder)
    graft = read_graft(folder)
    shapes = weight_shapes(folder)
    ranks: dict[int, int] = {}
    modules = set()
    for key, shape in shapes.items():
        if key.endswith("lora_A.weight") or key.endswith("lora_embedding_A"):
            ranks[shape[0]] = ranks.get(shape[0], 0) + 1
            modules.add(key.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1])
    peft_type = str(config.get("peft_type", "LORA")).upper()
    method = graft.get("method") or PEFT_TYPES.get(peft_type, peft_type.lower())
    module = method_module(PEFT_TYPES[peft_type]) if peft_type in PEFT_TYPES else None
    extra = module.describe(folder) if module and hasattr(module, "describe") else {}
    return {
        "path": str(folder),
        "method": method,
        "peft_type": peft_type,
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "use_rslora": config.get("use_rslora", False),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "rank_pattern": config.get("rank_pattern") or {},
        "target_modules": config.get("target_modules"),
        "adapted_module_kinds": sorted(modules),
        "adapted_modules": sum(ranks.values()),
        "trainable_parameters": parameter_count(shapes),
        "file_bytes": (folder / WEIGHTS_FILE).stat().st_size,
        "base_model": config.get("base_model_name_or_path"),
        "quantize": graft.get("quantize"),
        "base_fingerprint": graft.get("base_fingerprint"),
        "created": graft.get("created"),
        "training": graft.get("training"),
        "memory": (graft.get("training") or {}).get("memory"),
        **extra,
    }


def _full_facts(folder: Path, full) -> dict[str, Any]:
    """Facts of a full fine-tune's folder (a plain model folder, no adapter_config.json): every
    weight in its safetensors files counts as trained."""
    graft = read_graft(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GraftError(f"{folder}: a full fine-tune's folder without a .safetensors file")
    shapes: dict[str, list[int]] = {}
    for path in files:
        shapes.update(weight_shapes(folder, path.name))
    return {
        "path": str(folder),
        "method": "full",
        "peft_type": None,
        "rank": None,
        "ranks": {},
        "rank_pattern": {},
        "target_modules": None,
        "adapted_module_kinds": [],
        "adapted_modules": 0,
        "trainable_parameters": parameter_count(shapes),
        "file_bytes": sum(p.stat().st_size for p in files),
        "base_model": graft.get("base_model"),
        "quantize": None,
        "base_fingerprint": graft.get("base_fingerprint"),
        "created": graft.get("created"),
        "training": graft.get("training"),
        "memory": (graft.get("training") or {}).get("memory"),
        **full.describe(folder),
    }


def format_description(facts: dict[str, Any]) -> str:
    """Human-readable lines for `describe`'s facts."""
    lines = [
        f"adapter        {facts['path']}",
        f"method         {facts['method']}"
        + (f" on a {facts['quantize']} base" if facts.get("quantize") else ""),
    ]
    if facts["rank"] is not None:  # the LoRA family
        lines += [
            f"rank           {facts['rank']}  (alpha {facts['alpha']}, scale "
            + ("alpha/sqrt(r), rsLoRA" if facts["use_rslora"] else "alpha/r")
            + ")",
            "ranks in file  " + ", ".join(f"r={r}: {n} modules" for r, n in facts["ranks"].items()),
        ]
    if facts.get("target_modules"):
        lines.append(f"targets        {facts['target_modules']}")
    if facts["adapted_modules"]:
        lines.append(
            f"modules        {facts['adapted_modules']} ({', '.join(facts['adapted_module_kinds'])})"
        )
    lines += [
        f"parameters     {facts['trainable_parameters']:,}",
        f"file size      {facts['file_bytes'] / 1e6:.2f} MB",
        f"base model     {facts['base_model']}",
    ]
    if facts.get("rank_pattern"):
        lines.append(f"rank pattern   {facts['rank_pattern']}")
    for key, value in (facts.get("method_facts") or {}).items():
        lines.append(f"{key:<14} {value}")
    if facts.get("memory"):
        lines.append(f"memory         {format_memory(facts['memory'])} (when trained)")
    fp = facts.get("base_fingerprint")
    if fp:
        lines.append(
            f"base print     {fp.get('architecture')} shapes {fp.get('shapes_sha256')} weights {fp.get('weights_sha256')}"
        )
    if facts.get("created"):
        lines.append(f"created        {facts['created']}")
    training = facts.get("training")
    if training:
        lines.append(
            "training       "
            + ", ".join(
                f"{k} {training[k]}"
                for k in (
                    "steps",
                    "epochs",
                    "examples",
                    "final_loss",
                    "eval_loss",
                    "train_seconds",
                    "data",
                )
                if training.get(k) is not None
            )
        )
    return "\n".join(lines)


def format_memory(memory: dict[str, int]) -> str:
    """The memory record of graftlm.json's "training" entry as one line: 'base weights 270.0 MB, adapter 19.6 MB, optimizer state 39.2 MB, peak RSS ...'."""
    labels = (
        ("base_weight_bytes", "base weights"),
        ("adapter_bytes", "adapter"),
        ("optimizer_state_bytes", "optimizer state"),
        ("peak_rss_bytes", "peak RSS"),
    )
    return ", ".join(f"{label} {memory[k] / 1e6:.1f} MB" for k, label in labels if k in memory)
