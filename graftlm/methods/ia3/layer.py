"""The (IA)³ layer: a linear layer whose output (or input) is scaled by learned vectors.

::

    output vector (k_proj, v_proj):   x ──► W ──► ⊙ l  [out, 1]   (scales each output feature)
    input vector (down_proj):         x ──► ⊙ l [1, in] ──► W      (scales each input feature)

Vectors start at ones (the layer computes as before) and fold into W exactly: rows of W (and
the bias) for an output vector, columns for an input vector.
"""

from __future__ import annotations

import torch
from torch import nn

from graftlm.adapters.layer_walk import is_conv1d, layer_dims
from graftlm.errors import GraftError


class IA3Linear(nn.Module):
    """A linear layer (`nn.Linear` or GPT-2's `Conv1D`) with named (IA)³ scaling vectors.

    The original layer is kept whole as `base_layer` (frozen, as PEFT lays it out); the vectors
    live in the ParameterDict `ia3_l`, fp32, `[out, 1]` (scaling the output, bias included) or,
    for a feedforward layer, `[1, in]` (scaling the input). One adapter is active at a time;
    row-aware (`graftlm.adapters.contract`, item 7): with `row_groups` set, each group of batch rows
    is scaled by its own adapter's vector (or not at all).

    Shapes: input `(batch, ..., in_features)`, output `(batch, ..., out_features)`.
    """

    graftlm_row_aware = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_dims(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.row_groups: list[tuple[str | None, torch.Tensor]] | None = None

    def add(self, name: str, feedforward: bool) -> None:
        """A new vector of ones for adapter `name` (the model is unchanged by it)."""
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = next(self.base_layer.parameters()).device
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.feedforward[name] = feedforward

    def delete(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if merged)."""
        if self.merged == name:
            self.unmerge()
        del self.ia3_l[name]
        del self.feedforward[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is not None:
            return self._rows_forward(x)
        name = self.active
        if name is None or name == self.merged or name not in self.ia3_l:
            return self.base_layer(x)
        scale = self.ia3_l[name].flatten()
        if self.feedforward[name]:
            return self.base_layer((x * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def _rows_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row scaled by its group's adapter (`row_groups`), in one base product."""
        if self.merged is not None:
            raise GraftError(
                f"per-row adapters need unmerged (IA)³ adapters; {self.merged!r} is merged"
            )
        groups = [(n, rows) for n, rows in self.row_groups if n is not None and n in self.ia3_l]
        ff = [n for n, _ in groups if self.feedforward[n]]
        out = [n for n, _ in groups if not self.feedforward[n]]
        if ff:
            x = (x * self._row_scales(x, groups, ff, self.in_features)).to(x.dtype)
        result = self.base_layer(x)
        if out:
            scale = self._row_scales(result, groups, out, self.out_features)
            result = (result * scale).to(result.dtype)
        return result

    def _row_scales(self, like: torch.Tensor, groups, names: list[str], width: int):
        """`[batch, 1, ..., width]` of ones, with each named group's rows set to its vector."""
        scale = torch.ones(like.shape[0], width, dtype=torch.float32, device=like.device)
        for name, rows in groups:
            if name in names:
                vector = self.ia3_l[name].flatten().to(scale.dtype)
                scale = scale.index_copy(0, rows, vector.expand(len(rows), -1))
        return scale.view(like.shape[0], *([1] * (like.dim() - 2)), width)

    def merge(self, name: str | None = None) -> None:
        """Fold adapter `name`'s vector (default: the active one's) into the base weight (and
        bias), in fp32.

        Idempotent for the merged adapter.

        Raises:
            GraftError: another adapter is merged; the base layer is not a plain linear
                layer; the vector holds NaN/inf (nothing is changed then).
        """
        name = self.active if name is None else name
        if name is None or name not in self.ia3_l or self.merged == name:
            return
        if self.merged is not None:
            raise GraftError(f"(IA)³ adapter {self.merged!r} is merged; unmerge it first")
        if not (isinstance(self.base_layer, nn.Linear) or is_conv1d(self.base_layer)):
            raise GraftError(
                f"(IA)³ merges into nn.Linear / Conv1D weights, not a {type(self.base_layer).__name__}"
            )
        vector = self.ia3_l[name].detach().float()
        if not torch.isfinite(vector).all():
            raise GraftError(f"(IA)³ adapter {name!r} holds NaN/inf values; refusing to merge it")
        self._rescale(vector, self.feedforward[name])
        self.merged = name

    def unmerge(self) -> None:
        """Divide the merged vector out of the base weight again (no-op when none is merged).

        Raises:
            GraftError: a zero entry makes the merge impossible to undo.
        """
        name = self.merged
        if name is None:
            return
        vector = self.ia3_l[name].detach().float()
        if (vector == 0).any():
            raise GraftError(f"(IA)³ adapter {name!r} has zero entries: the merge cannot be undone")
        self._rescale(1.0 / vector, self.feedforward[name])
        self.merged = None

    def _rescale(self, vector: torch.Tensor, feedforward: bool) -> None:
        # `vector` is [out, 1] or [1, in]: it multiplies an [out, in] weight directly, and
        # Conv1D's [in, out] weight transposed
        weight = self.base_layer.weight
        scale = vector.T if is_conv1d(self.base_layer) else vector
        with torch.no_grad():
            weight.copy_((weight.detach().float() * scale).to(weight.dtype))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not feedforward:  # the output scale covers the bias
                bias.copy_((bias.detach().float() * vector.flatten()).to(bias.dtype))

    def extra_repr(self) -> str:
        kinds = {n: "in" if ff else "out" for n, ff in self.feedforward.items()}
        return f"in={self.in_features}, out={self.out_features}, scales={kinds}"
