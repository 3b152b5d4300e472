"""Methods whose adapters live in wrapper layers ((IA)³'s scaled linears, bottleneck adapters):
everything but the layer and the choice of layers, written once.

Such a method wraps some of the model's modules in a layer class that keeps the original as
`base_layer` and holds, per adapter name, its trained tensors in dicts (`ia3_l`; `adapter_down`
and `adapter_up`), and applies one adapter at a time (`layer.active`). Adding an adapter,
switching, disabling, unloading (the last one out puts the original modules back), the weights
file (`base_model.model.<module>.<tensor key>`) and the checks on loading it are the same for
both methods; each method's module says which layers, which shapes, and its config file.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.base_model import base_fingerprint, check_base
from graftlm.adapters.contract import InjectSummary, summarize
from graftlm.adapters.folder import PREFIX, WEIGHTS_FILE, group_keys, read_weights, write_folder
from graftlm.adapters.modules import set_module
from graftlm.adapters.state import adapter_state, forget_state
from graftlm.adapters.switch import set_adapter
from graftlm.errors import GraftError


@dataclass(frozen=True)
class WrappedLayerAdapters:
    """The adapters of one wrapper-layer method on a model.

    Attributes:
        method: the method's name in the model's AdapterState ("ia3", "bottleneck").
        label: the method's name in messages ("(IA)³", "bottleneck").
        layer_type: the wrapper layer class.
        keys: a layer's tensors of one adapter, as the weights file names them after the
            module ("ia3_l"; "adapter_down.weight", ...): the layer's dict attribute, then the
            parameter inside the dict's entry, if any.
        key_pattern: a weights-file key less PEFT's prefix, with groups `module` and `kind`
            (one of `keys`).
    """

    method: str
    label: str
    layer_type: type
    keys: tuple[str, ...]
    key_pattern: re.Pattern

    # -- the layers and the adapters ----------------------------------------------------------

    def layers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """Every wrapper layer of `model`, with its module name, in model order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, self.layer_type)]

    def holds(self, layer: Any, name: str) -> bool:
        return name in getattr(layer, self.keys[0].split(".")[0])

    def tensor(self, layer: Any, name: str, key: str) -> torch.Tensor:
        """Tensor `key` (one of `keys`) of adapter `name` in `layer`."""
        table, _, leaf = key.partition(".")
        entry = getattr(layer, table)[name]
        return getattr(entry, leaf) if leaf else entry

    def adapters(self, model: nn.Module) -> dict[str, Any]:
        """{name: config} of the method's adapters on `model`, in the order added."""
        return adapter_state(model).configs(self.method)

    def active_adapter(self, model: nn.Module) -> str | None:
        """The adapter the layers apply (the one added or loaded last, unless set)."""
        mine = self.adapters(model)
        return next((n for n in adapter_state(model).active if n in mine), None)

    def name_or_active(self, model: nn.Module, name: str | None) -> str:
        """`name`, or the active adapter's when None; an error if there is no such adapter."""
        name = self.active_adapter(model) if name is None else name
        if name is None or name not in self.adapters(model):
            raise self._unknown(model, name)
        return name

    def _unknown(self, model: nn.Module, name: str | None) -> GraftError:
        return GraftError(
            f"no {self.label} adapter named {name!r}; loaded: {list(self.adapters(model))}"
        )

    # -- adding -------------------------------------------------------------------------------

    def begin(self, model: nn.Module, name: str) -> None:
        """Checks before adapter `name` is added; the fingerprint of the still untouched base."""
        adapter_state(model).check_new(name)
        base_fingerprint(model)  # wrapping changes module names

    def wrapped(self, model: nn.Module, module_name: str) -> Any:
        """The wrapper layer at `module_name`, put around the module there if not yet."""
        layer = model.get_submodule(module_name)
        if not isinstance(layer, self.layer_type):
            layer = self.layer_type(layer)
            set_module(model, module_name, layer)
        return layer

    def finish(
        self, model: nn.Module, name: str, config: Any, added: list[tuple[str, str, int]]
    ) -> InjectSummary:
        """Record adapter `name` and make it the active, and only trainable, one."""
        adapter_state(model).add(name, self.method, config)
        set_adapter(model, name)
        return summarize(model, name, added)

    # -- the contract's switching -------------------------------------------------------------

    def set_active(self, model: nn.Module, names: list[str]) -> None:
        """The layers apply the one of `names` that is this method's (or none); it trains.

        Raises:
            GraftError: two or more of `names` are this method's.
        """
        known = self.adapters(model)
        mine = [n for n in names if n in known]
        if len(mine) > 1:
            raise GraftError(f"{self.label} applies one adapter at a time, not {mine}")
        name = mine[0] if mine else None
        for _, layer in self.layers(model):
            layer.active = name
            if name is not None and self.holds(layer, name):
                for key in self.keys:
                    self.tensor(layer, name, key).requires_grad_(True)

    @contextlib.contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """The layers compute the base alone inside the block (a merged adapter is unmerged,
        then merged again)."""
        layers = [layer for _, layer in self.layers(model)]
        before = [(layer, layer.active, getattr(layer, "merged", None)) for layer in layers]
        try:
            for layer, _, merged in before:
                if merged is not None:
                    layer.unmerge()
                layer.active = None
            yield
        finally:
            for layer, active, merged in before:
                layer.active = active
                if merged is not None:
                    layer.merge(merged)

    def unload(self, model: nn.Module, name: str) -> None:
        """Remove adapter `name`; the last one out restores the base model's own modules.

        Raises:
            GraftError: no adapter of that name.
        """
        if name not in self.adapters(model):
            raise self._unknown(model, name)
        for module_name, layer in self.layers(model):
            if self.holds(layer, name):
                layer.delete(name)
            if not getattr(layer, self.keys[0].split(".")[0]):
                set_module(model, module_name, layer.base_layer)
        state = adapter_state(model)
        state.remove(name)
        remaining = self.adapters(model)
        if remaining and self.active_adapter(model) is None:
            set_adapter(model, [*state.active, list(remaining)[-1]])

    def unwrap(self, model: nn.Module) -> nn.Module:
        """Put the base layers back in place of every wrapper (their weights as they are now,
        merged or not) and forget the method's adapters and the base fingerprint."""
        for module_name, layer in self.layers(model):
            set_module(model, module_name, layer.base_layer)
        state = adapter_state(model)
        for name in self.adapters(model):
            state.remove(name)
        state.fingerprint = None  # it describes the base before merging
        if not state.adapters:
            forget_state(model)
        return model

    # -- the weights file ---------------------------------------------------------------------

    def state_dict(self, model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
        """Adapter `name`'s (default: the active one's) tensors under their file keys
        (`base_model.model.<module>.<key>`), fp32."""
        name = self.name_or_active(model, name)
        return {
            f"{PREFIX}{module_name}.{key}": self.tensor(layer, name, key).detach().float()
            for module_name, layer in self.layers(model)
            if self.holds(layer, name)
            for key in self.keys
        }

    def save(self, model: nn.Module, folder: Path, config: dict, name: str) -> dict:
        """Write adapter `name`'s weights and `config` (adapter_config.json); returns the
        tensors written. Merged tensors are saved as they are (never depending on the merge)."""
        tensors = self.state_dict(model, name)
        write_folder(Path(folder), config, tensors)
        return tensors

    def read_weights(
        self, model: nn.Module, folder: Path, name: str, force: bool
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of a folder by module, `{module: {key: tensor}}`, after the checks that
        need no layer choice: the name is free, the base fingerprint, every key one of `keys`,
        every module with all of them and present in the model.

        Raises:
            GraftError: listing what is wrong (file, keys, modules).
        """
        adapter_state(model).check_new(name)
        check_base(model, folder, force)
        path = Path(folder) / WEIGHTS_FILE
        groups, unexpected = group_keys(read_weights(folder), self.key_pattern)
        if unexpected:
            raise GraftError(
                f"{path}: unexpected keys (not '<module>.{'|'.join(self.keys)}'): "
                f"{sorted(unexpected)[:10]}"
            )
        if not groups:
            raise GraftError(f"{path}: no {self.label} tensors (keys like '...{self.keys[0]}')")
        incomplete = {
            m: sorted(set(self.keys) - set(g)) for m, g in groups.items() if len(g) < len(self.keys)
        }
        if incomplete:
            first = sorted(incomplete)[0]
            raise GraftError(
                f"{path}: {len(incomplete)} module(s) lack tensors, e.g. {PREFIX}{first} has "
                f"no {incomplete[first]}"
            )
        modules = dict(model.named_modules())
        unknown = sorted(m for m in groups if m not in modules)
        if unknown:
            raise GraftError(
                f"{path}: keys name modules {type(model).__name__} does not have: "
                f"{[f'{PREFIX}{m}.{self.keys[0]}' for m in unknown][:10]} "
                "(trained on another architecture?)"
            )
        return groups

    def check_modules(self, folder: Path, groups: dict, selected: list[str], by: str) -> None:
        """The file's modules are the ones the config selects (`by`, for the message).

        Raises:
            GraftError: listing the selected modules without tensors and the others with.
        """
        missing = sorted(set(selected) - set(groups))
        extra = sorted(set(groups) - set(selected))
        if missing or extra:
            raise GraftError(
                f"{Path(folder) / WEIGHTS_FILE}: the adapted modules do not match {by} on this "
                "model: "
                + (f"no tensors for {missing[:10]}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"tensors for modules it does not select: {extra[:10]}" if extra else "")
            )

    def check_shapes(
        self, folder: Path, groups: dict, expected: dict[str, tuple[dict, str]]
    ) -> None:
        """Every tensor has the shape `expected[module]` gives: ({key: shape}, why).

        Raises:
            GraftError: the first wrong one, with file, key, both shapes and the why.
        """
        for module_name, (shapes, why) in expected.items():
            for key, shape in shapes.items():
                found = tuple(groups[module_name][key].shape)
                if found != shape:
                    raise GraftError(
                        f"{Path(folder) / WEIGHTS_FILE}: {PREFIX}{module_name}.{key}: expected "
                        f"shape {shape}, found {found} ({why})"
                    )

    @torch.no_grad()
    def copy_in(self, model: nn.Module, name: str, groups: dict) -> None:
        """Fill the (just added) adapter `name` with the file's tensors."""
        for module_name, layer in self.layers(model):
            if self.holds(layer, name):
                for key in self.keys:
                    self.tensor(layer, name, key).copy_(groups[module_name][key].float())
