"""LoRA and QLoRA behind the method contract (`graftlm.adapters.contract`).

The layers live in `methods.lora.layer` (and `methods.lora.nf4_layer` for the 4-bit base), the
injection and switching in `methods.lora.inject`, the PEFT-format folders in
`methods.lora.files`; this module names them for the contract and connects them to training.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from graftlm.adapters.contract import InjectSummary
from graftlm.errors import GraftError
from graftlm.methods.lora.config import LoraConfig, training_settings

# the contract's names that LoRA's other modules define (re-exported, hence noqa)
from graftlm.methods.lora.files import graft_facts, load_adapter, read_adapter_config, save  # noqa: F401
from graftlm.methods.lora.inject import (  # noqa: F401
    disabled,
    inject,
    merge,
    merge_and_unload,
    set_active,
    unload,
    unmerge,
)

NAME = "lora"
PEFT_TYPE = "LORA"
MERGEABLE = True
ROW_ADAPTERS = True
# rank 16 on every linear layer, alpha 2r, lr 1e-3 (README, "Choosing the default recipe"); the
# length is the data's: validation stops the run (train/adaptive.py), four epochs at the most.
# NEFTune at 5: noise on the input embeddings, which the held-out phrasings of the zoo's tests
# reward (bench/results/zoo.md, "NEFTune on the whole zoo").
DEFAULTS = {
    "rank": 16, "targets": "all-linear", "lr": 1e-3, "max_epochs": 4.0, "neftune_alpha": 5.0,
}  # fmt: skip

# the contract's load: load_adapter's `activate` stays at its default (the new one is active)
load = load_adapter


def attach(model: nn.Module, cfg) -> InjectSummary:
    """Inject adapter "default" as `cfg` describes (QLoRA: the base goes to NF4 first)."""
    return inject(
        model, train_config(cfg, model, quantize="nf4" if cfg.method == "qlora" else None)
    )


def train_config(cfg, model: nn.Module, **changes) -> LoraConfig:
    """The LoraConfig a training config (`TrainConfig`) asks for on `model`, with `changes` (the
    LoRA variants built on this method: QLoRA's `quantize`, DoRA's `use_dora`)."""
    settings = {
        "rank": cfg.rank,
        "use_rslora": cfg.use_rslora,
        "init": cfg.lora_init or "kaiming",
        **training_settings(cfg, model),
    }
    return LoraConfig(**{**settings, **changes})


def read_config(folder: Path) -> LoraConfig:
    """The LoraConfig of a LoRA folder (its base quantization from graftlm.json)."""
    return read_adapter_config(folder)[0]


def quantization(folder: Path) -> str | None:
    """ "nf4" for a QLoRA adapter (trained on a 4-bit base), else None."""
    return read_config(folder).quantize


def check_servable(model: nn.Module, folder: Path) -> None:
    """Refuse an adapter that changes what other rows of a batch compute, or needs a 4-bit
    base the server did not quantize at start.

    Raises:
        GraftError: modules_to_save or trained biases (they change shared base parameters or
            whole modules, so per-row serving would apply them to every request in the batch);
            a QLoRA adapter on a base that is not in NF4.
    """
    config = read_config(folder)
    if config.modules_to_save:
        raise GraftError(
            f"{folder}: adapters with modules_to_save {list(config.modules_to_save)} cannot "
            "share a batch with other adapters; merge it (graftlm merge) and serve that model"
        )
    if config.bias != "none":
        raise GraftError(
            f"{folder}: adapters that train biases (bias={config.bias!r}) change the shared "
            "base; merge it (graftlm merge) and serve that model"
        )
    quantized = any(getattr(m, "is_quantized_linear", False) for m in model.modules())
    if config.quantize == "nf4" and not quantized:
        raise GraftError(
            f"{folder}: a QLoRA adapter (quantize='nf4') needs an NF4 base; start the server "
            "with a QLoRA adapter among its --adapter flags so the base is quantized at start"
        )


def describe(folder: Path) -> dict:
    """`graftlm inspect` calls an adapter trained on a 4-bit base "qlora" (DoRA: "qdora"),
    and a DoRA adapter "dora"."""
    config = read_config(folder)
    if config.use_dora:
        return {"method": "qdora" if config.quantize else "dora"}
    return {"method": "qlora"} if config.quantize else {}
