"""Full fine-tuning: every weight of the base trains, the baseline of `graftlm compare`.

::

    W  ──►  W - lr * AdamW(dL/dW)        for every parameter of the model (no adapter at all)

It goes through the same pipeline as the adapter methods (data, answer-only loss, loop,
checkpoints and resume, eval, generate, serve), behind the same contract
(`adapters.contract`), with these differences:

- The trained weights are the model itself: `attach` casts every floating-point parameter to
  float32 (master weights; with `--dtype auto` on a CPU with bf16 units the matrix products
  still run in bf16 under autocast) and makes them all trainable. Tied input/output embeddings
  stay one tensor.
- The output is a plain Hugging Face model folder (`config.json`, `model.safetensors`,
  `generation_config.json`, the tokenizer files) plus `graftlm.json`; there is no
  `adapter_config.json`, so `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads
  it as a model (an adapter config would make transformers look for a PEFT adapter).
- `load` copies the folder's weights over a bare base of the same architecture, so
  `graftlm generate --adapter D` works as for any method (and `--model D` loads it directly).
  From then on the weights are the base: a full fine-tune cannot be disabled, switched off or
  unloaded (those raise a `GraftError` saying so), and only one can be loaded into a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters.base_model import check_base
from graftlm.adapters.contract import InjectSummary, summarize
from graftlm.adapters.state import adapter_state
from graftlm.adapters.switch import set_adapter
from graftlm.errors import GraftError
from graftlm.models.load import load_tokenizer, model_id_of
from graftlm.models.weights import StreamedLoadUnsupported, load_weights_streamed

NAME = "full"
PEFT_TYPE = "FULL"  # graftlm's own: written to graftlm.json only (PEFT has no such adapter)
MERGEABLE = True  # the weights are the model already: merging is a no-op
ROW_ADAPTERS = False
# Adam moves every weight by about lr per step whatever its gradient's scale, so LoRA's 1e-3
# on every base weight (typical size ~0.02-0.05 in SmolLM2) would rewrite the model within a
# few dozen steps. 5e-5 is the top of the usual full fine-tuning range (1e-5..5e-5): a small
# model tolerates the top of it, and the adaptive run's validation stops it early
# (train/adaptive.py). max_epochs 3: full fine-tuning fits small data within a few passes.
DEFAULTS: dict[str, Any] = {"lr": 5e-5, "max_epochs": 3.0}

# the loop loads the base in this dtype (not the compute dtype): the master weights start from
# the checkpoint's own values, not their bf16 rounding
WEIGHTS_DTYPE = torch.float32


@dataclass(frozen=True)
class FullConfig:
    """What the AdapterState records of a full fine-tune.

    Attributes:
        base_model: the model id of the base it started from (`models.load.model_id_of`).
    """

    base_model: str | None = None


def _full_names(model: nn.Module) -> list[str]:
    return adapter_state(model).names("full")


# -- attach -----------------------------------------------------------------------------------


def attach(model: nn.Module, cfg: Any = None, name: str = "default") -> InjectSummary:
    """Make every parameter of `model` trainable, in float32, as "adapter" `name`.

    Returns:
        An `InjectSummary` (every parameter trainable).

    Raises:
        GraftError: the model already holds adapters (full fine-tuning trains the bare base).
    """
    state = adapter_state(model)
    if state.adapters:
        raise GraftError(
            f"full fine-tuning trains a bare base model; this one holds adapters {list(state.adapters)}"
        )
    state.check_new(name)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            # in place on the Parameter object: tied weights stay one tensor
            param.data = param.data.float()
    state.add(name, NAME, FullConfig(base_model=model_id_of(model) or None))
    set_adapter(model, name)
    return summarize(model, name, [("(every parameter)", "full", 0)])


# -- switching: a full fine-tune is the model's weights ----------------------------------------


def set_active(model: nn.Module, names: list[str]) -> None:
    """Every floating-point parameter trains while the full fine-tune is among `names`; it
    computes either way (the weights are the model's own)."""
    if any(n in _full_names(model) for n in names):
        for param in model.parameters():
            if param.is_floating_point():
                param.requires_grad_(True)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Refused when the model holds a full fine-tune: there is no base left to run.

    Raises:
        GraftError: the model holds a full fine-tune.
    """
    if _full_names(model):
        raise GraftError(
            "a full fine-tune replaced the base weights: the base cannot be switched on inside "
            "this model; load the base model separately"
        )
    yield


def unload(model: nn.Module, name: str) -> None:
    """Refused: the base weights are gone.

    Raises:
        GraftError: always.
    """
    raise GraftError(
        f"full fine-tune {name!r} replaced the base weights and cannot be unloaded; "
        "load the base model again instead"
    )


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """A no-op: a full fine-tune is already the model's weights."""


def unmerge(model: nn.Module) -> None:
    """Refused: there is nothing to take out again.

    Raises:
        GraftError: always.
    """
    raise GraftError("a full fine-tune is the model's weights: there is nothing to unmerge")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The model itself, its AdapterState record of the fine-tune dropped."""
    state = adapter_state(model)
    for name in _full_names(model):
        state.remove(name)
    return model


# -- save / load ------------------------------------------------------------------------------


def save(
    model: nn.Module, folder: Path, base_model_name: str | None, name: str = "default"
) -> dict[str, torch.Tensor]:
    """Write the model as a Hugging Face folder (config, safetensors, generation config and the
    base's tokenizer files), each file renamed into place from a temp folder beside it.

    Returns:
        The distinct parameters written (for the parameter count of graftlm.json).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".full."))
    try:
        config = model.config
        quantization = config.__dict__.pop("quantization_config", None)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if quantization is not None:
                config.quantization_config = quantization
        base = base_model_name or model_id_of(model)
        if base:
            load_tokenizer(base).save_pretrained(tmp)
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # named_parameters() yields a tied tensor once
    return dict(model.named_parameters())


def graft_facts(model: nn.Module, name: str) -> dict[str, Any]:
    """graftlm.json entries: the base it started from (what `load` puts it onto)."""
    config = adapter_state(model).adapters[name].config
    return {"base_model": config.base_model, "dtype": str(next(model.parameters()).dtype)[6:]}


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a full fine-tune's folder (a model folder that graftlm.json says
    full fine-tuning wrote)."""
    folder = Path(folder)
    graft = folder / "graftlm.json"
    if not (folder / "config.json").is_file() or not graft.is_file():
        return False
    try:
        return json.loads(graft.read_text(encoding="utf-8")).get("method") == NAME
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> FullConfig:
    """The `FullConfig` of a full fine-tune's folder (from its graftlm.json).

    Raises:
        GraftError: not a full fine-tune's model folder.
    """
    folder = Path(folder)
    if not is_model_folder(folder):
        raise GraftError(
            f"{folder}: not a full fine-tune's folder (config.json and a graftlm.json with "
            '"method": "full")'
        )
    graft = json.loads((folder / "graftlm.json").read_text(encoding="utf-8"))
    return FullConfig(base_model=graft.get("base_model"))


def load(model: nn.Module, folder: Path, name: str = "default", *, force: bool = False) -> None:
    """Copy a full fine-tune's weights over `model` (a bare base of the same architecture, in
    its own dtype) and record it as adapter `name`, the active one.

    Raises:
        GraftError: not a full fine-tune's folder; the model holds adapters already; another
            base (see `force`); tensor names or shapes that differ from the model's.
    """
    folder = Path(folder)
    config = read_config(folder)
    state = adapter_state(model)
    if state.adapters:
        raise GraftError(
            f"{folder}: a full fine-tune replaces every weight: load it into a bare base "
            f"model, before any adapter (this one holds {list(state.adapters)})"
        )
    state.check_new(name)
    check_base(model, folder, force)
    try:
        load_weights_streamed(model, folder)
    except StreamedLoadUnsupported as exc:
        raise GraftError(f"{folder}: the weights do not fit this base model ({exc})") from None
    state.add(name, NAME, config)
    set_adapter(model, name)
    model.eval()


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`."""
    config = read_config(Path(folder))
    return {"method_facts": {"kind": "full model folder", "base": config.base_model or "?"}}
