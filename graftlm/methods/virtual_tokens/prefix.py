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

from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens import attention as vt
from graftlm.methods.virtual_tokens import files

NAME = "prefix"
PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
# Chosen by experiment on tickets and intent_slots (docs/prompt_prefix_tuning.md, "Defaults"):
# on tickets, 1 epoch gave 0.33-0.37 exact match, these 3 epochs 0.67 (prompt) and 0.73 (prefix).
DEFAULTS = {"num_virtual_tokens": 20, "prompt_init": "vocab", "lr": 3e-2, "epochs": 3.0}

INITS = ("random", "vocab")  # anything else is a text whose tokens' keys/values start the prefix


class PrefixEncoder(vt.VirtualTokenEncoder):
    """The trained prefix: `embedding.weight` `[P, layers*2*token_dim]`, or, with a projection,
    `embedding.weight` `[P, token_dim]` and the MLP `transform` (PEFT's parameter names)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: vt.Geometry,
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
        self.init, self.init_text = "random", None

    def flat(self) -> torch.Tensor:
        """All prefixes as PEFT stores them, `[P, layers*2*token_dim]` (the MLP applied)."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def layer_kv(self, state: vt.VirtualTokens) -> list[vt.LayerKV]:
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
    state = vt.install(model, NAME)
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)[None]
    with vt.disabled(model), state.capturing() as captured:
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
    if tokenizer is None:
        raise GraftError(
            f"prompt_init {init!r} is a text, which needs the model's tokenizer; "
            f"or use one of {INITS}"
        )
    ids = list(tokenizer(init)["input_ids"])
    if not ids:
        raise GraftError(f"prompt_init {init!r} has no tokens; use a longer text or one of {INITS}")
    return torch.tensor((ids * -(-count // len(ids)))[:count])


def add_prefix(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "vocab",
    tokenizer=None,
    *,
    projection: bool = False,
    encoder_hidden_size: int | None = None,
    name: str = "default",
    trainable: bool = True,
):
    """Give `model` a prefix tuning adapter `name` and make it the active one.

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
        trainable: freeze everything else and let only the prefix train.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: a model without rotary positions, a bad P or init.
    """
    from graftlm.methods.lora.inject import summarize

    vt.check_count(num_virtual_tokens)
    vt.install(model, NAME)
    geometry = vt.geometry_of(model)
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
    vt.add_encoder(model, NAME, name, encoder, activate=True)
    if trainable:
        vt.make_trainable(model, name)
    return summarize(model, name, [(f"{vt.ENCODERS}.{name}", "prefix", num_virtual_tokens)])


# -- the method contract (graftlm.adapters.contract) ---------------------------------------------


def attach(model: nn.Module, cfg):
    """Add trainable prefix "default" (cfg.num_virtual_tokens, prompt_init, prefix_projection)."""
    tokenizer = None
    if cfg.prompt_init not in INITS and not cfg.prefix_projection:
        from graftlm.models.load import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    return add_prefix(
        model,
        cfg.num_virtual_tokens,
        cfg.prompt_init,
        tokenizer,
        projection=cfg.prefix_projection,
    )


def peft_config(model: nn.Module, encoder: PrefixEncoder, base_model_name: str | None) -> dict:
    """adapter_config.json for `encoder`, in PEFT 0.21's PrefixTuningConfig form."""
    g = encoder.geometry
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": g.kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": g.kv_heads,  # PEFT: num_key_value_heads under GQA
        "num_layers": g.num_layers,
        "encoder_hidden_size": encoder.encoder_hidden_size,
        # the weights are folded either way; PEFT too records the flag it trained with
        "prefix_projection": encoder.projection,
        "init_weights": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write adapter "default" as a PEFT prefix tuning folder (an MLP folded into its output)."""
    encoder = vt.active_encoder(model, "default")
    if not isinstance(encoder, PrefixEncoder):
        raise GraftError("adapter 'default' is not a prefix tuning adapter")
    with torch.no_grad():
        flat = encoder.flat().float()
    return files.save_weights(folder, peft_config(model, encoder, base_model_name), flat)


def load(model: nn.Module, folder: Path, name: str = "default") -> None:
    """Load a prefix tuning folder (graftlm's or PEFT's) onto `model` as adapter `name`, active.

    Raises:
        GraftError: unreadable files, another method's folder, or layers / heads / sizes that do
            not fit this model (the message names the file, the field and both values).
    """
    folder = Path(folder)
    config = files.read_config(folder, PEFT_TYPE)
    vt.install(model, NAME)
    g = vt.geometry_of(model)
    where = folder / files.CONFIG_FILE
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
        raise GraftError(f"{where}: {detail}: the adapter was trained on another model")
    count = config["num_virtual_tokens"]
    weights = files.read_weights(folder, (count, g.num_layers * 2 * g.kv_dim))
    encoder = PrefixEncoder(count, g, encoder_hidden_size=config.get("encoder_hidden_size"))
    encoder.init = "random"
    vt.add_loaded_encoder(model, NAME, name, encoder, weights)


# removes adapter `name` (any prompt/prefix adapter); the last one out restores the base
unload = vt.remove_encoder


def merge(model: nn.Module) -> None:
    """Not defined for prefix tuning.

    Raises:
        GraftError: always.
    """
    raise files.merge_refused(NAME)


def describe(folder: Path) -> dict:
    """Prefix length and layout, for `graftlm inspect`."""
    config = files.read_config(folder, PEFT_TYPE)
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
