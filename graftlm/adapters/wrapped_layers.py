"""Named adapters that live inside wrapper layers (IA3's scaled linears, bottleneck adapters):
the bookkeeping both methods share.

Each such method wraps some of the model's modules in a layer class that keeps the original as
`base_layer` and holds, per adapter name, its trained tensors in one or more dicts (`ia3_l`;
`adapter_down` and `adapter_up`). The set of adapters, which one is active, and removing one (the
last one out puts the original modules back) work the same for both, so they are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from graftlm.adapters.modules import set_module
from graftlm.errors import GraftError


@dataclass(frozen=True)
class WrappedLayerAdapters:
    """The adapters of one wrapper-layer method on a model.

    Attributes:
        label: the method's name in messages ("(IA)³", "bottleneck").
        layer_type: the wrapper layer class.
        model_attribute: where the model keeps {name: config} of this method's adapters.
        tensors: the layer's per-adapter dicts; the first tells whether a layer holds an adapter.
    """

    label: str
    layer_type: type
    model_attribute: str
    tensors: tuple[str, ...]

    def layers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """Every wrapper layer of `model`, with its module name, in model order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, self.layer_type)]

    def holds(self, layer: Any, name: str) -> bool:
        return name in getattr(layer, self.tensors[0])

    def adapters(self, model: nn.Module) -> dict[str, Any]:
        """{name: config} of the method's adapters on `model` (a live dict, in the order added)."""
        if not hasattr(model, self.model_attribute):
            setattr(model, self.model_attribute, {})
        return getattr(model, self.model_attribute)

    def _unknown(self, model: nn.Module, name: str | None) -> GraftError:
        return GraftError(
            f"no {self.label} adapter named {name!r}; loaded: {list(self.adapters(model))}"
        )

    def set_active(self, model: nn.Module, name: str | None) -> None:
        """Make adapter `name` the one every layer applies (None: none) and the only trainable
        parameters of the model."""
        if name is not None and name not in self.adapters(model):
            raise self._unknown(model, name)
        for param in model.parameters():
            param.requires_grad_(False)
        for _, layer in self.layers(model):
            layer.active = name
            if self.holds(layer, name):
                for tensors in self.tensors:
                    getattr(layer, tensors)[name].requires_grad_(True)

    def active_adapter(self, model: nn.Module) -> str | None:
        """The adapter the layers apply (the one added or loaded last, unless set)."""
        layers = self.layers(model)
        return layers[0][1].active if layers else None

    def name_or_active(self, model: nn.Module, name: str | None) -> str:
        """`name`, or the active adapter's when None; an error if there is no such adapter."""
        name = self.active_adapter(model) if name is None else name
        if name is None or name not in self.adapters(model):
            raise self._unknown(model, name)
        return name

    def unload(self, model: nn.Module, name: str) -> None:
        """Remove adapter `name`; the last one out restores the base model's own modules.

        Raises:
            GraftError: no adapter of that name.
        """
        known = self.adapters(model)
        if name not in known:
            raise self._unknown(model, name)
        active = self.active_adapter(model)
        for module_name, layer in self.layers(model):
            if self.holds(layer, name):
                layer.delete(name)
            if not getattr(layer, self.tensors[0]):
                set_module(model, module_name, layer.base_layer)
        del known[name]
        if known:
            self.set_active(model, active if active in known else list(known)[-1])
