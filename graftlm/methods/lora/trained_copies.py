"""`modules_to_save`: whole modules trained per adapter, beside the LoRA layers."""

from __future__ import annotations

import copy

from torch import nn

from graftlm.errors import GraftError
from graftlm.methods.lora.rows import RowGroups


class TrainedCopies(nn.Module):
    """`modules_to_save`: a whole module trained per adapter, the original kept frozen.

    The active adapter's copy runs in place of the original; with no copy active (or
    adapters disabled) the original runs.
    """

    graftlm_row_aware = True  # refuses `row_groups` rather than run one copy for every row

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_groups: RowGroups | None = None

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for param in copy_.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def current(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, or the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.row_groups is not None and not self.disabled:
            raise GraftError("per-row adapters do not support modules_to_save")
        return self.current()(*args, **kwargs)
