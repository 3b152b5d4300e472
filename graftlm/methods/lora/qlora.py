"""QLoRA: LoRA (`methods.lora.method`) on a base whose linear layers are 4-bit NF4.

The same contract functions as LoRA (`attach` quantizes the base because cfg.method is
"qlora"; its folders are LoRA folders, with "quantize": "nf4" in graftlm.json); only the
recipe differs: `--low-memory` (smaller passes, large freed blocks back to the OS) and
activation checkpointing are on by default, as in the QLoRA paper and PEFT's
`prepare_model_for_kbit_training`, because a user picks QLoRA to save memory.
`--no-activation-checkpointing` keeps the small passes at about twice the speed.
"""

from __future__ import annotations

from graftlm.methods.lora.method import DEFAULTS as LORA_DEFAULTS
from graftlm.methods.lora.method import (  # noqa: F401  (the rest of the contract is LoRA's)
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

NAME = "qlora"
DEFAULTS = {**LORA_DEFAULTS, "low_memory": True, "activation_checkpointing": True}
