"""The AdaLoRA layer: an SVD-shaped update P·diag(λ)·Q on a frozen linear layer, and finding
those layers (and their adapter's config) on a model.

Both the method (attach/save/load) and the rank budget (`budget.TrainingHooks`) read these, so
they live apart from either.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.methods.adalora.config import AdaLoraConfig
from graftlm.methods.lora.layer import LoraLinear

INIT_STD = 0.02  # P and Q start N(0, INIT_STD²), as in PEFT


class AdaLoraLinear(LoraLinear):
    """`LoraLinear` whose adapters are SVD-shaped triplets (P, Λ, Q) instead of (B, A).

    Shapes per adapter: `lora_A` Q `[r, in]`, `lora_E` Λ `[r, 1]`, `lora_B` P `[out, r]`;
    input `(..., in_features)`, output `(..., out_features)`.
    """

    PLAIN_LOW_RANK = False  # the update is P·diag(λ)·Q with masked triplets

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        # Parameters directly (PEFT's layout: `q_proj.lora_A.default` is the tensor itself)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def _adapter_containers(self):
        return [self.lora_A, self.lora_E, self.lora_B, self.lora_dropout]

    def add(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        raise GraftError(
            f"this layer holds AdaLoRA adapters ({list(self.ranks)}); a LoRA adapter "
            f"{name!r} cannot share it (load it onto a fresh base model)"
        )

    def add_triplets(self, name: str, rank: int, scaling: float, dropout: float) -> None:
        """Create adapter `name` with `rank` triplets: Λ = 0, P and Q N(0, 0.02²) (PEFT's init)."""
        if name in self.ranks:
            raise GraftError(f"adapter {name!r} already exists on this layer")
        device = self.weight.device
        q = torch.randn(rank, self.in_features, device=device) * INIT_STD
        p = torch.randn(self.out_features, rank, device=device) * INIT_STD
        self.lora_A[name] = nn.Parameter(q)
        self.lora_E[name] = nn.Parameter(torch.zeros(rank, 1, device=device))
        self.lora_B[name] = nn.Parameter(p)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranks[name] = rank
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        q = self.lora_A[name].detach().float()
        e = self.lora_E[name].detach().float()
        p = self.lora_B[name].detach().float()
        delta = (p @ (q * e)) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = self.lora_A[name]
        x = x.to(q.dtype)
        hidden = F.linear(self.lora_dropout[name](x), q * self.lora_E[name])  # (..., r)
        return F.linear(hidden, self.lora_B[name]) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is None or self.disabled:
            return super().forward(x)
        # per-row adapters: LoRA's gathered bank stacks plain (A, B) pairs and has no place for
        # Λ, so every group takes the loop
        self._check_rows()
        result = self.base_forward(x)
        for name, rows in self.row_groups:
            if name is None or name not in self.ranks:
                continue
            delta = self._lora(name, x.index_select(0, rows))
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result


def svd_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdaLoraLinear]]:
    """Every AdaLoRA layer of `model` (holding adapter `name`, if given), with its module name."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdaLoraLinear) and (name is None or name in module.ranks):
            yield module_name, module


def adapter_config(model: nn.Module, name: str = "default") -> AdaLoraConfig:
    """The AdaLoraConfig of adapter `name` on `model`."""
    adapter = adapter_state(model).adapters.get(name)
    config = adapter.config if adapter is not None else None
    if not isinstance(config, AdaLoraConfig):
        raise GraftError(f"the model has no AdaLoRA adapter named {name!r}")
    return config


def set_adapter_config(model: nn.Module, name: str, config: AdaLoraConfig) -> None:
    """Record `config` as AdaLoRA adapter `name`'s (the budget's schedule and allocation)."""
    adapter_state(model).add(name, "adalora", config)
