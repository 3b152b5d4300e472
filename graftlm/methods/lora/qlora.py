"""QLoRA: LoRA (`lora_method`) on a base whose linear layers are 4-bit NF4 (`methods.nf4`).

The same attach/save/load/merge as LoRA (`attach` quantizes the base because cfg.method is
"qlora"); only the recipe differs: `--low-memory` (smaller passes, large freed blocks back to the
OS) and activation checkpointing are on by default, as in the QLoRA paper and PEFT's
`prepare_model_for_kbit_training`, because a user picks QLoRA to save memory.
`--no-activation-checkpointing` keeps the small passes at about twice the speed (measured
against PEFT + bitsandbytes: 1.09x its speed at 0.28x its peak, README "Compared with PEFT").
"""

from __future__ import annotations

from graftlm.methods.lora.method import DEFAULTS as LORA_DEFAULTS
from graftlm.methods.lora.method import MERGEABLE, PEFT_TYPE, attach, load, merge, save

NAME = "qlora"
DEFAULTS = {**LORA_DEFAULTS, "low_memory": True, "activation_checkpointing": True}

__all__ = ["NAME", "PEFT_TYPE", "MERGEABLE", "DEFAULTS", "attach", "save", "load", "merge"]
