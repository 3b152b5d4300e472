"""What prompt tuning and prefix tuning share: per-layer key/value prefixes inside attention.

Both methods give every attention layer P extra key/value positions that every real token
attends to. PEFT puts them into the KV cache (and, for prompt tuning, into the input); that
breaks batched generation with left padding, the training loop's shared-prefix forward and the
serving engine, which all own the cache. graftlm keeps them out of the inputs and the cache:

    attention(q, [K_prefix ; K], [V_prefix ; V], mask = [P ones | the causal/padding mask])

A custom attention function (registered with transformers' `AttentionInterface`, a thin wrapper
of its SDPA function) prepends the current layer's prefix. A pre-forward hook on the decoder
computes the prefixes of the pass once, from the active adapter:

- prefix tuning: the trained tensors themselves (or the reparameterization MLP's output);
- prompt tuning: the keys/values of the P virtual embeddings, from one decoder pass over them
  at positions 0..P-1 (they attend only to each other, so they do not depend on the input);

and moves the real tokens' positions up by P (the caller's `position_ids` + P, or the
decoder's own default + P). Those are PEFT's positions exactly: prefix slots / virtual tokens at
0..P-1, the input after them; so logits equal PEFT's, whatever the position encoding.
Positions still come from the caller, so left-padded rows (whose positions `generate` and the
engine derive from the attention mask) all see the same prefix and batched generation equals
one row at a time.

The trained modules live in `model.prompt_encoder[name]` (PEFT's attribute name), so they are
ordinary parameters of the model for the optimizer, checkpoints and `.to(device)`. The per-model
state the hooks read (`VirtualTokens`) is the method's record in the model's `AdapterState`;
each attention module holds a reference to it too (`graftlm_virtual_tokens`), which is how the
attention function, called with the module, finds it. `encoders.py` adds, switches, saves and
loads the adapters themselves.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError

ATTENTION = "graftlm_virtual_tokens"  # the attention implementation name we register
RECORD = "virtual_tokens"  # the key of the VirtualTokens in the model's AdapterState records
ENCODERS = "prompt_encoder"  # model attribute holding the trained modules, as in PEFT
PLAN_KWARG = "graftlm_virtual_tokens"  # the decoder keyword argument that carries a pass's Plan

# one layer's prefix: keys and values, each [1, kv_heads, P, head_dim]
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Geometry:
    """The attention shapes a prefix must fit."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    num_heads: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


class VirtualTokenEncoder(nn.Module):
    """Base of the trained modules: they turn their parameters into per-layer prefixes.

    Attributes:
        num_virtual_tokens: P.
        init: how the parameters started: "random", "vocab" or "text" (for adapter_config.json).
        init_text: the text of a "text" init.
    """

    num_virtual_tokens: int
    geometry: Geometry
    init: str = "random"
    init_text: str | None = None

    def settings(self) -> dict:
        """The adapter's config, as the model's AdapterState records it."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "init": self.init}

    def peft_config(self, base_model_name: str | None) -> dict:
        """Its `adapter_config.json`, in PEFT's form."""
        raise NotImplementedError

    def saved_tensor(self) -> torch.Tensor:
        """The one tensor its folder holds (`prompt_embeddings` in PEFT's layout)."""
        raise NotImplementedError

    def layer_kv(self, state: VirtualTokens) -> list[LayerKV]:
        """One `(keys, values)` pair per decoder layer, each `[1, kv_heads, P, head_dim]`."""
        raise NotImplementedError


class VirtualTokenAdapters(nn.ModuleDict):
    """`model.prompt_encoder`: the prompt/prefix adapters of a model, by name.

    Row-aware (`graftlm.adapters.contract`, item 7): with `row_groups` set, each group of batch rows
    gets its named adapter's prefix (rows of other or no adapters: none).
    """

    graftlm_row_aware = True

    def __init__(self) -> None:
        super().__init__()
        self.row_groups: list[tuple[str | None, torch.Tensor]] | None = None


@dataclass
class Plan:
    """The prefixes of one forward pass.

    Attributes:
        layers: per layer `(keys, values)`, `[1 or batch, kv_heads, P, head_dim]`.
        valid: None (every row sees all P slots) or `[batch, P]`, which slots a row sees.
        shift: how far the real tokens' positions move: P, or `[batch]` per row.
    """

    layers: list[LayerKV]
    valid: torch.Tensor | None
    shift: int | torch.Tensor
    used: int = 0  # attention calls that added the prefix (0 after a forward: not supported)


class VirtualTokens:
    """The per-model state the attention function and the decoder hooks read.

    A plain object (not an `nn.Module`), referenced from every attention module of the model,
    so that it adds no parameters and survives `copy.deepcopy(model)` consistently.
    """

    def __init__(self, model: nn.Module, decoder: nn.Module, geometry: Geometry) -> None:
        self.model = model
        self.decoder = decoder
        self.geometry = geometry
        self.active: str | None = None
        self.enabled = True
        self.current: Plan | None = None  # the plan of the running (outermost) forward pass
        self.capture: dict[int, LayerKV] | None = None  # set during prompt tuning's virtual pass
        self.cache: dict[int, tuple[tuple, list[LayerKV]]] = {}  # inference prefixes, by encoder
        self.attention_before: str | None = None

    @property
    def encoders(self) -> VirtualTokenAdapters:
        return getattr(self.model, ENCODERS)

    def active_encoder(self) -> VirtualTokenEncoder | None:
        if not self.enabled or self.active is None or self.active not in self.encoders:
            return None
        return self.encoders[self.active]

    # -- decoder hooks ------------------------------------------------------------------------

    def before_forward(self, decoder: nn.Module, args, kwargs):
        if self.capture is not None:  # prompt tuning's own pass over the virtual tokens
            return None
        if args:  # positional arguments: name them after the decoder's signature
            names = list(inspect.signature(decoder.forward).parameters)[: len(args)]
            kwargs = {**dict(zip(names, args)), **kwargs}
        inputs = kwargs.get("input_ids")
        inputs = kwargs["inputs_embeds"] if inputs is None else inputs
        plan = self._plan(inputs.shape[0])
        if plan is None:
            return None
        # The plan travels with the call, down to every attention layer: activation
        # checkpointing re-runs a layer with its original arguments, and so with its prefix.
        self.current = plan
        kwargs = dict(kwargs)
        kwargs[PLAN_KWARG] = plan
        # PEFT's positions: virtual tokens / prefix slots at 0..P-1, the input after them.
        # Missing positions are made as the decoder would make them.
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            seen = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(seen, seen + inputs.shape[1], device=inputs.device)[None]
        shift = plan.shift
        kwargs["position_ids"] = positions + (shift[:, None] if torch.is_tensor(shift) else shift)
        return (), kwargs

    def after_forward(self, decoder: nn.Module, args, kwargs, output) -> None:
        if self.capture is not None or self.current is None:
            return
        plan, self.current = self.current, None  # the autograd graph keeps what backward needs
        if output is not None and plan.used == 0:  # (None: the forward raised; let that show)
            raise GraftError(
                f"{type(decoder).__name__} did not pass its keyword arguments on to attention, "
                "so the prompt/prefix could not be added; this model is not supported"
            )

    def _plan(self, rows: int) -> Plan | None:
        groups = self.encoders.row_groups
        if groups is None:
            encoder = self.active_encoder()
            if encoder is None:
                return None
            return Plan(self._prefixes(encoder), None, encoder.num_virtual_tokens)
        found = [
            (self.encoders[name], index)
            for name, index in groups
            if self.enabled and name is not None and name in self.encoders
        ]
        if not found:
            return None
        # one padded prefix for the batch; each row sees its own adapter's first P slots
        width = max(encoder.num_virtual_tokens for encoder, _ in found)
        first = self._prefixes(found[0][0])[0][0]
        g = self.geometry
        shape = (rows, g.kv_heads, width, g.head_dim)
        layers = [(first.new_zeros(shape), first.new_zeros(shape)) for _ in range(g.num_layers)]
        valid = torch.zeros(rows, width, dtype=torch.bool, device=first.device)
        shift = torch.zeros(rows, dtype=torch.long, device=first.device)
        for encoder, index in found:
            count = encoder.num_virtual_tokens
            index = index.to(first.device)
            valid[index, :count] = True
            shift[index] = count
            for (keys, values), (k, v) in zip(layers, self._prefixes(encoder)):
                keys[index, :, :count] = k.to(keys.dtype)
                values[index, :, :count] = v.to(values.dtype)
        return Plan(layers, valid, shift)

    def _prefixes(self, encoder: VirtualTokenEncoder) -> list[LayerKV]:
        # With gradients: recompute every forward (the graph must reach the parameters).
        # Without: reuse until a parameter changes (in-place updates bump `_version`).
        if torch.is_grad_enabled():
            self.cache.pop(id(encoder), None)
            return encoder.layer_kv(self)
        params = list(encoder.parameters())
        key = (
            tuple((id(p), p._version, p.device, p.dtype) for p in params),
            torch.is_autocast_enabled(params[0].device.type) if params else False,
        )
        cached = self.cache.get(id(encoder))
        if cached is None or cached[0] != key:
            cached = self.cache[id(encoder)] = (key, encoder.layer_kv(self))
        return cached[1]

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[int, LayerKV]]:
        """Record each layer's keys/values of a forward pass (no prefix added meanwhile)."""
        captured: dict[int, LayerKV] = {}
        self.capture = captured
        try:
            yield captured
        finally:
            self.capture = None


# -- the attention function ---------------------------------------------------------------


def virtual_token_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    """SDPA attention with the layer's prefix prepended to `key`/`value` (`[b, kv_heads, s, d]`).

    The mask gets P leading "attend" columns; a missing mask (plain causal) is built
    explicitly, aligned bottom-right as for a query block at the end of the keys.
    """
    state: VirtualTokens | None = getattr(module, "graftlm_virtual_tokens", None)
    layer = getattr(module, "layer_idx", None)
    if state is not None and state.capture is not None:
        state.capture[layer] = (key, value)
    plan: Plan | None = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    plan.used += 1
    prefix_key, prefix_value = plan.layers[layer]
    rows, _, queries, _ = query.shape
    length = prefix_key.shape[2]
    key = torch.cat([prefix_key.to(key.dtype).expand(rows, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).expand(rows, -1, -1, -1), value], dim=2)
    keys = key.shape[2] - length
    if attention_mask is None:
        offset = keys - queries
        attention_mask = (
            torch.arange(keys, device=query.device)[None, :]
            <= torch.arange(queries, device=query.device)[:, None] + offset
        )[None, None]
    if plan.valid is None:
        lead = torch.ones(length, dtype=torch.bool, device=query.device)
    else:  # per-row adapters: [rows, 1, 1, P]
        lead = plan.valid[:, None, None, :]
    batch = max(attention_mask.shape[0], lead.shape[0] if lead.dim() == 4 else 1)
    attention_mask = attention_mask.expand(batch, -1, -1, -1)
    lead = lead.expand(batch, attention_mask.shape[1], queries, length)
    if attention_mask.dtype != torch.bool:  # an additive float mask: 0 = attend
        zero = torch.zeros((), dtype=attention_mask.dtype, device=query.device)
        lead = torch.where(lead, zero, torch.finfo(attention_mask.dtype).min)
    kwargs.pop("is_causal", None)
    mask = torch.cat([lead, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def _materialized_sdpa_mask(*args, **kwargs):
    # SDPA's mask builder returns None for "plain causal" so that SDPA can use is_causal; with
    # prefix columns in front the mask is never plain causal, so always build it.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    AttentionInterface.register(ATTENTION, virtual_token_attention)
    AttentionMaskInterface.register(ATTENTION, _materialized_sdpa_mask)


# -- installing on a model ----------------------------------------------------------------


def geometry_of(model: nn.Module) -> Geometry:
    """Layers, key/value heads and head size of `model`'s attention (from its config)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError):
        raise GraftError(
            f"{type(model).__name__}: no num_hidden_layers/num_attention_heads/hidden_size in its "
            "config; prompt and prefix tuning need a transformers decoder model"
        ) from None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Geometry(layers, int(kv_heads), int(head_dim), hidden, heads)


def install(model: nn.Module, method: str) -> VirtualTokens:
    """Prepare `model` for virtual-token adapters (once): attention function, hooks, holder.

    Raises:
        GraftError: the model's layers are not where a transformers decoder keeps them, its
            decoder takes no position_ids, or it does not route attention through
            transformers' `AttentionInterface`.
    """
    state = state_of(model)
    if state is not None:
        return state
    name = type(model).__name__
    decoder = getattr(model, "base_model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or decoder is model or layers is None:
        raise GraftError(
            f"{method} tuning: {name} is not a transformers decoder with `model.layers` "
            "(supported: Llama, SmolLM2, Qwen2, Mistral, Gemma, Phi-3 and models laid out like "
            "them; not GPT-2); use lora, ia3 or bottleneck with this model"
        )
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise GraftError(
            f"{method} tuning: {type(decoder).__name__}.forward takes no position_ids, which "
            "graftlm needs to place the input after the virtual tokens"
        )
    if not getattr(type(model), "_supports_attention_backend", False):
        raise GraftError(
            f"{method} tuning: {name} does not route attention through transformers' "
            "AttentionInterface, which graftlm uses to add the prefix"
        )
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    if any(a is None or getattr(a, "layer_idx", None) != i for i, a in enumerate(attentions)):
        raise GraftError(f"{method} tuning: {name}'s layers have no `self_attn` with a layer_idx")
    geometry = geometry_of(model)
    if len(attentions) != geometry.num_layers:
        raise GraftError(
            f"{method} tuning: {name} has {len(attentions)} layers, its config says "
            f"{geometry.num_layers}"
        )
    _register()
    state = VirtualTokens(model, decoder, geometry)
    adapter_state(model).records[RECORD] = state
    for attention in attentions:
        attention.graftlm_virtual_tokens = state
    setattr(model, ENCODERS, VirtualTokenAdapters())
    decoder.register_forward_pre_hook(state.before_forward, with_kwargs=True)
    decoder.register_forward_hook(state.after_forward, with_kwargs=True, always_call=True)
    state.attention_before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    return state


def uninstall(model: nn.Module) -> None:
    """Undo `install`: hooks, attention implementation, adapters; the base model as before."""
    state = state_of(model)
    if state is None:
        return
    # by identity, not by handle: a deep copy of the model holds copies of the hooks
    for hooks in (state.decoder._forward_pre_hooks, state.decoder._forward_hooks):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is state]:
            del hooks[key]
            for flags in (
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
            ):
                getattr(state.decoder, flags, {}).pop(key, None)
    model.set_attn_implementation(state.attention_before or "sdpa")
    for module in model.modules():
        if getattr(module, "graftlm_virtual_tokens", None) is state:
            del module.graftlm_virtual_tokens
    delattr(model, ENCODERS)
    del adapter_state(model).records[RECORD]


def state_of(model: nn.Module) -> VirtualTokens | None:
    """The model's virtual-token state, or None when no prompt/prefix adapter was ever added."""
    return adapter_state(model).records.get(RECORD)
