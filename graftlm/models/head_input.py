"""A contiguous input for the output head: a guard against a slow, memory-hungry path of
PyTorch's CPU matmul in bfloat16.

Generation asks the model for the logits of the last position only (transformers passes
``logits_to_keep=1``), so the head gets ``hidden[:, -1:, :]``: a 3-D view whose batch stride
is the whole sequence. For such a view in bfloat16, ``F.linear`` cannot fold the batch into one
matrix product; it takes a batched product over a copy of the weight expanded per row. On this
machine (torch 2.13 CPU, 2-core Xeon with AVX-512 BF16), 16 rows of 84 tokens through the
built-in model's 49,152 x 576 head took **7.3 s and 0.8 GB** for that one product, against
**23 ms** and no extra memory once the 16 x 576 input is made contiguous. float32 takes the
fast path either way. It hit every batched bfloat16 prefill: the adaptive recipe's greedy
validation, `graftlm generate`, the forgetting meter, and the server.
"""

from __future__ import annotations

import torch
from torch import nn


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None


def make_head_input_contiguous(model: nn.Module) -> None:
    """Give `model`'s output head (if it has one) a forward pre-hook that makes a strided input
    contiguous. The copy costs rows x hidden values; the path it avoids copies the weight."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module) and not getattr(head, "_graftlm_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._graftlm_contiguous_input = True
