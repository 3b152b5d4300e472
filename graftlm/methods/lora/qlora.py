"""QLoRA: LoRA (`methods.lora.method`) on a base whose linear layers are 4-bit NF4.

The same contract functions as LoRA (`attach` quantizes the base because cfg.method is
"qlora"; its folders are LoRA folders, with "quantize": "nf4" in graftlm.json); only the
recipe differs: `--low-memory` is on by default, because a user picks QLoRA to save memory.
Low-memory mode bounds a step's activations with activation checkpointing that keeps the
shared prompt prefix (`train/checkpointing.py`, `train/steps.py`): 0.46x LoRA's peak in
float32 on an AVX2 EPYC, 0.6-0.7x in bf16 (docs/measurements.md, "QLoRA's recipe");
`--no-activation-checkpointing` keeps every activation of smaller passes instead.
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
BASE_QUANTIZATION = "nf4"  # train/loop.py loads the base so: quantized as it is read
DEFAULTS = {**LORA_DEFAULTS, "low_memory": True}
