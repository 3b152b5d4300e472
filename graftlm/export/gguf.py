"""GGUF export for llama.cpp: a LoRA adapter file, or base + adapter merged into one model file.

::

    graftlm export --adapter DIR --format gguf --out adapter.gguf [--outtype f32|f16|bf16|q8_0]
    graftlm export --adapter DIR --format gguf-merged --out model.gguf [--quant f16|q8_0|q4_0|q4_1]

The two writers and what they share, one file each:

- `graftlm.export.gguf_adapter` (``--format gguf``): llama.cpp's adapter file, A and B per
  adapted matrix, each module's own scale folded into B under the file's one ``alpha``.
- `graftlm.export.gguf_merged` (``--format gguf-merged``): the base with ``scale · B·A`` added
  to each adapted weight, from a GGUF base (everything else copied byte for byte) or a Hugging
  Face Llama folder.
- `graftlm.export.gguf_base`: the base both are written against (architecture, head counts,
  shapes, embedding fingerprint).
- `graftlm.export.llama_layout`: llama.cpp's tensor names, q/k row order and tensor types.

Refused with a `GraftError`, never dropped: an architecture without a tensor-name map, embedding
adapters, ``modules_to_save``, trained biases, modules llama.cpp has no tensor for, and (unless
``force``) an adapter whose base fingerprint does not match the base's embedding rows.

This module is the entry point `graftlm export` and scripts import the two writers from.
"""

from __future__ import annotations

from graftlm.export.gguf_adapter import ADAPTER_OUTTYPES, export_adapter_gguf
from graftlm.export.gguf_merged import MERGED_QUANTS, export_merged_gguf

__all__ = ["ADAPTER_OUTTYPES", "MERGED_QUANTS", "export_adapter_gguf", "export_merged_gguf"]
