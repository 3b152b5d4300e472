"""Prompt tuning (Lester et al., 2021): P trained embeddings in front of every input.

    [v_1 .. v_P] [x_1 .. x_n]      v: trained [P, hidden] vectors, the base model frozen

The virtual tokens attend only to each other, so their keys/values in every layer depend on
the P vectors alone: each forward computes them once (the decoder over `v` at positions
-P..-1) and attention prepends them to the real tokens' keys/values (`virtual_tokens`). The
result equals PEFT's prompt tuning (virtual tokens at 0..P-1, the input after them) under
rotary positions, while inputs, labels, positions and the KV cache stay the user's own.

Files are PEFT's: `adapter_model.safetensors` with `prompt_embeddings` `[P, hidden]` and an
`adapter_config.json` of peft_type PROMPT_TUNING.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graftlm.adapters.contract import InjectSummary
from graftlm.adapters.folder import CONFIG_FILE
from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens import attention, encoders
from graftlm.methods.virtual_tokens.encoders import disabled, merge, save, set_active, unload  # noqa: F401

NAME = "prompt"
PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
DEFAULTS = encoders.DEFAULTS
ROW_ADAPTERS = True  # the rest of the contract is shared with prefix tuning (encoders.py)
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptEmbedding(attention.VirtualTokenEncoder):
    """The trained virtual token embeddings, `embedding.weight` `[P, hidden]` (fp32)."""

    def __init__(self, num_virtual_tokens: int, geometry: attention.Geometry) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.geometry = geometry
        self.embedding = nn.Embedding(num_virtual_tokens, geometry.hidden_size)

    def saved_tensor(self) -> torch.Tensor:
        return self.embedding.weight

    def peft_config(self, base_model_name: str | None) -> dict:
        """adapter_config.json, in PEFT 0.21's PromptTuningConfig form."""
        g = self.geometry
        text = self.init == "text"
        fields = {
            "prompt_tuning_init": _PEFT_INIT[self.init],
            "prompt_tuning_init_text": self.init_text,
            # PEFT requires a tokenizer name next to a TEXT init (it is read only when training)
            "tokenizer_name_or_path": (base_model_name or "unknown") if text else None,
            "tokenizer_kwargs": None,
        }
        shape = (g.hidden_size, g.num_heads, g.num_layers)
        return encoders.peft_config(PEFT_TYPE, base_model_name, self, shape, fields)

    def layer_kv(self, state: attention.VirtualTokens) -> list[attention.LayerKV]:
        """Keys/values of the virtual tokens in every layer: one decoder pass at 0..P-1."""
        table = state.decoder.get_input_embeddings().weight
        embeds = self.embedding.weight.to(table.dtype)[None]  # [1, P, hidden]
        positions = torch.arange(self.num_virtual_tokens, device=embeds.device)[None]
        with state.capturing() as captured:
            state.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False)
        return [captured[layer] for layer in range(state.geometry.num_layers)]


def init_embeddings(
    model: nn.Module, count: int, init: str, tokenizer=None, *, generator=None
) -> tuple[torch.Tensor, str, str | None]:
    """Starting vectors `[count, hidden]` for `init` ("random", "vocab" or a text).

    "random" draws normal vectors with the vocabulary embeddings' standard deviation (PEFT's
    RANDOM uses std 1, far off the embedding scale of most models); "vocab" copies the
    embeddings of random vocabulary tokens; a text copies its tokens' embeddings, cut or
    repeated to `count` as PEFT does.

    Returns:
        (vectors, kind, text): kind is "random", "vocab" or "text".

    Raises:
        GraftError: a text init without a tokenizer, or a text with no tokens.
    """
    table = model.get_input_embeddings().weight.detach()
    if init == "random":
        std = table.float().std().item()
        vectors = torch.randn(count, table.shape[1], generator=generator) * std
        return vectors, "random", None
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (count,), generator=generator)
        return table[ids.to(table.device)].float().cpu(), "vocab", None
    ids = encoders.text_ids(init, count, tokenizer)
    return table[torch.tensor(ids, device=table.device)].float().cpu(), "text", init


def add_prompt(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "vocab",
    tokenizer=None,
    *,
    name: str = "default",
) -> InjectSummary:
    """Give `model` a prompt tuning adapter `name`, the active and only trainable one.

    Args:
        model: a transformers decoder with rotary positions.
        num_virtual_tokens: P, the number of virtual tokens.
        init: "random", "vocab", or a text whose token embeddings start the prompt.
        tokenizer: the model's tokenizer (only for a text init).
        name: the adapter's name.

    Returns:
        An `InjectSummary` (P trainable vectors of the hidden size).

    Raises:
        GraftError: a bad P or init (a text without a tokenizer), a model without rotary
            positions, a name that is taken.
    """
    geometry = encoders.prepare(model, NAME, num_virtual_tokens)
    encoder = PromptEmbedding(num_virtual_tokens, geometry)
    vectors, encoder.init, encoder.init_text = init_embeddings(
        model, num_virtual_tokens, init, tokenizer
    )
    with torch.no_grad():
        encoder.embedding.weight.copy_(vectors)
    return encoders.add(model, NAME, name, encoder)


# -- the method contract (graftlm.adapters.contract) ---------------------------------------------


def attach(model: nn.Module, cfg) -> InjectSummary:
    """Add trainable prompt "default" (cfg.num_virtual_tokens, cfg.prompt_init); freeze the rest."""
    tokenizer = encoders.tokenizer_for(cfg, needed=True)
    return add_prompt(model, cfg.num_virtual_tokens, cfg.prompt_init, tokenizer)


def read_config(folder: Path) -> dict:
    """adapter_config.json of a prompt tuning folder (graftlm's or PEFT's), checked."""
    return encoders.read_config(folder, PEFT_TYPE)


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    """Load a prompt tuning folder (graftlm's or PEFT's) onto `model` as adapter `name`, active.

    Raises:
        GraftError: unreadable files, another method's folder, or a token_dim / tensor shape
            that does not fit this model (the message names the file and both shapes).
    """
    folder = Path(folder)
    config, geometry = encoders.begin_load(model, folder, NAME, PEFT_TYPE, name, force)
    if config["token_dim"] != geometry.hidden_size:
        raise GraftError(
            f"{folder / CONFIG_FILE}: token_dim {config['token_dim']} does not match "
            f"this model's hidden size {geometry.hidden_size}: the adapter was trained on "
            "another model"
        )
    encoder = PromptEmbedding(config["num_virtual_tokens"], geometry)
    init = str(config.get("prompt_tuning_init") or "RANDOM").upper()
    encoder.init = {v: k for k, v in _PEFT_INIT.items()}.get(init, "random")
    encoder.init_text = config.get("prompt_tuning_init_text") if encoder.init == "text" else None
    encoders.finish_load(model, folder, NAME, name, encoder)


def describe(folder: Path) -> dict:
    """Virtual tokens and init, for `graftlm inspect`."""
    config = read_config(folder)
    facts = {
        "num_virtual_tokens": config["num_virtual_tokens"],
        "prompt_tuning_init": config.get("prompt_tuning_init"),
    }
    labels = {"virtual tokens": config["num_virtual_tokens"], "init": facts["prompt_tuning_init"]}
    if config.get("prompt_tuning_init_text"):
        labels["init text"] = config["prompt_tuning_init_text"]
    return {**facts, "method_facts": labels}
