"""DoRA's arithmetic on a LoRA layer: the trainable magnitude per output feature.

DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) splits the adapted weight into a
direction and a magnitude::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row        m: [out], starts at ‖W‖_row (so W' = W)
    y  = W' x + b
       = base(x) + (g − 1) ⊙ (base(x) − b) + g ⊙ s·B·A x,     g = m / ‖W + s·B·A‖_row

The second form is the one computed (as PEFT does): the base product is the LoRA layer's own,
so DoRA costs LoRA's forward plus a row-norm of `W + s·B·A` and element-wise work. The norm is
detached from the autograd graph (the paper's section 4.3, and PEFT): gradients reach `m`, `A`
and `B` through the numerator only. At inference the norm is a constant per adapter, so a
DoRA layer's output is its LoRA output rescaled per feature, `y_lora ⊙ g + (1 − g) ⊙ b`; `g`
and that offset are cached until a weight changes, which is what lets DoRA rows share a batch
with LoRA rows (`LoraLinear._rows_forward`).

`DoraMagnitudes` is the `lora_magnitude_vector` of every LoRA layer: one `[out]` float32
Parameter per DoRA adapter, under PEFT's name, in the output features' order (GPT-2's Conv1D
included), saved as `...<module>.lora_magnitude_vector`.
"""

from __future__ import annotations

import operator

import torch
from torch import nn


def row_norms(weight_out_in: torch.Tensor, lora_a, lora_b, scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output feature, float32, outside autograd.

    Args:
        weight_out_in: the base weight `(out, in)`, float32 (a view is fine: not modified).
        lora_a: A `(r, in)`; lora_b: B `(out, r)`.
        scale: s.

    Returns:
        `(out,)` float32.
    """
    with torch.no_grad():
        combined = torch.addmm(weight_out_in, lora_b.float(), lora_a.float(), alpha=scale)
        return torch.linalg.vector_norm(combined, dim=1)


class DoraMagnitudes(nn.ParameterDict):
    """The magnitudes `m` of a layer's DoRA adapters, keyed by adapter name, and their math.

    The methods take the LoRA layer they belong to (`LoraLinear` or a subclass), which gives the
    base weight (`dense_weight()`, float32 `(out, in)`, merged updates included), `lora_A`,
    `lora_B`, `lora_dropout`, `scaling`, `bias`, `fan_in_fan_out` and `base_forward`.
    """

    def __init__(self) -> None:
        super().__init__()
        # per adapter: (weights' versions and addresses, g, (1 - g)·b or None), for inference
        self._inference: dict[str, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}
        # per merged adapter: the g its merge used (unmerging divides by the same one)
        self.merged_scale: dict[str, torch.Tensor] = {}
        # per-row serving: the per-row scales of the last batch (`rescale_rows`)
        self._rows: _RowScales | None = None

    def init(self, layer, name: str) -> None:
        """Add adapter `name`'s magnitude, `‖W + s·B·A‖_row` (‖W‖ while B is zero), as PEFT."""
        norms = self.norm(layer, name)
        self[name] = nn.Parameter(norms.to(layer.lora_A[name].weight.dtype))
        self._inference.pop(name, None)

    def drop(self, name: str) -> None:
        self._rows = None
        if name in self:
            del self[name]
        self._inference.pop(name, None)
        self.merged_scale.pop(name, None)

    def norm(self, layer, name: str) -> torch.Tensor:
        """‖W + s·B·A‖_row of adapter `name` over the layer's current base weight."""
        return row_norms(
            layer.dense_weight(),
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            layer.scaling[name],
        )

    def scale(self, layer, name: str) -> torch.Tensor:
        """g = m / ‖W + s·B·A‖_row, `(out,)` float32; with gradients to `m` when they are on."""
        if torch.is_grad_enabled():
            # the norm is a constant to autograd (DoRA paper, section 4.3; PEFT's dora.py):
            # `norm` runs under no_grad, so only m (and A, B through the LoRA term) learn
            return self[name].float() / self.norm(layer, name)
        return self._constants(layer, name)[0]

    def _constants(self, layer, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensors = [layer.lora_A[name].weight, layer.lora_B[name].weight, self[name], layer.weight]
        if layer.bias is not None:
            tensors.append(layer.bias)
        key = (
            tuple(t._version for t in tensors),
            tuple(t.data_ptr() for t in tensors),
            tuple(layer.merged_adapters),
        )
        cached = self._inference.get(name)
        if cached is None or cached[0] != key:
            # normal tensors, not inference-mode ones: the model stays deep-copyable
            with torch.inference_mode(False), torch.no_grad():
                g = self[name].detach().float() / self.norm(layer, name)
                offset = None if layer.bias is None else (1 - g) * layer.bias.detach().float()
            cached = (key, g, offset)
            self._inference[name] = cached
        return cached[1], cached[2]

    def rescale(self, layer, name: str, lora_out: torch.Tensor) -> torch.Tensor:
        """Inference: LoRA's output `W x + b + s·B·A x` of adapter `name` turned into DoRA's,
        `g ⊙ (W x + s·B·A x) + b`, in place. `lora_out` is `(..., out)`."""
        g, offset = self._constants(layer, name)
        lora_out.mul_(g.to(lora_out.dtype))
        if offset is not None:
            lora_out.add_(offset.to(lora_out.dtype))
        return lora_out

    def adapter_output(self, layer, name: str, x: torch.Tensor, base_out: torch.Tensor | None):
        """What adapter `name` adds to the base output: `(g − 1) ⊙ W x + g ⊙ s·B·A x`, float32.

        Args:
            x: the layer input `(..., in)`.
            base_out: `W x` without bias, or None to compute it (it is recomputed anyway when
                dropout is active, on the dropped-out input, as PEFT does).
        """
        dropout = layer.lora_dropout[name]
        if layer.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)
            base_out = None
        if base_out is None:
            base_out = layer.base_forward(x)
            if layer.bias is not None:
                base_out = base_out - layer.bias
        lora_a = layer.lora_A[name]
        lora_out = layer.lora_B[name](lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[name]
        g = self.scale(layer, name)
        return (g - 1) * base_out + g * lora_out

    def _one_adapter_output(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        """Training, one adapter, no dropout: `g ⊙ (W x + s·B·A x) + b` in two element-wise
        ops over the output (PEFT's `(g − 1) ⊙ W x + g ⊙ s·B·A x`, added to `W x`, takes five,
        each kept for backward; bench/dora_speed.py measures what the difference costs)."""
        result = layer.base_forward(x)
        base_out = result if layer.bias is None else result - layer.bias
        lora_a = layer.lora_A[name]
        lora_out = layer.lora_B[name](lora_a(x.to(lora_a.weight.dtype)))
        out = torch.add(base_out, lora_out, alpha=layer.scaling[name]) * self.scale(layer, name)
        if layer.bias is not None:
            out = out + layer.bias
        return out.to(result.dtype)

    def merged_weight(self, layer, name: str, base: torch.Tensor) -> torch.Tensor:
        """`g ⊙ (W + s·B·A)` in the layer's weight layout, float32; remembers g for unmerge.

        Args:
            base: the float32 weight the merge adds to (`(out, in)`, Conv1D `(in, out)`).
        """
        delta = layer.delta_weight(name).to(base.device)
        combined = base + delta
        rows = combined.T if layer.fan_in_fan_out else combined
        g = self[name].detach().float() / torch.linalg.vector_norm(rows, dim=1)
        self.merged_scale[name] = g
        return combined * (g[None, :] if layer.fan_in_fan_out else g[:, None])

    def unmerged_weight(self, layer, name: str, merged: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight`: `merged / g − s·B·A`, float32."""
        g = self.merged_scale.pop(name)
        g = g[None, :] if layer.fan_in_fan_out else g[:, None]
        return merged / g - layer.delta_weight(name).to(merged.device)

    def rescale_rows(self, layer, result: torch.Tensor) -> torch.Tensor:
        """Per-row serving: the rows of each DoRA adapter's group rescaled (`rescale`).

        `result` holds every row's LoRA output (base rows: the base output), `(batch, ..., out)`.
        One multiply (and one add, for a layer with bias) by per-row tensors, kept for as long
        as the batch keeps its rows and adapters and no weight changes: this runs in every
        layer at every decode step, where checking each adapter's constants one by one cost
        more than the rescale itself.
        """
        groups = layer.row_groups
        cached = self._rows
        if cached is None or not cached.fits(layer, groups):
            cached = _RowScales(self, layer, groups)
            self._rows = cached
        if cached.scale is None:
            return result
        shape = (result.shape[0],) + (1,) * (result.dim() - 2) + (layer.out_features,)
        out = result * cached.scale.view(shape).to(result.dtype)
        if cached.offset is not None:
            out += cached.offset.view(shape).to(result.dtype)
        return out

    def forward_active(self, layer, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """The layer's output with the `active` (unmerged) adapters, at least one of them DoRA.

        At inference one DoRA adapter is LoRA's fast path plus a per-feature rescale; otherwise
        each adapter adds its update to the base output (DoRA's `adapter_output`, LoRA's `s·B·A x`).
        """
        name = active[0]
        if len(active) == 1 and (
            not layer.training or isinstance(layer.lora_dropout[name], nn.Identity)
        ):
            if not torch.is_grad_enabled():
                return self.rescale(layer, name, layer.lora_forward(x, active))
            return self._one_adapter_output(layer, name, x)
        result = layer.base_forward(x)
        out_dtype = result.dtype
        lora = [n for n in active if n not in self]
        base_out = result if layer.bias is None else result - layer.bias
        if lora:
            result = layer.lora_forward(x, lora)
        for name in active:
            if name in self:
                result = result + self.adapter_output(layer, name, x, base_out)
        return result.to(out_dtype)


_VERSION = operator.attrgetter("_version")


class _RowScales:
    """Per-row g and (1 - g)·b of one batch on one layer (ones and zeros for other rows)."""

    def __init__(self, magnitudes: DoraMagnitudes, layer, groups) -> None:
        self.groups, self.content = groups, _rows_content(groups)
        names = [(n, rows) for n, rows in groups if n in magnitudes]
        self.tensors = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        for name, _ in names:
            self.tensors += [layer.lora_A[name].weight, layer.lora_B[name].weight, magnitudes[name]]
        self.key = self._key(layer)
        self.scale = self.offset = None
        if not names:
            return
        batch = sum(rows.numel() for _, rows in groups)
        self.scale = torch.ones(
            batch, layer.out_features, device=layer.lora_A[names[0][0]].weight.device
        )
        if layer.bias is not None:
            self.offset = torch.zeros_like(self.scale)
        for name, rows in names:
            g, offset = magnitudes._constants(layer, name)
            self.scale[rows] = g
            if offset is not None:
                self.offset[rows] = offset

    def _key(self, layer) -> tuple:
        # checked in every layer at every decode step: map() keeps the loop in C
        return (
            tuple(map(_VERSION, self.tensors)),
            tuple(map(torch.Tensor.data_ptr, self.tensors)),
            tuple(layer.merged_adapters),
        )

    def fits(self, layer, groups) -> bool:
        if self.groups is not groups:
            if not _same_rows(self.content, groups):
                return False
            self.groups = groups  # by content: a server may enter `row_adapters` at every step
        return self._key(layer) == self.key


def _rows_content(groups) -> tuple:
    return tuple((name, tuple(rows.tolist())) for name, rows in groups)


def _same_rows(content: tuple, groups) -> bool:
    # by content: a server may enter `row_adapters` anew at every decode step
    return len(content) == len(groups) and all(
        name == n and rows.numel() == len(r) and tuple(rows.tolist()) == r
        for (n, r), (name, rows) in zip(content, groups)
    )
