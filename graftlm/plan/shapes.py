"""A model's shapes from its `config.json` alone: parameters, linear layers, what a method trains.

The model is built by transformers on the `meta` device (shapes, no memory, no weights), so
every parameter and every linear layer's name is the one a real load would have, and target
matching runs through the same code as training (`methods/lora/inject.py: find_targets`,
`adapters/modules.py`). A config whose `model_type` transformers does not know is planned as a
Llama of its shape (hidden / intermediate / layers / heads fields), with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.modules import is_linear, linear_dims, output_head_names
from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.methods import method_module
from graftlm.methods.lora.config import LoraConfig, training_settings
from graftlm.methods.lora.inject import find_targets
from graftlm.plan import METHODS  # noqa: F401  (re-exported for callers of shapes)
from graftlm.train.config import TrainConfig

logger = logging.getLogger("graftlm")

BUILTIN = "smollm2-135m-instruct"
# fields every config needs (under its own names, e.g. GPT-2's n_embd, through attribute_map)
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
FILE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_FAMILY = ("lora", "qlora", "dora", "qdora")


def shipped_configs() -> dict[str, Path]:
    """Model names `--model` knows without a folder -> their shipped config.json."""
    folder = resources.files("graftlm.plan") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def read_config(model: str | None = None, config: str | None = None) -> tuple[dict, str]:
    """The config dict to plan for, and where it came from.

    Args:
        model: a shipped name (`llama-2-7b`, the built-in `smollm2-135m-instruct`, ...) or a
            Hugging Face folder holding config.json.
        config: a config.json file (or a shipped name) instead of `model`.

    Raises:
        GraftError: nothing by that name, or a file that is not a JSON object.
    """
    shipped = shipped_configs()
    name = config or model or BUILTIN
    key = name.strip().lower()
    # `--config llama-2-7b.json` where no such file is here: the shipped file of that name
    key = key.removesuffix(".json") if key.removesuffix(".json") in shipped else key
    if key in shipped and not Path(name).exists():
        path = shipped[key]
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise GraftError(
                f"{'--config' if config else '--model'} {name!r}: no config.json there and not a "
                f"shipped model; shipped: {', '.join(sorted(shipped))}"
            )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GraftError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(values, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values, str(path)


@dataclass(frozen=True)
class Linear:
    """One linear layer: its module name and `(out, in)` sizes."""

    name: str
    out_features: int
    in_features: int


@dataclass
class ModelShape:
    """What the plan needs of a model: every parameter count, the linear layers, the sizes."""

    model_type: str
    total_params: int  # distinct parameters (tied embeddings counted once), PEFT's "all params"
    linears: list[Linear]  # every linear layer but the output head, model order
    head: Linear | None  # the output projection (vocab x hidden); None if tied to embeddings
    tied: bool
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_tensor: int  # values of the biggest parameter (a load reads one at a time)
    file_dtype_bytes: int  # bytes per value in the checkpoint files (config's dtype; else fp32)
    model: nn.Module = dataclasses.field(repr=False)  # the meta-device model


def model_shape(values: dict, source: str = "config") -> ModelShape:
    """Build `values` (a config.json dict) on the meta device and read its shapes off.

    Raises:
        GraftError: required fields missing (all named at once), or a config transformers
            refuses.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig  # heavy

    model_type = values.get("model_type")
    try:
        config_class = type(AutoConfig.for_model(model_type)) if model_type else None
    except ValueError:
        config_class = None
    aliases = getattr(config_class, "attribute_map", {}) if config_class else {}
    needed = list(REQUIRED)
    signature = inspect.signature(config_class.__init__).parameters if config_class else {}
    if config_class is None or "intermediate_size" in signature:
        needed.append("intermediate_size")
    missing = [f for f in needed if f not in values and aliases.get(f) not in values]
    if missing:
        raise GraftError(f"{source}: missing field(s) {', '.join(missing)}; a plan needs them")
    fields = {k: v for k, v in values.items() if k not in ("architectures", "auto_map")}
    try:
        if config_class is None:
            warnings.warn(
                f"{source}: model_type {model_type!r} is not one transformers knows; planned "
                "as a Llama of the same shape (hidden, intermediate, layers, heads)",
                stacklevel=2,
            )
            logger.warning(
                "warning: %s: unknown model_type %r, planned as a Llama of its shape",
                source,
                model_type,
            )
            keep = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self", "kwargs"}
            hf_config = LlamaConfig(**{k: v for k, v in fields.items() if k in keep})
        else:
            hf_config = AutoConfig.for_model(**fields)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(hf_config)
    except (TypeError, ValueError, KeyError) as exc:
        raise GraftError(f"{source}: transformers cannot build this config ({exc})") from None
    stored = str(values.get("torch_dtype") or values.get("dtype") or "float32")
    return _shape_of(model, hf_config, FILE_DTYPE_BYTES.get(stored.removeprefix("torch."), 4))


def _shape_of(model: nn.Module, config: Any, file_dtype_bytes: int = 4) -> ModelShape:
    heads_named = output_head_names(model)
    head_module = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head_module is not None and head_module.weight is embed.weight
    linears, head = [], None
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        out_f, in_f = linear_dims(module)
        if name in heads_named:
            head = None if tied else Linear(name, out_f, in_f)
        else:
            linears.append(Linear(name, out_f, in_f))
    params = list(model.parameters())
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return ModelShape(
        model_type=str(config.model_type),
        total_params=sum(p.numel() for p in params),
        linears=linears,
        head=head,
        tied=tied,
        hidden=hidden,
        intermediate=int(intermediate or 4 * hidden),
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(embed.weight.shape[0]),
        largest_tensor=max(p.numel() for p in params),
        file_dtype_bytes=file_dtype_bytes,
        model=model,
    )


@dataclass(frozen=True)
class Trainable:
    """What a method trains: the tensors it adds (or unfreezes) and their count."""

    params: int  # values trained
    total_params: int  # PEFT's "all params": base + added
    tensors: dict[str, tuple[int, ...]]  # saved key -> shape (the adapter file's tensors)

    @property
    def percent(self) -> float:
        return 100.0 * self.params / self.total_params


def trainable(shape: ModelShape, cfg: TrainConfig) -> Trainable:
    """The parameters `cfg.method` trains on `shape`, exactly as graftlm's attach adds them.

    LoRA (and QLoRA, whose adapters are LoRA's) counts `r * (in + out)` per target that
    `find_targets` picks; DoRA adds a magnitude vector of `out` values per target; full
    fine-tuning trains every parameter; every other method is attached to the meta-device model
    itself, and its trainable parameters counted.
    """
    method = cfg.method
    if method == "full":
        tensors = {f"model.{n}": tuple(p.shape) for n, p in shape.model.named_parameters()}
        return Trainable(shape.total_params, shape.total_params, tensors)
    if method in LORA_FAMILY:
        # the LoraConfig `graftlm train` injects (methods/lora/method.py: attach)
        lora = LoraConfig(rank=cfg.rank or 8, **training_settings(cfg, shape.model))
        targets = find_targets(shape.model, lora)
        by_name = {lin.name: lin for lin in shape.linears}
        if shape.head is not None:
            by_name[shape.head.name] = shape.head
        tensors: dict[str, tuple[int, ...]] = {}
        for name in targets:
            if name not in by_name:  # an embedding named as a target: A [r, vocab], B [dim, r]
                weight = shape.model.get_submodule(name).weight
                out_f, in_f = weight.shape[1], weight.shape[0]
            else:
                out_f, in_f = by_name[name].out_features, by_name[name].in_features
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (lora.rank, in_f)
            tensors[f"{key}.lora_B.weight"] = (out_f, lora.rank)
            if method in ("dora", "qdora"):
                tensors[f"{key}.lora_magnitude_vector"] = (out_f,)
        count = sum(math.prod(s) for s in tensors.values())
        return Trainable(count, shape.total_params + count, tensors)
    if method in ("prompt", "prefix"):
        # one table, as PEFT saves it: virtual token embeddings [P, embedding dim], or every
        # layer's prefix keys and values [P, layers * 2 * kv_heads * head_dim]
        dim = shape.model.get_input_embeddings().weight.shape[1]
        if method == "prefix":
            dim = shape.layers * 2 * shape.kv_heads * shape.head_dim
        tensors = {"prompt_embeddings": (cfg.num_virtual_tokens or 20, dim)}
        count = math.prod(tensors["prompt_embeddings"])
        return Trainable(count, shape.total_params + count, tensors)
    return _attached(shape, cfg)


def _attached(shape: ModelShape, cfg: TrainConfig) -> Trainable:
    """Attach `cfg.method` to a fresh meta copy of the model and count what trains."""
    from transformers import AutoModelForCausalLM  # heavy

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(shape.model.config)
        # the fingerprint reads embedding values, which a meta model has not: give it one
        adapter_state(model).fingerprint = {"architecture": "planned", "weights_sha256": ""}
        method_module(cfg.method).attach(model, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for _, p in named)
    total = sum(p.numel() for p in model.parameters())
    tensors = {f"base_model.model.{n}": tuple(p.shape) for n, p in named}
    return Trainable(count, total, tensors)
