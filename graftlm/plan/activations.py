"""Activation memory per token, measured on a scaled-down copy of the model under graftlm's forward.

What autograd keeps for the backward depends on every detail of the forward: the fused RMSNorm /
rotary / SwiGLU kernels, the fp32 casts of LoRA's inputs, the NF4 layers' dequantization, the
attention implementation. Rather than a formula that drifts from the code, the plan builds the
model with every width divided by `s` (hidden, intermediate and head size; head counts kept),
one and two decoder layers, attaches the method, and runs one training forward of
`train/forward.py: loss_sum` under `saved_tensors_hooks`, counting the distinct storages saved
that are not parameters. Nearly every saved activation is `tokens x width`, so the real model
keeps `s` times the proxy's bytes per token (LoRA's rank-sized tensors are counted apart, at
their real size); the difference between two and one layers is one layer's share.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.kernels.fused_ops import fused_forwards
from graftlm.methods import REGISTRY, method_module
from graftlm.plan.shapes import ModelShape
from graftlm.train.config import TrainConfig
from graftlm.train.forward import autocast, loss_sum

PROXY_ROWS, PROXY_TOKENS = 2, 43  # a prime length no width of a scaled-down model equals
PROXY_VOCAB = 256
SCALES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes per token that a training forward keeps for its backward."""

    per_layer: int  # one decoder layer's saved activations
    outside_layers: int  # embeddings, final norm, the fused loss's saved gradient
    layer_input: int  # one layer's input (all a checkpointed layer keeps)


def proxy_scale(shape: ModelShape) -> int:
    """The largest width divisor that keeps every width whole and head sizes even (rotary)."""
    for s in SCALES:
        if (
            shape.hidden % s == 0
            and shape.intermediate % s == 0
            and shape.head_dim % (2 * s) == 0
            and shape.hidden // s >= shape.heads
        ):
            return s
    return 1


def activation_profile(
    shape: ModelShape, cfg: TrainConfig, method: str, compute_dtype: torch.dtype
) -> ActivationProfile:
    """Measure the bytes per token that `method` keeps under graftlm's training forward.

    Args:
        shape: the model (its transformers config is scaled down).
        cfg: the run's settings (rank, targets, ...), `method` attached as training does.
        method: a registered method name, or "full" (every parameter trains) / "dora" (planned
            as LoRA: the magnitude vector adds one `out`-sized product per layer, which is small).
        compute_dtype: torch.float32 or torch.bfloat16 (autocast and base weights, as in training).
    """
    s = proxy_scale(shape)
    saved = {n: _saved_bytes(shape, cfg, method, compute_dtype, s, n) for n in (1, 2)}
    per_layer = saved[2][0] - saved[1][0]
    rank_bytes = saved[2][1] - saved[1][1]  # rank-sized tensors: not scaled
    outside = max(0, saved[1][0] - per_layer)
    tokens = PROXY_ROWS * PROXY_TOKENS
    act = torch.tensor([], dtype=compute_dtype).element_size()
    return ActivationProfile(
        per_layer=math.ceil((per_layer * s + rank_bytes) / tokens),
        outside_layers=math.ceil(outside * s / tokens),
        layer_input=shape.hidden * act,
    )


def _saved_bytes(
    shape: ModelShape, cfg: TrainConfig, method: str, dtype: torch.dtype, s: int, layers: int
) -> tuple[int, int]:
    """(bytes of width-sized saved tensors, bytes of rank-sized ones) of one proxy forward."""
    model = attached_model(shape, cfg, method, dtype, s, layers)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    rank = cfg.rank or 8
    seen: dict[int, tuple[int, bool]] = {}
    # a saved tensor with a token dimension (the loss keeps the T - 1 positions that predict one)
    rows, tokens = PROXY_ROWS, PROXY_TOKENS
    token_dims = {tokens, tokens - 1, rows * tokens, rows * (tokens - 1)}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and token_dims & set(tensor.shape):
            seen[ptr] = (storage.nbytes(), tensor.dim() > 0 and tensor.shape[-1] == rank)
        return tensor

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, PROXY_VOCAB, (PROXY_ROWS, PROXY_TOKENS), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with (
        fused_forwards(model),
        autocast(dtype),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss, _ = loss_sum(model, batch, dtype, share_prefix=False)
    del loss
    width = sum(n for n, is_rank in seen.values() if not is_rank)
    ranked = sum(n for n, is_rank in seen.values() if is_rank)
    return width, ranked


def attached_model(
    shape: ModelShape,
    cfg: TrainConfig,
    method: str,
    dtype: torch.dtype,
    s: int,
    layers: int,
    vocab: int = PROXY_VOCAB,
    quick_init: bool = False,
) -> nn.Module:
    """`scaled_model` with `method` attached as training attaches it, in training mode."""
    attached = {"dora": "lora", "qdora": "qlora"}.get(method, method)
    module = method_module(attached) if attached in REGISTRY else None
    # the dtype the loop loads the base in (full fine-tuning: float32 master weights)
    weights_dtype = getattr(module, "WEIGHTS_DTYPE", None) or dtype
    model = scaled_model(shape, s, layers, weights_dtype, vocab, quick_init)
    if cfg.layers is not None:
        # the proxy's one or two blocks stand for all of them (its per-block bytes are the
        # difference between the two): plan every block as adapted, an upper bound
        cfg = replace(cfg, layers=None)
    if module is None:  # full fine-tuning before graftlm had it: every weight trains
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        try:
            _attach_proxy(model, module, cfg)
        except GraftError:
            if not cfg.targets or cfg.targets == "all-linear":
                raise
            # a regex may name blocks the proxy's one or two lack ("layers\.(1[5-9])\..*"):
            # plan as if every linear layer of every block were adapted, an upper bound; the
            # real model's attach still refuses targets that match none of its layers
            model = scaled_model(shape, s, layers, weights_dtype, vocab, quick_init)
            _attach_proxy(model, module, replace(cfg, targets="all-linear"))
    return model.train()


def _attach_proxy(model: nn.Module, module, cfg: TrainConfig) -> None:
    adapter_state(model).fingerprint = {"architecture": "proxy", "weights_sha256": ""}
    module.attach(model, cfg)


def scaled_model(
    shape: ModelShape,
    s: int,
    layers: int,
    dtype: torch.dtype,
    vocab: int = PROXY_VOCAB,
    quick_init: bool = False,
) -> nn.Module:
    """The model with widths / s, `layers` decoder layers, a small vocabulary, random weights
    (`quick_init`: a block of uniform values in +-0.02 tiled over each weight, norms of one,
    built in `dtype`: a 7B layer in a fraction of a second, not the seconds of transformers'
    initialisation in fp32; for timing, where values do not matter)."""
    from transformers import AutoModelForCausalLM  # heavy
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(shape.model.config)
    config.hidden_size = shape.hidden // s
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = shape.intermediate // s
    elif hasattr(config, "n_inner"):
        config.n_inner = shape.intermediate // s
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = shape.head_dim // s
    config.num_hidden_layers = layers
    config.vocab_size = vocab
    for name in ("layer_types", "max_window_layers"):
        if getattr(config, name, None) is not None and name == "layer_types":
            config.layer_types = config.layer_types[:layers]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        if not quick_init:
            return AutoModelForCausalLM.from_config(config).to(dtype)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # one random block tiled over every weight: drawing 400M values takes ~6 s, copying them 0.2
        block = (torch.rand(1 << 20) * 0.04 - 0.02).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                    continue
                flat = p.view(-1)
                for start in range(0, flat.numel(), block.numel()):
                    part = flat[start : start + block.numel()]
                    part.copy_(block[: part.numel()])
    return model
