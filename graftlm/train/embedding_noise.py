"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

Adding noise of magnitude `alpha / sqrt(L * d)` to every input embedding of a training forward
(L: tokens in the forward, d: hidden size) regularizes fine-tuning on small instruction sets:
the adapter cannot key on the exact embedding of each training phrasing. The noise is drawn
only for forwards that build a graph in training mode, so evaluation, validation and
generation see the clean embeddings, and the adapter itself is unchanged in shape and format.
TRL's `neftune_noise_alpha` is the same rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def embedding_noise(model: nn.Module, alpha: float) -> Iterator[None]:
    """Within the block, training forwards of `model` add NEFTune noise of strength `alpha` to
    the input embeddings (nothing with `alpha` 0). Draws from torch's global generator, so a
    seeded run draws the same noise again."""
    if not alpha:
        yield
        return
    embeddings = model.get_input_embeddings()

    def add_noise(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        # L is this forward's own length: with the shared chat prefix, the prefix and the
        # tail each count their own tokens
        magnitude = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    handle = embeddings.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
