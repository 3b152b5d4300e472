"""What every fine-tuning method plugs into the pipeline.

A method is a module in `graftlm.methods` (lora, qlora, adalora, ia3, bottleneck, prompt,
prefix) that exposes the names of `MethodModule` below. Everything else (training, the folder
I/O of `adapters.io`, switching in `adapters.switch`, generation, serving, merging and
`graftlm inspect`) talks to a method through them only, never by testing its name, so a new
method is one new subpackage plus one line in `graftlm.methods.REGISTRY`.

Every adapter a method adds or loads is recorded in the model's `AdapterState`
(`adapters.state`) under the method's folder name (`graftlm.methods.PEFT_TYPES` value: "lora"
for LoRA and QLoRA), with its config; the dispatch reads the method from there.

The contract, in order of a training run and then of inference:

1. `attach(model, cfg)` adds the method's trainable parameters to a freshly loaded base model as
   adapter "default", freezes every base parameter, and returns an `InjectSummary`. Afterwards the
   model's ordinary forward (`model(input_ids, attention_mask, past_key_values=..., ...)` and the
   inner decoder `model.model(...)`) computes the adapted function: the training loop, evaluation,
   `transformers`' `generate` and the serving engine call nothing method-specific.
2. `TrainingHooks(model, cfg, total_steps)` (optional, absent when the method needs none): the
   loop adds `hooks.extra_loss()` (a scalar tensor, or None) to each micro-batch's loss before
   `backward()`, and calls `hooks.after_step(step)` after `optimizer.step()` and before
   `optimizer.zero_grad()` (AdaLoRA reads the gradients there to re-allocate its rank budget).
3. `save(model, folder, base_model_name, name)` writes `adapter_config.json` and the weights
   file (through `adapters.folder`, atomically) in PEFT's format where PEFT has the method, and
   returns the tensors written. `adapters.io` writes `graftlm.json` itself, adding the method's
   `graft_facts(model, name)` (optional; LoRA: quantize, init, targets).
4. `read_config(folder)` parses the folder's `adapter_config.json` into the method's config;
   `load(model, folder, name, force=...)` puts a saved adapter (ours or PEFT's) onto a base
   model as adapter `name` and makes it the active one, checking the base fingerprint
   (`adapters.base_model.check_base`; `force` accepts other weights of the same architecture)
   and names and shapes with errors that name the file, key and shapes. `quantization(folder)`
   (optional) names the base's quantization the adapter needs ("nf4" for QLoRA), so loaders
   quantize the base before loading.
5. `set_active(model, names)`: `names` is the model's whole new list of active adapters; the
   method makes those of its own adapters active (raising if it cannot apply that many at once)
   and their parameters trainable, and the others of its own inactive. `disabled(model)` is a
   context manager inside which the method's adapters change nothing (merged ones unmerged and
   merged again after). `adapters.switch` freezes the model and calls these for every method
   the model holds.
6. `unload(model, name)` removes one adapter again (the base computes as before once the last
   one is gone) and forgets it in the AdapterState.
7. `MERGEABLE`, `merge(model, names)`, `unmerge(model)` and `merge_and_unload(model)`: fold
   adapters into the base weights, all or nothing, in fp32; take them out again; return the
   plain model (the method's modules replaced by the base's own, so `save_pretrained` writes
   the original architecture's keys). A method that cannot merge (`MERGEABLE = False`) has
   only `merge`, which raises a `GraftError` that says why.
8. `ROW_ADAPTERS`: several adapters of the method can serve one batch, a different one per
   row (`graftlm serve`, `graftlm generate --input` with per-row "adapter"). Every module the
   method adds that changes the computation then sets `graftlm_row_aware = True` and honours
   the attribute `row_groups`: None (the default) means every row uses the module's active
   adapter(s); otherwise it is a list of `(adapter_name | None, LongTensor of batch-row
   indices)` and the rows of a group named N are computed with adapter N only, the rows of a
   None group with no adapter at all (the base). `adapters.switch.row_adapters` and the serving
   engine set it on every module marked `graftlm_row_aware` around a forward pass.
   `check_servable(model, folder)` (optional) refuses an adapter that would change what other
   rows compute (LoRA: trained biases, modules_to_save).
9. `describe(folder)` (optional): a dict merged into `graftlm inspect`'s facts (JSON output);
   its "method_facts" entry ({label: value}) is also printed, one line each.

`DEFAULTS` are the method's recipe: values for TrainConfig fields the user did not set (`lr`,
`epochs`, `rank`, `targets`, ...), chosen by experiment on the example tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from graftlm.errors import GraftError

if TYPE_CHECKING:
    from graftlm.train.config import TrainConfig


@dataclass
class InjectSummary:
    """What `attach` (or `inject`) did: trainable/total parameters and the adapted modules."""

    adapter: str
    trainable: int
    total: int
    modules: list[tuple[str, str, int]]  # (module name, layer type, rank)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [
            f"adapter {self.adapter!r}: {len(self.modules)} modules, "
            f"trainable {self.trainable:,} / {self.total:,} parameters ({self.percent:.3f}%)"
        ]
        by_suffix: dict[tuple[str, str, int], int] = {}
        for name, kind, rank in self.modules:
            key = (name.rsplit(".", 1)[-1], kind, rank)
            by_suffix[key] = by_suffix.get(key, 0) + 1
        for (suffix, kind, rank), count in sorted(by_suffix.items()):
            lines.append(f"  {suffix:<16} {kind:<10} rank {rank:<4} x{count}")
        return "\n".join(lines)


def summarize(model: nn.Module, adapter: str, modules: list[tuple[str, str, int]]) -> InjectSummary:
    """Count trainable and total parameters (shared Parameters counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        # a 4-bit weight packs two values per byte: count logical parameters
        count *= getattr(param, "graftlm_values_per_element", 1)
        total += count
        if param.requires_grad:
            trainable += count
    for buffer in model.buffers():
        total += buffer.numel() * getattr(buffer, "graftlm_values_per_element", 0)
    return InjectSummary(adapter=adapter, trainable=trainable, total=total, modules=modules)


def merge_refused(why: str) -> Callable[..., None]:
    """The `merge` of a method that cannot merge: it raises a GraftError saying `why`."""

    def merge(model: nn.Module, names: list[str] | None = None) -> None:
        raise GraftError(why)

    merge.__doc__ = f"Always refuses: {why}\n\nRaises:\n    GraftError: always."
    return merge


class TrainingHooks(Protocol):
    """Per-step callbacks a method may need during training."""

    def extra_loss(self) -> torch.Tensor | None:
        """A regularizer added to each micro-batch's (already normalised) loss, or None."""

    def after_step(self, step: int) -> None:
        """Called with the 0-based step index after optimizer.step(), before zero_grad()."""


class MethodModule(Protocol):
    """The names a method module exposes (see the module docstring for the contract)."""

    NAME: str  # `--method` value
    PEFT_TYPE: str  # adapter_config.json "peft_type" (ours for methods PEFT lacks)
    MERGEABLE: bool
    ROW_ADAPTERS: bool
    DEFAULTS: dict[str, Any]

    def attach(self, model: nn.Module, cfg: TrainConfig) -> InjectSummary: ...

    def save(
        self, model: nn.Module, folder: Path, base_model_name: str | None, name: str = "default"
    ) -> dict[str, torch.Tensor]: ...

    def read_config(self, folder: Path) -> Any: ...

    def load(
        self, model: nn.Module, folder: Path, name: str = "default", *, force: bool = False
    ) -> None: ...

    def set_active(self, model: nn.Module, names: list[str]) -> None: ...

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]: ...

    def unload(self, model: nn.Module, name: str) -> None: ...

    def merge(self, model: nn.Module, names: list[str]) -> None: ...

    # MERGEABLE methods only
    def unmerge(self, model: nn.Module) -> None: ...

    def merge_and_unload(self, model: nn.Module) -> nn.Module: ...
