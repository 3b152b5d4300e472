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
    "LoraConfig": "graftlm.config",
    "inject": "graftlm.surgery",
    "set_adapter": "graftlm.surgery",
    "delete_adapter": "graftlm.surgery",
    "active_adapters": "graftlm.surgery",
    "disable_adapters": "graftlm.surgery",
    "row_adapters": "graftlm.surgery",
    "merge": "graftlm.surgery",
    "unmerge": "graftlm.surgery",
    "merge_and_unload": "graftlm.surgery",
    "adapter_names": "graftlm.surgery",
    "save_adapter": "graftlm.adapters",
    "load_adapter": "graftlm.adapters",
    "load_model": "graftlm.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
