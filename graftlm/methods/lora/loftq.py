"""LoftQ initialisation for QLoRA (Li et al., 2023): start A and B so that the 4-bit base plus the
update is close to the full-precision weight, NF4(W) + scale·B·A ≈ W, instead of B = 0.

The base stays NF4(W), exactly what quantizing the original weights gives, so the saved adapter
is a plain PEFT LoRA folder over the same 4-bit base (PEFT's `replace_lora_weights_loftq` does
the same; its iterated form also rewrites the base, which a folder of A and B alone cannot carry).
A and B are the top-`rank` singular triplets of the quantization residual W - NF4(W), split
evenly (square roots of the singular values) and divided by the adapter's scale.

The full-precision W is read back from the model's own safetensors files one layer at a time:
the base in memory already holds only the 4-bit copy. A layer whose base was already 4-bit and is
kept on its own grid (`graftlm.quant.q4_grid`, the built-in model) has no rounding error to
correct: its A and B keep the default start (kaiming A, zero B), since a zero residual would
give A = B = 0, from which neither could move.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from graftlm.errors import GraftError
from graftlm.methods.lora.nf4_layer import LoraNF4Linear
from graftlm.models.load import model_folder
from graftlm.models.weights import iter_tensors, weight_files
from graftlm.quant.q4_grid import Q4GridLinear

logger = logging.getLogger("graftlm")


def residual_factors(
    weight: torch.Tensor, quantized: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with scale·B·A the best rank-`rank` approximation of
    `weight - quantized` (both [out, in])."""
    residual = weight.float() - quantized.float()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@torch.no_grad()
def loftq_init(model: nn.Module, name: str = "default") -> int:
    """Set adapter `name`'s A and B of every 4-bit LoRA layer from its quantization residual.

    Returns:
        The number of layers initialised (those kept on their own 4-bit grid are not).

    Raises:
        GraftError: the model has no 4-bit LoRA layers for `name`, or its folder does not hold
            the full-precision weight of one of them.
    """
    layers = {
        module_name: module
        for module_name, module in model.named_modules()
        if isinstance(module, LoraNF4Linear) and name in module.ranks
    }
    if not layers:
        raise GraftError("LoftQ initialises QLoRA adapters: no 4-bit LoRA layer found")
    exact = [n for n, layer in layers.items() if isinstance(layer.base_layer, Q4GridLinear)]
    if exact:
        logger.info(
            "LoftQ: %d of %d layers hold their base's own 4-bit values, with no rounding error "
            "to start from; they keep the default start", len(exact), len(layers),
        )  # fmt: skip
        layers = {n: layer for n, layer in layers.items() if n not in exact}
    wanted = {f"{module_name}.weight": module_name for module_name in layers}
    done = set()
    for path in weight_files(model_folder(model)):
        for key, weight in iter_tensors(path, set(wanted)):
            layer = layers[wanted[key]]
            quantized = layer.base_layer.dequantized_weight(torch.float32)
            lora_a, lora_b = residual_factors(
                weight, quantized, layer.ranks[name], layer.scaling[name]
            )
            layer.lora_A[name].weight.copy_(lora_a)
            layer.lora_B[name].weight.copy_(lora_b)
            done.add(wanted[key])
    missing = sorted(set(layers) - done)
    if missing:
        raise GraftError(f"LoftQ: the base's files hold no full-precision weight for {missing[:3]}")
    return len(done)
