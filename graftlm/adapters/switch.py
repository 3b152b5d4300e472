"""Switching a model's adapters, whatever their methods: which are active, disabling them, one
per batch row, deleting one, merging.

Each function reads the model's `AdapterState` and calls the contract functions
(`adapters.contract`) of every method the model holds; none tests a method's name. These are
the public `graftlm.set_adapter`, `graftlm.merge`, ... .
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from graftlm.adapters.modules import freeze
from graftlm.adapters.state import adapter_state, forget_state
from graftlm.methods import method_module


def _contract(model: nn.Module, function: str, *, mergeable: bool = False) -> list[Callable]:
    """The methods' contract function `function`, once each, for every method on `model`
    (only the methods that can merge, with `mergeable`).

    Methods that share their layers (AdaLoRA's are LoRA's) share the function: it runs once.
    """
    modules = [method_module(m) for m in adapter_state(model).methods()]
    found = (getattr(m, function) for m in modules if m.MERGEABLE or not mergeable)
    return list(dict.fromkeys(found))


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in `model`, in the order they were added."""
    return adapter_state(model).names()


def active_adapters(model: nn.Module) -> list[str]:
    """The currently active adapter names."""
    return list(adapter_state(model).active)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s) (their updates add up) and the only trainable ones.

    Raises:
        GraftError: an unknown name, or more adapters than their method applies at once.
    """
    names = [names] if isinstance(names, str) else list(names)
    state = adapter_state(model)
    state.require(names)
    freeze(model)
    for set_active in _contract(model, "set_active"):
        set_active(model, names)
    state.active = names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerging it first if it was merged).

    Raises:
        GraftError: no adapter of that name.
    """
    state = adapter_state(model)
    state.require([name])
    method_module(state.adapters[name].method).unload(model, name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (merged adapters are unmerged, then re-merged)."""
    with contextlib.ExitStack() as stack:
        for disabled in _contract(model, "disabled"):
            stack.enter_context(disabled(model))
        yield


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Give each batch row its own adapter inside the block (None or "base": no adapter).

    Rows sharing an adapter are computed together: one base product for the whole batch,
    then one adapter product per adapter over its rows.

    Args:
        names: one entry per batch row.

    Raises:
        GraftError: an unknown adapter name.
    """
    rows_by_name: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        key = None if name in (None, "base") else name
        rows_by_name.setdefault(key, []).append(row)
    adapter_state(model).require([n for n in rows_by_name if n is not None])
    groups = [(name, torch.tensor(rows, dtype=torch.long)) for name, rows in rows_by_name.items()]
    modules = [m for m in model.modules() if getattr(m, "graftlm_row_aware", False)]
    for module in modules:
        device = next(iter(module.parameters()), torch.empty(0)).device
        module.row_groups = [(n, r.to(device)) for n, r in groups]
    try:
        yield
    finally:
        for module in modules:
            module.row_groups = None


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Merge the active adapters (or `names`) into the base weights; idempotent, fp32 math.

    Raises:
        GraftError: an unknown name; an adapter whose method cannot merge, or whose update
            holds NaN/inf (then that method merged nothing).
    """
    state = adapter_state(model)
    names = list(state.active) if names is None else list(names)
    state.require(names)
    by_function: dict[Callable, list[str]] = {}
    for name in names:
        function = method_module(state.adapters[name].method).merge
        by_function.setdefault(function, []).append(name)
    for function, mine in by_function.items():
        function(model, mine)


def unmerge(model: nn.Module) -> None:
    """Undo every merge, restoring the base weights (up to the weight dtype's rounding)."""
    for function in _contract(model, "unmerge", mergeable=True):
        function(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model (adapter layers replaced by the
    base layers).

    The result's state dict has the original class's keys, so it loads into a fresh instance.

    Raises:
        GraftError: the model holds an adapter of a method that cannot merge (its `merge`
            says why), or one whose update holds NaN/inf.
    """
    state = adapter_state(model)
    for method in state.methods():
        module = method_module(method)
        if not module.MERGEABLE:
            module.merge(model, state.names(method))  # refuses: the modules would stay
    for function in _contract(model, "merge_and_unload", mergeable=True):
        model = function(model)
    # the fingerprint too: it describes the base before merging, not the merged model
    forget_state(model)
    freeze(model)
    return model
