"""graftlm: parameter-efficient fine-tuning (LoRA and its family) on one ordinary machine.

The public API is re-exported here lazily, so `import graftlm` stays cheap (no torch import
until a function that needs it is used)::

    model, tokenizer = graftlm.load_model("smollm2-135m-instruct")
    graftlm.inject(model, graftlm.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    ...train...
    graftlm.save_adapter(model, "adapters/tickets")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LoraConfig": "graftlm.methods.lora.config",
    "inject": "graftlm.methods.lora.inject",
    "set_adapter": "graftlm.adapters.switch",
    "delete_adapter": "graftlm.adapters.switch",
    "active_adapters": "graftlm.adapters.switch",
    "disable_adapters": "graftlm.adapters.switch",
    "row_adapters": "graftlm.adapters.switch",
    "merge": "graftlm.adapters.switch",
    "unmerge": "graftlm.adapters.switch",
    "merge_and_unload": "graftlm.adapters.switch",
    "adapter_names": "graftlm.adapters.switch",
    "save_adapter": "graftlm.adapters.io",
    "load_adapter": "graftlm.methods.lora.files",
    "load_model": "graftlm.models.load",
    "combine_adapters": "graftlm.adapters.combine",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
