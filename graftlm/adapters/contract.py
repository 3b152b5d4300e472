"""What every fine-tuning method plugs into the pipeline.

A method is a module in `graftlm.methods` (lora, adalora, ia3, prompt, prefix, bottleneck) that
exposes the names of `MethodModule` below. The pipeline (`graftlm.train.loop`, `graftlm.methods.lora.files`,
`graftlm.infer.generate`, `graftlm.adapters.inspect`, `graftlm.infer.evaluate`) only talks to a method through
them, so a new method is one new file plus one line in `graftlm.methods.REGISTRY`.

Contract, in order of a training run:

1. `attach(model, cfg)` adds the method's trainable parameters to a freshly loaded base model as
   adapter "default", freezes every base parameter, and returns an `InjectSummary`. Afterwards the
   model's ordinary forward (`model(input_ids, attention_mask, past_key_values=..., ...)` and the
   inner decoder `model.model(...)`) computes the adapted function: the training loop, evaluation,
   `transformers`' `generate` and the serving engine call nothing method-specific.
2. `TrainingHooks(model, cfg, total_steps)` (optional, None when the method needs none): the loop
   adds `hooks.extra_loss()` (a scalar tensor, or None) to each micro-batch's loss before
   `backward()`, and calls `hooks.after_step(step)` after `optimizer.step()` and before
   `optimizer.zero_grad()` (AdaLoRA reads the gradients there to re-allocate its rank budget).
3. `save(model, folder, base_model_name)` writes `adapter_config.json` and the weights file
   atomically (use `graftlm.methods.lora.files.atomic_write_json` / `atomic_save_safetensors`) in PEFT's
   format where PEFT has the method, and returns the tensors written. The pipeline writes
   `graftlm.json` (base fingerprint, method, training summary) itself.
4. `load(model, folder, name)` puts a saved adapter (ours or PEFT's) onto a base model, checking
   names and shapes with errors that name the file, key and shapes.
5. `MERGEABLE` and `merge(model)`: fold the adapter into the base weights (methods that can).
   Wrapper modules may stay: `graftlm merge` copies the merged weights into a plain base model,
   matching keys with any `base_layer.` step removed (`graftlm.export.merged_folder._plain_copy`).
6. `describe(folder)` (optional): a dict merged into `graftlm inspect`'s facts (JSON output);
   its "method_facts" entry ({label: value}) is also printed, one line each.

7. Serving several adapters on one base, a different one per batch row (`graftlm serve`,
   `graftlm generate --input` with per-row "adapter"): `load(model, folder, name)` may be called
   for several names, `unload(model, name)` removes one again (the base model is as before
   once the last one is gone), and every module the method adds that changes the computation
   sets `graftlm_row_aware = True` and honours the attribute `row_groups`: None (the default)
   means every row uses the module's active adapter; otherwise it is a list of
   `(adapter_name | None, LongTensor of batch-row indices)` and the rows of a group named N are
   computed with adapter N only, the rows of a None group with no adapter at all (the base).
   `graftlm.methods.lora.inject.row_adapters` and the serving engine set it on every module marked
   `graftlm_row_aware` around a forward pass.

`DEFAULTS` are the method's recipe: values for TrainConfig fields the user did not set (`lr`,
`epochs`, `rank`, `targets`, ...), chosen by experiment on the example tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from graftlm.methods.lora.inject import InjectSummary
    from graftlm.train.config import TrainConfig


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
    DEFAULTS: dict[str, Any]

    def attach(self, model: nn.Module, cfg: TrainConfig) -> InjectSummary: ...

    def save(
        self, model: nn.Module, folder: Path, base_model_name: str | None
    ) -> dict[str, torch.Tensor]: ...

    def load(self, model: nn.Module, folder: Path, name: str = "default") -> None: ...

    def merge(self, model: nn.Module) -> None: ...
