"""QDoRA (`--method qdora`): DoRA (`methods.lora.dora`) on an NF4 base, with QLoRA's recipe."""

from __future__ import annotations

from graftlm.methods.lora.dora import (  # noqa: F401  (DoRA's contract; attach reads cfg.method)
    MERGEABLE,
    PEFT_TYPE,
    ROW_ADAPTERS,
    attach,
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
    unload,
    unmerge,
)
from graftlm.methods.lora.qlora import BASE_QUANTIZATION  # noqa: F401  (quantized as read)
from graftlm.methods.lora.qlora import DEFAULTS as QLORA_DEFAULTS

NAME = "qdora"
DEFAULTS = dict(QLORA_DEFAULTS)
