"""LoRA layers: a frozen base weight plus named low-rank adapters.

::

        x ──► W (frozen, d_out x d_in) ───────────────┐
        │                                              (+) ──► y
        └──► dropout ──► A [r, d_in] ──► B [d_out, r] ─┘ x scale (alpha/r, or alpha/sqrt(r))

A starts kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged.

The layers keep the base `weight` and `bias` under `nn.Linear`'s own names (the same Parameter
objects), so base checkpoints load unchanged and tied weights stay tied. Adapters live in
`lora_A` / `lora_B` ModuleDicts keyed by adapter name, as PEFT lays them out, which makes the
saved keys PEFT's keys. Several adapters can be active at once (their updates add up), and
`row_groups` lets each row of a batch use its own adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters.modules import is_conv1d
from graftlm.errors import GraftError
from graftlm.kernels import lora_update, small_batch_linear
from graftlm.methods.lora.dora_layer import DoraMagnitudes
from graftlm.methods.lora.rows import RowGroups, gathered_rows_forward

# modules_to_save lived here before it had its own module (callers import it from here)
from graftlm.methods.lora.trained_copies import TrainedCopies  # noqa: F401


class LoraLayerBase(nn.Module):
    """Bookkeeping shared by LoRA on linear and embedding layers."""

    graftlm_row_aware = True  # honours `row_groups` (adapters.contract, item 8)

    def __init__(self) -> None:
        super().__init__()
        self.scaling: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_groups: RowGroups | None = None
        # PiSSA: the initial (A0, B0) per adapter, needed to save a plain LoRA over the original W
        self.pissa_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # per adapter: (B's version and address, B transposed) for decode steps (LoraLinear)
        self._b_t: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        self.lora_magnitude_vector = DoraMagnitudes()  # DoRA adapters' m (dora_layer.py)

    # -- adapter management -------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ranks)

    def delete(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        if name in self.pissa_init:
            # PiSSA moved s·B0·A0 out of the base weight into the adapter: give it back, so
            # deleting the adapter leaves the original base
            a0, b0 = self.pissa_init[name]
            initial = (b0 @ a0) * self.scaling[name]
            initial = initial.T if getattr(self, "fan_in_fan_out", False) else initial
            with torch.no_grad():
                self.weight.copy_((self.weight.detach().float() + initial).to(self.weight.dtype))
        for container in self._adapter_containers():
            if name in container:
                del container[name]
        for table in (self.scaling, self.ranks, self.pissa_init, self._b_t):
            table.pop(name, None)
        self.lora_magnitude_vector.drop(name)
        self._row_bank = None  # the per-row bank (lora_rows.py) may hold a copy of it
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _adapter_containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The fp32 update `scale * B @ A` in the base weight's layout."""
        raise NotImplementedError

    # -- merging ------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None) -> None:
        """Add the updates of `names` (default: the active adapters) into the base weight.

        Computed in fp32 and cast back; idempotent (an already merged adapter is skipped).

        Raises:
            GraftError: the merged weight would contain NaN or inf (nothing is changed then).
        """
        names = self.active_adapters if names is None else names
        for name in names:
            if name in self.merged_adapters or name not in self.ranks:
                continue
            base = self._weight_for_merge()
            if name in self.lora_magnitude_vector:  # DoRA: g ⊙ (W + s·B·A)
                merged = self.lora_magnitude_vector.merged_weight(self, name, base)
            else:
                merged = base + self.delta_weight(name).to(base.device)
            if not torch.isfinite(merged).all():
                raise GraftError(f"merging adapter {name!r} would put NaN/inf into the base weight")
            self._store_merged(merged)
            self.merged_adapters.append(name)

    def _weight_for_merge(self) -> torch.Tensor:
        """The weight the next merge adds to, fp32 (merged updates included)."""
        return self.weight.detach().float()

    def _store_merged(self, merged: torch.Tensor) -> None:
        """Keep the fp32 weight a merge produced (cast into the base weight's dtype here)."""
        with torch.no_grad():
            self.weight.copy_(merged.to(self.weight.dtype))

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged updates again (default: every merged adapter, last merged first:
        a DoRA merge rescales what was merged before it), in fp32."""
        names = list(reversed(self.merged_adapters)) if names is None else names
        for name in names:
            if name not in self.merged_adapters:
                continue
            restored = self.weight_without(name, self.weight.detach().float())
            with torch.no_grad():
                self.weight.copy_(restored.to(self.weight.dtype))
            self.merged_adapters.remove(name)

    def weight_without(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        """The fp32 weight `merged` with adapter `name`'s merge undone."""
        if name in self.lora_magnitude_vector:
            return self.lora_magnitude_vector.unmerged_weight(self, name, merged)
        return merged - self.delta_weight(name).to(merged.device)

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _check_rows(self) -> None:
        if self.merged_adapters:
            raise GraftError(
                "per-row adapters need unmerged adapters; call unmerge() first "
                f"(merged: {self.merged_adapters})"
            )

    def _add_adapter_outputs(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` plus `self._lora(name, x)` of each unmerged active adapter, or of each row's
        own adapter (one pass per adapter group) when per-row adapters are set."""
        out_dtype = result.dtype
        if self.row_groups is not None:
            self._check_rows()
            for name, rows in self.row_groups:
                if name is None or name not in self.ranks:
                    continue
                delta = self._lora(name, x.index_select(0, rows))
                result = result.index_add(0, rows, delta.to(out_dtype))
            return result
        for name in self._unmerged_active():
            result = result + self._lora(name, x).to(out_dtype)
        return result


class LoraLinear(LoraLayerBase):
    """LoRA on `nn.Linear` (or GPT-2's `Conv1D`), keeping its `weight`/`bias` Parameters.

    Args:
        base: the layer to adapt; its Parameters are reused, not copied.

    Shapes: input `(..., in_features)`, output `(..., out_features)`.
    """

    # Capabilities the fast inference paths check, set False by subclasses that lack them:
    # the base is a dense `weight` the decode-step C kernel can read (not NF4 codes) ...
    DENSE_BASE = True
    # ... and each adapter's update is scale·(x·Aᵀ)·Bᵀ (not AdaLoRA's P·Λ·Q)
    PLAIN_LOW_RANK = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.fan_in_fan_out = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.out_features, self.in_features = base.weight.shape
        self.base_class = type(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def _adapter_containers(self):
        return [self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector]

    def add(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        """Create adapter `name` of the given rank; `init` is kaiming, gaussian or pissa."""
        if name in self.ranks:
            raise GraftError(f"adapter {name!r} already exists on this layer")
        device = self.weight.device
        lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        if init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranks[name] = rank
        self.scaling[name] = scaling
        if init == "pissa":
            self._init_pissa(name)

    def _base_weight_out_in(self) -> torch.Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight

    def dense_weight(self) -> torch.Tensor:
        """The base weight as used now (merged updates included), fp32 `(out, in)`; may share
        the Parameter's storage: read it, do not write it."""
        weight = self._weight_for_merge()
        return weight.T if self.fan_in_fan_out else weight

    def _init_pissa(self, name: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; W keeps only the residual.

        With W = U S Vh, A = sqrt(S_r / scale) Vh_r and B = U_r sqrt(S_r / scale), so that
        scale * B A is W's best rank-r approximation and W - scale * B A the residual.
        """
        rank, scale = self.ranks[name], self.scaling[name]
        weight = self._base_weight_out_in().detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:rank] / scale)
        lora_a = root[:, None] * vh[:rank]  # [r, in]
        lora_b = u[:, :rank] * root[None, :]  # [out, r]
        residual = weight - scale * (lora_b @ lora_a)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(lora_a)
            self.lora_B[name].weight.copy_(lora_b)
            new_weight = residual.T if self.fan_in_fan_out else residual
            self.weight.copy_(new_weight.to(self.weight.dtype))
        self.pissa_init[name] = (lora_a.clone(), lora_b.clone())

    def delta_weight(self, name: str) -> torch.Tensor:
        lora_a = self.lora_A[name].weight.detach().float()
        lora_b = self.lora_B[name].weight.detach().float()
        delta = (lora_b @ lora_a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: `x @ W.T + b` (Conv1D: `x @ W + b`)."""
        if self.fan_in_fan_out:
            shape = x.shape[:-1] + (self.out_features,)
            flat = x.reshape(-1, self.in_features)
            out = (
                flat @ self.weight
                if self.bias is None
                else torch.addmm(self.bias, flat, self.weight)
            )
            return out.view(shape)
        return small_batch_linear.linear(x, self.weight, self.bias)  # decode steps: C kernel

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, dropout = self.lora_A[name], self.lora_dropout[name]
        # under autocast the adapter's linears cast x to the autocast dtype themselves: a cast
        # to the adapter's fp32 first is a copy of x there and back, each way, in every
        # adapted layer, for the same bits (without dropout, whose mask would round otherwise)
        if not (isinstance(dropout, nn.Identity) and torch.is_autocast_enabled(x.device.type)):
            x = x.to(lora_a.weight.dtype)
        return self.lora_B[name](lora_a(dropout(x))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_forward(x)
        if self.row_groups is not None:
            return self._rows_forward(x)
        # the common inference cases first, with the least Python: every generated token runs
        # this in every adapted layer
        active = self._unmerged_active()
        if not active:  # merged (or no adapter active): the base layer alone
            return self.base_forward(x)
        if self.lora_magnitude_vector and not self.lora_magnitude_vector.keys().isdisjoint(active):
            return self.lora_magnitude_vector.forward_active(self, x, active)
        return self.lora_forward(x, active)

    def lora_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """The base plus the plain LoRA updates of `active` (unmerged) adapters."""
        if len(active) == 1:
            step = self._one_adapter_decode_step(x, active[0])
            if step is not None:
                return step
            if (weight := self._fused_update_weight(x, active[0])) is not None:
                name = active[0]
                return lora_update.LoraUpdateFunction.apply(
                    x, weight, self.bias, self.lora_A[name].weight,
                    self.lora_B[name].weight, self.scaling[name],
                )  # fmt: skip
        result = self.base_forward(x)
        if (
            not torch.is_grad_enabled()
            and result.dtype == torch.float32
            and self._plain_lora_without_dropout(active)
        ):
            return self._lora_inference(active, x, result)
        out_dtype = result.dtype
        for name in active:
            result = result + self._lora(name, x)
        return result.to(out_dtype)

    def _rows_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each row of the batch with its own adapter (`row_groups`), or none."""
        self._check_rows()
        result = self.base_forward(x)
        # many adapters in one batch at inference: two bmm over a padded bank (lora_rows.py)
        gathered = gathered_rows_forward(self, x, result)
        if gathered is not None:
            return self._dora_rows(gathered)
        for name, rows in self.row_groups:
            if name is None or name not in self.ranks:
                continue  # base-only rows, or an adapter that does not touch this layer
            delta = self._lora(name, x.index_select(0, rows))
            result = result.index_add(0, rows, delta.to(result.dtype))
        return self._dora_rows(result)

    def _dora_rows(self, result: torch.Tensor) -> torch.Tensor:
        if not self.lora_magnitude_vector:
            return result
        return self.lora_magnitude_vector.rescale_rows(self, result)

    def _one_adapter_decode_step(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """A decode step with one unmerged adapter, `name`: base product, bias and update in one
        C call (small_batch_linear.lora_linear); None where that does not apply (prompts,
        autograd, AdaLoRA's product, an NF4 or Conv1D base). Generation runs this in every
        adapted layer at every token, so the Python around the kernels is the cost that
        bench/generation_overhead.py sees at batch 1."""
        if (
            not self.DENSE_BASE
            or self.fan_in_fan_out
            or not small_batch_linear.kernel_takes(x, self.in_features)
            or not self._plain_lora_without_dropout([name])
        ):
            return None
        return small_batch_linear.lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A[name].weight,
            self.transposed_b(name),
            self.scaling[name],
        )

    def _fused_update_weight(self, x: torch.Tensor, name: str):
        """The base weight where a CPU training step runs this layer as one autograd function
        that adds the update inside the base's product (kernels/lora_update.py), else None."""
        fused = (
            self.DENSE_BASE
            and not self.fan_in_fan_out
            and self._plain_lora_without_dropout([name])  # in training: no dropout module
            and lora_update.applies(x, self.weight, self.bias)
        )
        return self.weight if fused else None

    def _plain_lora_without_dropout(self, names: list[str]) -> bool:
        if not self.PLAIN_LOW_RANK:
            return False
        return not self.training or all(
            isinstance(self.lora_dropout[n], nn.Identity) for n in names
        )

    def _lora_inference(self, names: list[str], x: torch.Tensor, result: torch.Tensor):
        """Decoding path: per adapter, for a few rows (decode steps), one C call that adds
        `scale·(x·Aᵀ)·Bᵀ` into the base output (small_batch_linear.add_lora); otherwise one
        `x·Aᵀ` and one in-place `addmm`, instead of five module calls and two temporaries.
        Each generated token runs this in every adapted layer; what it costs against the base
        model is measured by bench/generation_overhead.py (README, "How training is made fast").
        """
        flat = result.view(-1, self.out_features)
        decode_step = small_batch_linear.kernel_takes(x, self.in_features)
        for name in names:
            lora_a = self.lora_A[name].weight
            if decode_step:  # B transposed is built (and kept) only for the kernel
                scale = small_batch_linear.scale_tensor(self.scaling[name])
                if small_batch_linear.add_lora(x, lora_a, self.transposed_b(name), scale, flat):
                    continue  # one C call for both products
            after_a = F.linear(x.to(torch.float32), lora_a)
            flat.addmm_(after_a.view(-1, after_a.shape[-1]), self.lora_B[name].weight.t(),
                        alpha=self.scaling[name])  # fmt: skip
        return result

    def transposed_b(self, name: str) -> torch.Tensor:
        """`lora_B[name].weight` transposed, `(r, out)` contiguous, for the decode-step kernel;
        cached until the weight changes (in-place edits bump its version counter)."""
        weight = self.lora_B[name].weight
        key = (weight._version, weight.data_ptr())
        cached = self._b_t.get(name)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):  # a normal tensor: the model stays deep-copyable
                cached = (key, weight.detach().t().contiguous())
            self._b_t[name] = cached
        return cached[1]

    def to_plain(self) -> nn.Module:
        """A plain base-class layer holding the (possibly merged) weight and bias."""
        if self.fan_in_fan_out:
            plain = self.base_class(self.out_features, self.in_features)
        else:
            kind = (
                self.base_class
                if small_batch_linear.is_plain_linear(self.base_class)
                else nn.Linear
            )
            plain = kind(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.ranks}"


class LoraEmbedding(LoraLayerBase):
    """LoRA on `nn.Embedding`, laid out as PEFT does it.

    `lora_embedding_A` is `[r, num_embeddings]` (zero at start) and `lora_embedding_B`
    `[embedding_dim, r]` (normal), so the update starts at zero like LoRA on linears.
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _adapter_containers(self):
        return [self.lora_embedding_A, self.lora_embedding_B]

    def add(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        if name in self.ranks:
            raise GraftError(f"adapter {name!r} already exists on this layer")
        if init == "pissa":
            raise GraftError(
                "init='pissa' is not defined for embedding layers; target linears only"
            )
        device = self.weight.device
        lora_a = torch.zeros(rank, self.num_embeddings, device=device)
        lora_b = torch.empty(self.embedding_dim, rank, device=device)
        nn.init.normal_(lora_b)
        self.lora_embedding_A[name] = nn.Parameter(lora_a)
        self.lora_embedding_B[name] = nn.Parameter(lora_b)
        self.ranks[name] = rank
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        lora_a = self.lora_embedding_A[name].detach().float()
        lora_b = self.lora_embedding_B[name].detach().float()
        return (lora_b @ lora_a).T * self.scaling[name]

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            table,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def _lora(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        after_a = self._embed(ids, self.lora_embedding_A[name].T)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self._embed(ids, self.weight)
        if self.disabled:
            return result
        return self._add_adapter_outputs(result, ids)

    def to_plain(self) -> nn.Embedding:
        plain = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )
        plain.weight = self.weight
        return plain
