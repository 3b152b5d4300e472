"""DoRA (`--method dora`) and QDoRA (`--method qdora`): LoRA with a trainable magnitude.

Weight-decomposed LoRA (Liu et al., 2024): each adapted linear layer computes
`m ⊙ (W + s·B·A) x / ‖W + s·B·A‖_row + b`, with `m` one trainable number per output feature
(`methods/lora/dora_layer.py` holds the arithmetic). It is LoRA's method contract with
`LoraConfig(use_dora=True)`, as QLoRA is LoRA's with an NF4 base: its folders are LoRA folders in
PEFT's format, with `"use_dora": true` in adapter_config.json and a `lora_magnitude_vector`
tensor per adapted module, so `graftlm.methods.folder_method` reads them as "lora" and every
loader, the server and `graftlm merge` take them through LoRA's contract. QDoRA is DoRA on a
base whose linear layers are NF4 (QLoRA's recipe: `--low-memory` on by default).
"""

from __future__ import annotations

from torch import nn

from graftlm.adapters.contract import InjectSummary
from graftlm.methods.lora.inject import inject
from graftlm.methods.lora.method import DEFAULTS as LORA_DEFAULTS
from graftlm.methods.lora.method import (  # noqa: F401  (the rest of the contract is LoRA's)
    MERGEABLE,
    PEFT_TYPE,
    ROW_ADAPTERS,
    check_servable,
    describe,
    disabled,
    graft_facts,
    load,
    merge,
    merge_and_unload,
    quantization,
    read_config,
    save,
    set_active,
    train_config,
    unload,
    unmerge,
)

NAME = "dora"
DEFAULTS = dict(LORA_DEFAULTS)


def attach(model: nn.Module, cfg) -> InjectSummary:
    """Inject DoRA adapter "default" as `cfg` describes (`qdora`: the base goes to NF4 first)."""
    quantize = "nf4" if cfg.method == "qdora" else None
    return inject(model, train_config(cfg, model, use_dora=True, quantize=quantize))
