"""The one record of a model's adapters: `adapter_state(model)`.

Every method keeps what it knows about a model's adapters here, and nowhere else on the model:

- per adapter name, the method that added it and its config (in the order added);
- which adapters are active (the model computes with them);
- each method's own per-model record (prompt/prefix tuning: the attention hooks' state);
- the base model's fingerprint, taken before any adapter changed a module.

The record is a plain object in the model's `__dict__` (not an `nn.Module`), created on first
use: it adds no parameters and no state-dict keys, and `copy.deepcopy(model)` copies it along.
The modules a method swaps in hold the tensors and per-layer flags; this record says which
adapters exist and which are active, so that switching, saving and unloading can dispatch to
the right method without asking every module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graftlm.adapters.modules import check_adapter_name
from graftlm.errors import GraftError

ATTRIBUTE = "graftlm_state"  # the model attribute holding the AdapterState


@dataclass
class Adapter:
    """One adapter on a model.

    Attributes:
        method: the method whose contract handles it: a `graftlm.methods.PEFT_TYPES` value
            ("lora" for LoRA and QLoRA alike, "adalora", "ia3", "bottleneck", "prompt",
            "prefix").
        config: the method's config object of this adapter.
    """

    method: str
    config: Any


@dataclass
class AdapterState:
    """The adapters of one model (see the module docstring).

    Attributes:
        adapters: per adapter name, its method and config, in the order added.
        active: the active adapters' names (the order `set_adapter` was given).
        records: per-model records of methods that need one, keyed by the method's name.
        fingerprint: the base model's fingerprint (`adapters.base_model.base_fingerprint`),
            None until first asked for.
    """

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict | None = None

    def names(self, method: str | None = None) -> list[str]:
        """Adapter names in the order added (only `method`'s, if given)."""
        return [n for n, a in self.adapters.items() if method is None or a.method == method]

    def configs(self, method: str) -> dict[str, Any]:
        """{name: config} of `method`'s adapters, in the order added (a copy)."""
        return {n: a.config for n, a in self.adapters.items() if a.method == method}

    def methods(self) -> list[str]:
        """The methods with adapters on the model, each once, in the order first added."""
        return list(dict.fromkeys(a.method for a in self.adapters.values()))

    def check_new(self, name: str) -> None:
        """Refuse a name that is taken or that cannot be part of module and file keys.

        Raises:
            GraftError: the name is taken (by an adapter of any method) or malformed.
        """
        if name in self.adapters:
            raise GraftError(
                f"adapter {name!r} already exists ({self.adapters[name].method}); "
                "delete_adapter() it first or pick a new name"
            )
        check_adapter_name(name)

    def add(self, name: str, method: str, config: Any) -> None:
        """Record adapter `name` (after `check_new`); a known name keeps its place."""
        self.adapters[name] = Adapter(method, config)

    def remove(self, name: str) -> None:
        """Forget adapter `name` (also from the active ones)."""
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def require(self, names: list[str]) -> None:
        """Raise unless every name is an adapter of the model.

        Raises:
            GraftError: listing the unknown names and the model's adapters.
        """
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            known = list(self.adapters)
            raise GraftError(
                f"unknown adapter(s) {unknown}; the model has {known or 'no adapters'}"
            )


def adapter_state(model: nn.Module) -> AdapterState:
    """The AdapterState of `model`, created (empty) on first use."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = AdapterState()
        setattr(model, ATTRIBUTE, state)
    return state


def forget_state(model: nn.Module) -> None:
    """Drop the model's AdapterState, fingerprint included (after merging into the weights)."""
    if hasattr(model, ATTRIBUTE):
        delattr(model, ATTRIBUTE)
