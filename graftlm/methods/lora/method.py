"""LoRA and QLoRA behind the method contract (`graftlm.adapters.contract`).

The layers live in `methods.lora` (and `methods.nf4` for the 4-bit base), the injection in
`graftlm.methods.lora.inject`, the PEFT-format folders in `graftlm.methods.lora.files`; this module only connects them
to the training pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graftlm.methods.lora.config import LoraConfig

NAME = "lora"
PEFT_TYPE = "LORA"
MERGEABLE = True
# Chosen by experiment (README, "Choosing the default recipe"): rank 16 on every linear layer,
# alpha 2r, lr 1e-3, one epoch.
DEFAULTS = {"rank": 16, "targets": "all-linear", "lr": 1e-3, "epochs": 1.0}


def attach(model: nn.Module, cfg):
    """Inject adapter "default" as `cfg` describes (QLoRA: the base goes to NF4 first)."""
    from graftlm.methods.lora.inject import inject

    lora = LoraConfig(
        rank=cfg.rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.dropout,
        targets=cfg.targets,
        use_rslora=cfg.use_rslora,
        quantize="nf4" if cfg.method == "qlora" else None,
    )
    return inject(model, lora)


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write the PEFT folder; `graftlm.methods.lora.files.save_adapter` does it (and graftlm.json)."""
    from graftlm.methods.lora.files import adapter_state_dict, save_adapter

    save_adapter(model, folder)
    return adapter_state_dict(model)


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    from graftlm.methods.lora.files import load_adapter

    load_adapter(model, folder, name=name, force=force)


def merge(model: nn.Module) -> None:
    from graftlm.methods.lora.inject import merge as merge_lora

    merge_lora(model)
