"""QLoRA: LoRA (`methods.lora.method`) on a base whose linear layers are 4-bit NF4.

The same contract functions as LoRA (`attach` quantizes the base because cfg.method is
"qlora"; its folders are LoRA folders, with "quantize": "nf4" in graftlm.json); only the
recipe differs: `--low-memory` is on by default, because a user picks QLoRA to save memory.
Low-memory mode bounds a step's activations the way that is faster for the compute dtype
(`train/steps.py`): in float32 with small passes, in bf16 with activation checkpointing that
keeps the shared prompt prefix (`train/checkpointing.py`). Each kept a run within 1.5x the time
of LoRA's on the same data, at 0.5-0.6x its peak memory (docs/measurements.md, "QLoRA's
recipe"); `--activation-checkpointing` (float32: the least memory, ~2x the time) and
`--no-activation-checkpointing` choose for themselves.
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
DEFAULTS = {**LORA_DEFAULTS, "low_memory": True}
