"""Many adapters in one batch: each row's low-rank update through one gathered bmm per layer.

`row_adapters` gives every row of a batch its own adapter. The plain way (`LoraLinear`'s loop)
runs one `index_select` / A / B / `index_add` per adapter group, which is cheap for a few groups
but costs ~5 small kernels per adapter per layer: with 8 distinct adapters in a decode batch of
the built-in model that made a step ~1.5-1.9x slower than the same batch on one adapter.

Here, for inference, a layer stacks the adapters of the batch into a bank padded to the largest
rank (`A [n, r_max, in]`, `B^T [n, r_max, out]`; the zero padding adds exact zeros), gathers
one A and B per row, and computes every row's update with two `bmm`::

    h = bmm(x_rows [m, T, in], A_rows^T [m, in, r_max])     # [m, T, r_max]
    y[rows] += bmm(h, B^T_rows [m, r_max, out]) * scale_rows

so the kernel count no longer grows with the number of adapters. A decode step (at most
`small_batch_linear.MAX_ROWS` rows) skips the gathers: one C call reads each row's A and B
from the bank in place (`small_batch_linear.add_lora`). Rows without an adapter on this
layer (base rows, or an adapter that does not target it) are left out of `x_rows` and pay nothing.
The bank is cached per layer and rebuilt when the batch's adapters, or their weights (tensor
version counters), change; it holds a copy of those adapters' weights on this layer only.
"""

from __future__ import annotations

import operator

import torch

from graftlm.kernels import small_batch_linear

# (adapter name or None for "base only", LongTensor of row indices) per group
RowGroups = list[tuple[str | None, torch.Tensor]]

# Use the gathered path from this many distinct adapters on a layer; below it the per-adapter
# loop launches fewer kernels (measured on the built-in model, see bench/serve_bench.py).
MIN_GROUPS = 2


class _Bank:
    """Adapters of one batch on one layer, padded to a common rank, plus the row mapping."""

    def __init__(self, layer, groups, names: list[str]) -> None:
        self.names = names
        weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
        # in-place edits (an optimizer step, a test perturbing B) bump a tensor's `_version`;
        # a deleted adapter drops the bank (LoraLayerBase.delete), so names + versions (and
        # storage addresses) suffice
        self.tensors = [t for pair in weights for t in pair]
        self.versions = _versions(self.tensors)
        r_max = max(layer.ranks[n] for n in names)
        device, dtype = weights[0][0].device, weights[0][0].dtype
        self.a = torch.zeros(len(names), r_max, layer.in_features, device=device, dtype=dtype)
        # B transposed: what bmm multiplies by, and the C kernel's fast layout
        self.b_t = torch.zeros(len(names), r_max, layer.out_features, device=device, dtype=dtype)
        for slot, (name, (lora_a, lora_b)) in enumerate(zip(names, weights)):
            rank = layer.ranks[name]
            self.a[slot, :rank] = lora_a.detach()
            self.b_t[slot, :rank] = lora_b.detach().t()
        self.scale = torch.tensor([layer.scaling[n] for n in names], device=device, dtype=dtype)
        self.map_rows(groups)

    def map_rows(self, groups) -> None:
        """Which rows use which slot (cheap; redone when only the rows change)."""
        self.groups = groups
        self.rows_key = _rows_key(groups, self.names)
        slot_of = {n: i for i, n in enumerate(self.names)}
        rows, slots = [], []
        for name, group_rows in groups:
            if name in slot_of:
                rows.append(group_rows)
                slots.append(torch.full_like(group_rows, slot_of[name]))
        self.rows = torch.cat(rows)
        self.slots = torch.cat(slots)
        # the same per batch row, -1 for rows this bank does not touch (the C kernel's form)
        batch = sum(group_rows.numel() for _, group_rows in groups)
        self.slot_of_row = torch.full((batch,), -1, dtype=torch.int64, device=self.rows.device)
        self.slot_of_row[self.rows] = self.slots
        self.row_scale = self.scale.index_select(0, self.slots)[:, None, None]
        # one adapter per row, rows in bank order: use the bank as is, no per-step gather
        arange = torch.arange(self.rows.numel(), device=self.rows.device)
        self.identity = bool(torch.equal(self.slots, arange))
        self.rows_in_order = bool(torch.equal(self.rows, arange))

    def valid_for(self, groups, names: list[str]) -> bool:
        """The weights fit this batch's adapters (the row mapping is updated if needed)."""
        if self.names != names:
            return False
        # `.to()` / `.half()` swap a Parameter's storage without bumping its version
        if _versions(self.tensors) != self.versions:
            return False
        if self.groups is not groups and self.rows_key != _rows_key(groups, names):
            # by content: a server may enter `row_adapters` anew at every decode step, and the
            # bank should live as long as the batch keeps its adapters
            self.map_rows(groups)
        self.groups = groups
        return True


_VERSION = operator.attrgetter("_version")


def _versions(tensors: list[torch.Tensor]) -> tuple:
    # checked in every adapted layer at every decode step: map() keeps the loop in C
    return tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))


def _rows_key(groups, names: list[str]) -> tuple:
    return tuple((n, tuple(r.tolist())) for n, r in groups if n in names)


def gathered_rows_forward(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
    """Add each row's LoRA update to `result` with the bank path, or return None to decline.

    Declines (the caller then runs its per-adapter loop) when gradients are on (the bank is a
    detached copy), when a training-mode layer would apply LoRA dropout (the bank skips it), or
    when fewer than `MIN_GROUPS` of the batch's adapters touch this layer, unless it is a decode
    step the C kernel takes (`small_batch_linear.add_lora`).

    Args:
        layer: a `LoraLinear` (or subclass) whose `row_groups` is set.
        x: the layer input `(batch, ..., in_features)`.
        result: the base output `(batch, ..., out_features)`.

    Returns:
        `result` plus the per-row updates, or None.
    """
    if torch.is_grad_enabled():
        return None
    groups = layer.row_groups
    names = [n for n, _ in groups if n is not None and n in layer.ranks]
    # a decode step (a few rows, one token each) takes the C kernel even for one adapter
    decode_step = (
        small_batch_linear.kernel_takes(x, layer.in_features)
        and x.numel() == x.shape[0] * layer.in_features  # rows are the batch's rows
        and result.is_contiguous()
    )
    if not names or (len(names) < MIN_GROUPS and not decode_step):
        return None
    if layer.training and any(_drops(layer.lora_dropout[n]) for n in names):
        return None
    if len(names) < MIN_GROUPS:
        # one adapter: its own A and B, no bank (a bank per layer is rebuilt whenever the
        # batch's set of adapters changes)
        name = names[0]
        rows = next(r for n, r in groups if n == name)
        slots = None
        if rows.numel() != x.shape[0]:  # some rows are base-only
            slots = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
            slots[rows] = 0
        weights = layer.lora_A[name].weight, layer.transposed_b(name)
        scale = small_batch_linear.scale_tensor(layer.scaling[name])
        if small_batch_linear.add_lora(x, *weights, scale, result, slots):
            return result
        return None
    bank = getattr(layer, "_row_bank", None)
    if bank is None or not bank.valid_for(groups, names):
        bank = _Bank(layer, groups, names)
        layer._row_bank = bank
    if decode_step and x.shape[0] == bank.slot_of_row.numel():
        # each row's update in one C call that reads the bank in place: no gathered copies
        slots = bank.slot_of_row
        if small_batch_linear.add_lora(x, bank.a, bank.b_t, bank.scale, result, slots):
            return result
    every_row = bank.rows_in_order and bank.rows.numel() == x.shape[0]
    xs = x if every_row else x.index_select(0, bank.rows)
    xs = xs.reshape(xs.shape[0], -1, layer.in_features).to(bank.a.dtype)  # [m, T, in]
    if bank.identity:
        a, b_t = bank.a, bank.b_t
    else:
        a, b_t = bank.a.index_select(0, bank.slots), bank.b_t.index_select(0, bank.slots)
    h = torch.bmm(xs, a.transpose(1, 2))  # [m, T, r_max]
    delta = torch.bmm(h, b_t) * bank.row_scale  # [m, T, out]
    delta = delta.reshape((xs.shape[0],) + result.shape[1:]).to(result.dtype)
    if every_row:
        return result + delta
    return result.index_add(0, bank.rows, delta)


def _drops(dropout: torch.nn.Module) -> bool:
    return isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training
