"""Parameter-efficient methods: one subpackage per method, all behind `adapters.contract`.

`method_module(name)` gives the module for a `--method` value; `folder_method(path)` tells which
method saved an adapter folder (from its `adapter_config.json` "peft_type").
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from graftlm.adapters.folder import CONFIG_FILE, GRAFT_FILE, read_config, read_graft
from graftlm.errors import GraftError

# --method value -> module implementing graftlm.adapters.contract.MethodModule
REGISTRY: dict[str, str] = {
    "lora": "graftlm.methods.lora.method",
    "qlora": "graftlm.methods.lora.qlora",
    "dora": "graftlm.methods.lora.dora",
    "qdora": "graftlm.methods.lora.qdora",
    "adalora": "graftlm.methods.adalora.method",
    "prompt": "graftlm.methods.virtual_tokens.prompt",
    "prefix": "graftlm.methods.virtual_tokens.prefix",
    "bottleneck": "graftlm.methods.bottleneck.method",
    "ia3": "graftlm.methods.ia3.method",
    "full": "graftlm.methods.full.method",
}

# adapter_config.json "peft_type" -> --method value ("BOTTLENECK" is graftlm's own: PEFT lacks it)
PEFT_TYPES: dict[str, str] = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "PROMPT_TUNING": "prompt",
    "PREFIX_TUNING": "prefix",
    "BOTTLENECK": "bottleneck",
    "IA3": "ia3",
    "FULL": "full",  # graftlm's own: a model folder, no adapter_config.json (methods/full)
}


def method_module(name: str) -> ModuleType:
    """The module implementing method `name` (a `--method` value)."""
    if name not in REGISTRY:
        raise GraftError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def folder_method(path: str | os.PathLike) -> str:
    """Which method saved the adapter folder `path` ("lora" for LoRA, QLoRA, DoRA and QDoRA).

    Raises:
        GraftError: no readable adapter_config.json, or a peft_type graftlm does not implement.
    """
    if not (Path(path) / CONFIG_FILE).is_file() and (Path(path) / GRAFT_FILE).is_file():
        # a method that writes a whole model folder (full fine-tuning) names itself there
        method = read_graft(path).get("method")
        if method in REGISTRY:
            return method
    peft_type = str(read_config(path).get("peft_type", "LORA")).upper()
    if peft_type not in PEFT_TYPES:
        raise GraftError(
            f"{Path(path) / CONFIG_FILE}: peft_type {peft_type!r} is not supported; "
            f"supported: {', '.join(PEFT_TYPES)}"
        )
    return PEFT_TYPES[peft_type]
