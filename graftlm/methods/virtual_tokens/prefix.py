"""Prefix tuning (Li & Liang, 2021): trained keys and values in front of every layer's attention.

    layer l:  attention(q, [K_l ; K], [V_l ; V])      K_l, V_l: trained [kv_heads, P, head_dim]

All prefixes are one tensor, as PEFT stores them: `[P, num_layers * 2 * kv_heads * head_dim]`,
per token the keys of layer 0, the values of layer 0, the keys of layer 1, ... With grouped-
query attention the prefix has the model's key/value heads (PEFT's `num_attention_heads` is then
`num_key_value_heads` and `token_dim` is `kv_heads * head_dim`). Prefix keys carry no rotary
position, as in PEFT's cache.

With `prefix_projection` the prefix is trained through PEFT's reparameterization
`Linear(token_dim, h) -> tanh -> Linear(h, layers * 2 * token_dim)` over a `[P, token_dim]`
embedding; at save time the MLP is evaluated once and only its output is written ("folded"),
which is also what PEFT writes.

The prefixes are added inside attention (`virtual_tokens`), not to the KV cache, so the
training loop's shared-prefix forward, left-padded batched generation and the serving engine
work unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graftlm.adapters.contract import InjectSummary
from graftlm.adapters.folder import CONFIG_FILE
from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens import encoders
from graftlm.methods.virtual_tokens.attention import (
    Geometry,
    LayerKV,
    VirtualTokenEncoder,
    VirtualTokens,
    install,
)
from graftlm.methods.virtual_tokens.encoders import disabled, merge, save, set_active, unload  # noqa: F401

NAME = "prefix"
PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
DEFAULTS = encoders.DEFAULTS
ROW_ADAPTERS = True  # the rest of the contract is shared with prompt tuning (encoders.py)


class PrefixEncoder(VirtualTokenEncoder):
    """The trained prefix: `embedding.weight` `[P, layers*2*token_dim]`, or, with a projection,
    `embedding.weight` `[P, token_dim]` and the MLP `transform` (PEFT's parameter names)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: Geometry,
        *,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.geometry = geometry
        self.projection = projection
        self.encoder_hidden_size = encoder_hidden_size or geometry.kv_dim
        width = geometry.num_layers * 2 * geometry.kv_dim
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(geometry.kv_dim, self.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden_size, width),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)

    def settings(self) -> dict:
        return {**super().settings(), "prefix_projection": self.projection}

    def saved_tensor(self) -> torch.Tensor:
        """The prefixes, the MLP folded in (what PEFT writes too)."""
        return self.flat()

    def peft_config(self, base_model_name: str | None) -> dict:
        """adapter_config.json, in PEFT 0.21's PrefixTuningConfig form (with grouped-query
        attention PEFT's num_attention_heads is num_key_value_heads)."""
        g = self.geometry
        fields = {
            "encoder_hidden_size": self.encoder_hidden_size,
            # the weights are folded either way; PEFT too records the flag it trained with
            "prefix_projection": self.projection,
            "init_weights": None,
        }
        shape = (g.kv_dim, g.kv_heads, g.num_layers)
        return encoders.peft_config(PEFT_TYPE, base_model_name, self, shape, fields)

    def flat(self) -> torch.Tensor:
        """All prefixes as PEFT stores them, `[P, layers*2*token_dim]` (the MLP applied)."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def layer_kv(self, state: VirtualTokens) -> list[LayerKV]:
        g = self.geometry
        # PEFT: view [P, layers*2, kv_heads, head_dim], permute to [layers*2, kv_heads, P, d]
        kv = self.flat().view(self.num_virtual_tokens, g.num_layers * 2, g.kv_heads, g.head_dim)
        kv = kv.permute(1, 2, 0, 3)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(g.num_layers)]


@torch.no_grad()
def activation_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys/values the base model computes for tokens `ids` `[P]`, as a flat prefix.

    Li & Liang start the prefix from real words' activations; here the tokens run as one
    sequence, all at position 0, so that their keys carry no rotation, like a prefix's.

    Returns:
        `[P, layers*2*kv_heads*head_dim]` (fp32).
    """
    state = install(model, NAME)
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)[None]
    with disabled(model), state.capturing() as captured:
        state.decoder(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)
    layers = []
    for i in range(state.geometry.num_layers):
        keys, values = captured[i]  # [1, kv_heads, P, head_dim]
        layers += [keys[0].permute(1, 0, 2), values[0].permute(1, 0, 2)]  # [P, kv_heads, d]
    return torch.stack(layers, dim=1).reshape(ids.shape[1], -1).float()


def init_ids(model: nn.Module, count: int, init: str, tokenizer=None) -> torch.Tensor:
    """Token ids whose activations start the prefix: random vocabulary ids or a text's ids.

    Raises:
        GraftError: a text init without a tokenizer, or a text with no tokens.
    """
    if init == "vocab":
        return torch.randint(0, model.get_input_embeddings().weight.shape[0], (count,))
    return torch.tensor(encoders.text_ids(init, count, tokenizer))


def add_prefix(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "vocab",
    tokenizer=None,
    *,
    projection: bool = False,
    encoder_hidden_size: int | None = None,
    name: str = "default",
) -> InjectSummary:
    """Give `model` a prefix tuning adapter `name`, the active and only trainable one.

    Args:
        model: a transformers decoder with rotary positions.
        num_virtual_tokens: P, the prefix length.
        init: "random" (PEFT's: standard normal), "vocab" (the base model's keys/values of
            random vocabulary tokens) or a text (of its tokens). Ignored with `projection`,
            which starts as PEFT does.
        tokenizer: the model's tokenizer (only for a text init).
        projection: train through PEFT's reparameterization MLP (folded away at save).
        encoder_hidden_size: the MLP's hidden width (default: token_dim, as in PEFT).
        name: the adapter's name.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: a model without rotary positions, a bad P or init, a name that is taken.
    """
    geometry = encoders.prepare(model, NAME, num_virtual_tokens)
    start = None
    if not projection and init != "random":
        start = activation_prefix(model, init_ids(model, num_virtual_tokens, init, tokenizer))
    encoder = PrefixEncoder(
        num_virtual_tokens, geometry, projection=projection, encoder_hidden_size=encoder_hidden_size
    )
    if start is not None:
        with torch.no_grad():
            encoder.embedding.weight.copy_(start)
        encoder.init = "vocab" if init == "vocab" else "text"
        encoder.init_text = None if init == "vocab" else init
    return encoders.add(model, NAME, name, encoder)


# -- the method contract (graftlm.adapters.contract) ---------------------------------------------


def attach(model: nn.Module, cfg) -> InjectSummary:
    """Add trainable prefix "default" (cfg.num_virtual_tokens, prompt_init, prefix_projection)."""
    return add_prefix(
        model,
        cfg.num_virtual_tokens,
        cfg.prompt_init,
        encoders.tokenizer_for(cfg, needed=not cfg.prefix_projection),
        projection=cfg.prefix_projection,
    )


def read_config(folder: Path) -> dict:
    """adapter_config.json of a prefix tuning folder (graftlm's or PEFT's), checked."""
    return encoders.read_config(folder, PEFT_TYPE)


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    """Load a prefix tuning folder (graftlm's or PEFT's) onto `model` as adapter `name`, active.

    Raises:
        GraftError: unreadable files, another method's folder, or layers / heads / sizes that do
            not fit this model (the message names the file, the field and both values).
    """
    folder = Path(folder)
    config, g = encoders.begin_load(model, folder, NAME, PEFT_TYPE, name, force)
    expected = {
        "num_layers": g.num_layers,
        "token_dim": g.kv_dim,
        "num_attention_heads": g.kv_heads,
    }
    wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        detail = ", ".join(
            f"{k} {found!r} (this model: {want})" for k, (found, want) in wrong.items()
        )
        raise GraftError(
            f"{folder / CONFIG_FILE}: {detail}: the adapter was trained on another model"
        )
    encoder = PrefixEncoder(
        config["num_virtual_tokens"], g, encoder_hidden_size=config.get("encoder_hidden_size")
    )
    encoders.finish_load(model, folder, NAME, name, encoder)


def describe(folder: Path) -> dict:
    """Prefix length and layout, for `graftlm inspect`."""
    config = read_config(folder)
    facts = {
        "num_virtual_tokens": config["num_virtual_tokens"],
        "prefix_projection": bool(config.get("prefix_projection")),
    }
    labels = {
        "virtual tokens": config["num_virtual_tokens"],
        "prefix layers": config.get("num_layers"),
        "key/value heads": config.get("num_attention_heads"),
        "projection": "trained with, folded" if config.get("prefix_projection") else "none",
    }
    return {**facts, "method_facts": labels}
