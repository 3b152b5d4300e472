"""The bottleneck adapter layer: a frozen output projection, then residual bottleneck MLPs.

::

    x ──► output projection (frozen) ──► h ──┬──────────────────────────────────────► (+) ──► h'
                                             └► down [size, d] ─► act ─► up [d, size] ─┘

`up` starts at zero, so a fresh adapter leaves the layer's output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graftlm.adapters.layer_walk import layer_dims
from graftlm.errors import GraftError, check_choice, check_fraction

PLACEMENTS = ("both", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_ACTIVATION = "silu"


@dataclass(frozen=True)
class BottleneckConfig:
    """Settings of one bottleneck adapter (the JSON form is `adapter_config.json`).

    Attributes:
        size: hidden width of the bottleneck (down-projection rows).
        placement: "both" (after attention and after the MLP) or "mlp" (after the MLP only).
        activation: the nonlinearity between down and up: relu, gelu, silu or tanh.
        dropout: dropout on the adapter's input during training.
        scaling: factor on the adapter's output (1.0: Houlsby's form).
    """

    size: int = 64
    placement: str = "both"
    activation: str = DEFAULT_ACTIVATION
    dropout: float = 0.0
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise GraftError(f"bottleneck_size should be a positive integer, got {self.size!r}")
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("non_linearity", self.activation, tuple(ACTIVATIONS))
        check_fraction("dropout", self.dropout)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise GraftError(f"scaling should be a number, got {self.scaling!r}")


class BottleneckAdapter(nn.Module):
    """A frozen output projection followed by named residual bottleneck MLPs.

    Args:
        base_layer: the sublayer's last linear layer (kept whole, frozen, as `base_layer`).

    One adapter is active at a time; row-aware (`graftlm.adapters.contract`, item 7): with
    `row_groups` set, each group of batch rows gets its own adapter (or none).

    Shapes: input `(batch, ..., in)`, output `(batch, ..., d)` with `d` the base layer's output
    features; per adapter, `adapter_down[name]` is `Linear(d -> size)` and `adapter_up[name]`
    `Linear(size -> d)`, both with biases, fp32.
    """

    graftlm_row_aware = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = output_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation = nn.ModuleDict()
        self.dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.row_groups: list[tuple[str | None, torch.Tensor]] | None = None

    def add(self, name: str, config: BottleneckConfig) -> None:
        """Adapter `name`: down as `nn.Linear` starts, up at zero (so the output is unchanged)."""
        device = next(self.base_layer.parameters()).device
        d = self.features
        self.adapter_down[name] = nn.Linear(d, config.size, device=device, dtype=torch.float32)
        up = nn.Linear(config.size, d, device=device, dtype=torch.float32)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_up[name] = up
        self.activation[name] = ACTIVATIONS[config.activation]()
        self.dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = float(config.scaling)

    def delete(self, name: str) -> None:
        for container in (self.adapter_down, self.adapter_up, self.activation, self.dropout):
            del container[name]
        del self.scaling[name]
        if self.active == name:
            self.active = None

    def delta(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """`scaling · up(act(down(dropout(h))))`, in the adapter's dtype (fp32 unless autocast)."""
        down = self.adapter_down[name]
        z = self.dropout[name](h).to(down.weight.dtype)
        return self.adapter_up[name](self.activation[name](down(z))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.row_groups is not None:
            out = h
            for name, rows in self.row_groups:
                if name is not None and name in self.adapter_down:
                    delta = self.delta(name, h.index_select(0, rows))
                    out = out.index_add(0, rows, delta.to(h.dtype))
            return out
        if self.active is None or self.active not in self.adapter_down:
            return h
        return h + self.delta(self.active, h).to(h.dtype)


def output_features(layer: nn.Module) -> int:
    """Output width `d` of a linear layer (also GPT-2's `Conv1D`, or inside another wrapper)."""
    return layer_dims(layer)[0]
