"""Activation checkpointing that keeps the shared prompt prefix (`train/forward.py`).

transformers' per-layer checkpointing drops the key/value cache inside a checkpointed layer,
because the layer appends to the cache and would append a second time when the backward replays
it. Without a cache, rows cannot share their prompt prefix's forward, and on chat data the prefix
is 40-55% of the tokens: checkpointing then costs that share again on top of the recomputation.

Here each checkpointed layer keeps the cache, and the replay first puts the cache back as the
layer found it: before the layer runs, the function records every cache layer's attributes (the
key/value tensors are references, never written in place: an append builds new tensors), and the
replay restores them. The replay then computes the same tensors as the first run, and the
gradients of the prefix's keys and values flow through the original graph as without
checkpointing. `train/loop.py` checks once per run that this forward equals the plain one
(`forward.prefix_sharing_is_exact`), and runs without sharing where it does not.

A replay also leaves out the layer's last product, `down_proj`, whose output the backward never
reads (`kernels/lora_update.py`, `replaying_layer`): a quarter of the replay's multiply-adds.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from graftlm.errors import GraftError
from graftlm.kernels import lora_update

logger = logging.getLogger("graftlm")

_CACHE_KWARGS = ("cache", "past_key_values")


def enable(model: nn.Module) -> bool:
    """Checkpoint every decoder layer of `model` (a transformers model), keeping the cache.

    Returns:
        True if the layers keep the key/value cache (so rows may share a prefix), False if
        checkpointing is on without it (a model whose layers transformers does not wrap).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [
        module
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
        and hasattr(type(module), "_can_checkpoint_with_cache")
    ]
    for layer in layers:
        # transformers' switch for layers that may keep the cache under checkpointing, and the
        # function its wrapper calls with the layer's forward (its keyword arguments bound)
        layer._can_checkpoint_with_cache = True
        layer._gradient_checkpointing_func = checkpoint_replaying_cache
    if layers:
        # the flag on the model itself only turns `use_cache` off (the layers checkpoint
        # themselves), which would leave the prefix without its cache
        wrapped = {id(layer) for layer in layers}
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and id(module) not in wrapped:
                module.gradient_checkpointing = False
    return bool(layers)


def keeps_cache(model: nn.Module) -> bool:
    """Whether `model` has layers checkpointed by `enable` with the cache kept."""
    return any(
        getattr(m, "_gradient_checkpointing_func", None) is checkpoint_replaying_cache
        for m in model.modules()
    )


def checkpoint_replaying_cache(function: functools.partial, *args):
    """`checkpoint(function, *args)` whose replay restores the cache `function` was given (if
    any) and runs inside `lora_update.replaying_layer`, which leaves out the layer's last product.

    Args:
        function: the layer's forward with its keyword arguments bound (transformers' wrapper
            passes it so), the cache among them.
        args: the positional inputs (the hidden states).

    Raises:
        GraftError: (in the backward) the replay went on past the product it left out.
    """
    cache = next((function.keywords[k] for k in _CACHE_KWARGS if function.keywords.get(k)), None)
    layers = cache.layers if cache is not None else []
    before = list(layers)
    states = [dict(vars(layer)) for layer in before]
    runs = 0

    def replay(*inputs):
        nonlocal runs
        runs += 1
        layers[:] = before
        for layer, state in zip(before, states):
            attributes = vars(layer)
            attributes.clear()
            attributes.update(state)
        if runs == 1:  # the forward itself; later runs replay it for a backward
            return function(*inputs)
        with lora_update.replaying_layer() as replaying:
            outputs = function(*inputs)
        if replaying.skipped:
            raise GraftError(
                "activation checkpointing: the replay of a decoder layer went on past its last "
                "product, which the replay does not compute (was torch's checkpoint early stop "
                "turned off?); train with --no-activation-checkpointing"
            )
        return outputs

    # early_stop: the replay ends once the tensors the backward needs are back (torch's
    # default, and what lets the replay leave out the layer's last product: lora_update.py)
    return checkpoint(replay, *args, use_reentrant=False, early_stop=True)


@contextlib.contextmanager
def probing(model: nn.Module):
    """`model` in eval mode for a probe that compares two forwards; with layers checkpointed by
    `enable`, those layers alone (not their children) stay in training mode, with autograd on,
    so that the probe runs the checkpointed forward without any dropout."""
    was_training = model.training
    model.eval()
    checkpointed = keeps_cache(model)
    if checkpointed:
        for module in model.modules():
            if getattr(module, "_gradient_checkpointing_func", None) is checkpoint_replaying_cache:
                module.training = True
    try:
        with torch.enable_grad() if checkpointed else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)
