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

import math
from pathlib import Path

import torch
from torch import nn

from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens import attention as vt
from graftlm.methods.virtual_tokens import files

NAME = "prompt"
PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
# Chosen by experiment on tickets and intent_slots (docs/prompt_prefix_tuning.md, "Defaults"):
# on tickets, 1 epoch gave 0.33-0.37 exact match, these 3 epochs 0.67 (prompt) and 0.73 (prefix).
DEFAULTS = {"num_virtual_tokens": 20, "prompt_init": "vocab", "lr": 3e-2, "epochs": 3.0}

INITS = ("random", "vocab")  # anything else is a text whose tokens start the prompt
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptEmbedding(vt.VirtualTokenEncoder):
    """The trained virtual token embeddings, `embedding.weight` `[P, hidden]` (fp32).

    Attributes:
        init: "random", "vocab" or "text" (recorded in adapter_config.json).
        init_text: the text of a "text" init.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.init, self.init_text = "random", None

    def layer_kv(self, state: vt.VirtualTokens) -> list[vt.LayerKV]:
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
    if tokenizer is None:
        raise GraftError(
            f"prompt_init {init!r} is a text, which needs the model's tokenizer; "
            f"or use one of {INITS}"
        )
    ids = list(tokenizer(init)["input_ids"])
    if not ids:
        raise GraftError(f"prompt_init {init!r} has no tokens; use a longer text or one of {INITS}")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return table[torch.tensor(ids, device=table.device)].float().cpu(), "text", init


def add_prompt(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "vocab",
    tokenizer=None,
    *,
    name: str = "default",
    trainable: bool = True,
):
    """Give `model` a prompt tuning adapter `name` and make it the active one.

    Args:
        model: a transformers decoder with rotary positions.
        num_virtual_tokens: P, the number of virtual tokens.
        init: "random", "vocab", or a text whose token embeddings start the prompt.
        tokenizer: the model's tokenizer (only for a text init).
        name: the adapter's name.
        trainable: freeze everything else and let only the prompt train.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: a model without rotary positions, a bad P or init.
    """
    from graftlm.methods.lora.inject import summarize

    vt.check_count(num_virtual_tokens)
    vt.install(model, NAME)  # refuse unsupported models before anything else
    geometry = vt.geometry_of(model)
    encoder = PromptEmbedding(num_virtual_tokens, geometry.hidden_size)
    vectors, encoder.init, encoder.init_text = init_embeddings(
        model, num_virtual_tokens, init, tokenizer
    )
    with torch.no_grad():
        encoder.embedding.weight.copy_(vectors)
    vt.add_encoder(model, NAME, name, encoder, activate=True)
    if trainable:
        vt.make_trainable(model, name)
    return summarize(model, name, [(f"{vt.ENCODERS}.{name}", "prompt", num_virtual_tokens)])


# -- the method contract (graftlm.adapters.contract) ---------------------------------------------


def attach(model: nn.Module, cfg):
    """Add trainable prompt "default" (cfg.num_virtual_tokens, cfg.prompt_init); freeze the rest."""
    tokenizer = None
    if cfg.prompt_init not in INITS:
        from graftlm.models.load import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    return add_prompt(model, cfg.num_virtual_tokens, cfg.prompt_init, tokenizer)


def peft_config(model: nn.Module, encoder: PromptEmbedding, base_model_name: str | None) -> dict:
    """adapter_config.json for `encoder`, in PEFT 0.21's PromptTuningConfig form."""
    geometry = vt.geometry_of(model)
    text = encoder.init == "text"
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": geometry.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": geometry.num_heads,
        "num_layers": geometry.num_layers,
        "prompt_tuning_init": _PEFT_INIT[encoder.init],
        "prompt_tuning_init_text": encoder.init_text,
        # PEFT requires a tokenizer name next to a TEXT init (it is read only when training)
        "tokenizer_name_or_path": (base_model_name or "unknown") if text else None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write adapter "default" as a PEFT prompt tuning folder; returns the tensors written."""
    encoder = vt.active_encoder(model, "default")
    if not isinstance(encoder, PromptEmbedding):
        raise GraftError("adapter 'default' is not a prompt tuning adapter")
    config = peft_config(model, encoder, base_model_name)
    return files.save_weights(folder, config, encoder.embedding.weight)


def load(model: nn.Module, folder: Path, name: str = "default") -> None:
    """Load a prompt tuning folder (graftlm's or PEFT's) onto `model` as adapter `name`, active.

    Raises:
        GraftError: unreadable files, another method's folder, or a token_dim / tensor shape
            that does not fit this model (the message names the file and both shapes).
    """
    folder = Path(folder)
    config = files.read_config(folder, PEFT_TYPE)
    vt.install(model, NAME)
    geometry = vt.geometry_of(model)
    if config["token_dim"] != geometry.hidden_size:
        raise GraftError(
            f"{folder / files.CONFIG_FILE}: token_dim {config['token_dim']} does not match this "
            f"model's hidden size {geometry.hidden_size}: the adapter was trained on another model"
        )
    count = config["num_virtual_tokens"]
    weights = files.read_weights(folder, (count, geometry.hidden_size))
    encoder = PromptEmbedding(count, geometry.hidden_size)
    init = str(config.get("prompt_tuning_init") or "RANDOM").upper()
    encoder.init = {v: k for k, v in _PEFT_INIT.items()}.get(init, "random")
    encoder.init_text = config.get("prompt_tuning_init_text") if encoder.init == "text" else None
    vt.add_loaded_encoder(model, NAME, name, encoder, weights)


# removes adapter `name` (any prompt/prefix adapter); the last one out restores the base
unload = vt.remove_encoder


def merge(model: nn.Module) -> None:
    """Not defined for prompt tuning.

    Raises:
        GraftError: always.
    """
    raise files.merge_refused(NAME)


def describe(folder: Path) -> dict:
    """Virtual tokens and init, for `graftlm inspect`."""
    config = files.read_config(folder, PEFT_TYPE)
    facts = {
        "num_virtual_tokens": config["num_virtual_tokens"],
        "prompt_tuning_init": config.get("prompt_tuning_init"),
    }
    labels = {"virtual tokens": config["num_virtual_tokens"], "init": facts["prompt_tuning_init"]}
    if config.get("prompt_tuning_init_text"):
        labels["init text"] = config["prompt_tuning_init_text"]
    return {**facts, "method_facts": labels}
