"""Resumable training checkpoints, safetensors + JSON only (no pickle).

`OUT/checkpoint/` holds the trainable parameters, AdamW's moment tensors and step counts, the
scheduler position, the RNG state, the step reached and the seconds spent. It is written into a
temp folder and swapped in with renames, so a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graftlm.errors import GraftError

FOLDER = "checkpoint"
TENSORS = "state.safetensors"
META = "state.json"
# Settings that change what a step computes: a resumed run must use the same ones.
_MUST_MATCH = (
    "data",
    "model",
    "method",
    "rank",
    "alpha",
    "targets",
    "layers",
    "use_rslora",
    "lr",
    "batch_size",
    "seq_len",
    "seed",
    "epochs",
    "steps",
    "max_epochs",
    "warmup_ratio",
    "weight_decay",
    "neftune_alpha",
    "ema_decay",
    "dropout",
    "eval_data",
    "validation_split",
    "init_rank",
)
# Settings added to _MUST_MATCH later, and the value a checkpoint written before meant.
_ADDED_LATER = {"validation_split": "random", "layers": None}


def write(
    out: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    names: dict[int, str],
    *,
    step: int,
    elapsed_s: float,
    cfg,
    stateful: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint for `step` atomically (temp folder, then rename).

    `stateful`: more training state by name, each saved through its `state_dict()` if it has
    one: the method's TrainingHooks ("hooks": AdaLoRA's importance averages and rank masks),
    the adaptive run's early stop ("early_stop": the best adapter so far), the weight average
    ("weight_average": `--ema-decay`).
    `settings`: what a resumed run must match (default: `cfg`'s TrainConfig fields that change
    a step; `graftlm train-image` gives its own).
    """
    tensors: dict[str, torch.Tensor] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        tensors[f"param/{names[id(p)]}"] = p.detach().contiguous().cpu()
    for index, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().contiguous().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    for label, holder in (stateful or {}).items():
        if hasattr(holder, "state_dict"):
            for key, value in holder.state_dict().items():
                tensors[f"{label}/{key}"] = value.detach().contiguous().cpu()
    meta = {
        "step": step,
        "elapsed_s": elapsed_s,
        "scheduler": scheduler.state_dict()["last_epoch"],
        "param_names": [names[id(p)] for p in params],
        "settings": settings if settings is not None else {k: getattr(cfg, k) for k in _MUST_MATCH},
    }
    target = out / FOLDER
    tmp = out / (FOLDER + ".tmp")
    old = out / (FOLDER + ".old")
    try:
        if not _complete(target) and _complete(old):
            # a write killed between its two renames: .old is the one checkpoint, put it back
            # before anything below deletes .old
            shutil.rmtree(target, ignore_errors=True)
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        before = saved_step(out)
        kept = "no checkpoint before" if before is None else f"that of step {before} is intact"
        raise GraftError(
            f"could not write the checkpoint of step {step} in {out}: {exc} ({kept})"
        ) from None


def _complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / TENSORS).is_file()


def saved_step(out: Path) -> int | None:
    """The step of the checkpoint in `out` (or its `.old` one), None without one."""
    for folder in (out / FOLDER, out / (FOLDER + ".old")):
        try:
            return int(json.loads((folder / META).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def read(out: Path) -> dict[str, Any] | None:
    """The checkpoint in `out` (falling back to a complete `.old` one), or None."""
    for folder in (out / FOLDER, out / (FOLDER + ".old")):
        if _complete(folder):
            try:
                meta = json.loads((folder / META).read_text(encoding="utf-8"))
                tensors = load_file(str(folder / TENSORS))
            except Exception as exc:
                raise GraftError(f"{folder}: checkpoint is unreadable ({exc})") from None
            _check(folder, meta, tensors)
            return {"meta": meta, "tensors": tensors, "folder": folder}
    return None


def _check(folder: Path, meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """What `restore` relies on, so that a damaged checkpoint is a GraftError naming its file
    and key rather than a KeyError (or NaN weights) mid-restore."""
    where = folder / META

    def bad(problem: str) -> GraftError:
        return GraftError(f"{where}: {problem}; the checkpoint is damaged (delete {folder})")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    for key, kinds in (
        ("step", int),
        ("scheduler", int),
        ("elapsed_s", (int, float)),
        ("param_names", list),
        ("settings", dict),
    ):
        value = meta.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise bad(f"{key!r} is {value!r}")
    if meta["step"] < 0 or not math.isfinite(meta["elapsed_s"]):
        raise bad(f"'step' {meta['step']!r} / 'elapsed_s' {meta['elapsed_s']!r}")
    if not all(isinstance(name, str) for name in meta["param_names"]):
        raise bad("'param_names' should be a list of strings")
    where = folder / TENSORS
    missing = [f"param/{n}" for n in meta["param_names"] if f"param/{n}" not in tensors]
    rng = tensors.get("rng/torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        missing.append("rng/torch (a uint8 vector)")
    if missing:
        raise bad(f"missing tensors {missing[:5]}")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise bad(f"{key!r} holds NaN or infinite values")


def check_settings(state: dict, cfg, settings: dict[str, Any] | None = None) -> None:
    """A resumed run must compute the same steps: list every setting that differs (`settings`
    as given to `write`, default `cfg`'s)."""
    saved = {**_ADDED_LATER, **state["meta"]["settings"]}
    now = settings if settings is not None else {k: getattr(cfg, k) for k in _MUST_MATCH}
    differ = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]
    ]
    if differ:
        raise GraftError(
            f"{state['folder']}: settings differ from the checkpointed run: " + "; ".join(differ)
        )


def restore(
    state: dict, model: nn.Module, optimizer, scheduler, names: dict[int, str],
    stateful: dict[str, Any] | None = None,
) -> tuple[int, float]:  # fmt: skip
    """Load parameters, optimizer, scheduler, RNG and the `stateful` holders' state (see
    `write`); return (step, seconds)."""
    meta, tensors = state["meta"], state["tensors"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if [names[id(p)] for p in params] != meta["param_names"]:
        raise GraftError(
            f"{state['folder']}: the checkpoint's trainable parameters differ from this model's"
        )
    for p in params:
        saved = tensors[f"param/{names[id(p)]}"]
        if saved.shape != p.shape:
            raise GraftError(
                f"{state['folder']}: parameter {names[id(p)]!r} is {list(saved.shape)} in the "
                f"checkpoint, {list(p.shape)} in this model"
            )
    with torch.no_grad():
        for p in params:
            p.copy_(tensors[f"param/{names[id(p)]}"])
    for index, p in enumerate(params):
        prefix = f"optim/{index}/"
        # AdamW keeps its step counter on the CPU and the moments next to the parameter
        entry = {
            k[len(prefix) :]: v.clone() if k.endswith("/step") else v.to(p.device, copy=True)
            for k, v in tensors.items()
            if k.startswith(prefix)
        }
        wrong = [k for k, v in entry.items() if k != "step" and v.shape != p.shape]
        if wrong:
            raise GraftError(
                f"{state['folder']}: optimizer state {prefix}{wrong[0]} does not have the shape "
                f"of parameter {names[id(p)]!r} ({list(p.shape)})"
            )
        if entry:
            optimizer.state[p] = entry
    scheduler.last_epoch = meta["scheduler"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(
        optimizer.param_groups,
        [f(meta["scheduler"]) * base for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)],
    ):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    try:
        torch.set_rng_state(tensors["rng/torch"])
    except RuntimeError as exc:
        raise GraftError(f"{state['folder']}: the saved random state is unusable ({exc})") from None
    for label, holder in (stateful or {}).items():
        prefix = f"{label}/"
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found and hasattr(holder, "load_state_dict"):
            holder.load_state_dict(found)
    return int(meta["step"]), float(meta["elapsed_s"])


@dataclass
class RunCheckpoint:
    """The checkpoint of one run: `write` and `restore` bound to the run's output folder,
    model, optimizer, scheduler and `stateful` holders, so that both save the same things."""

    out: Path
    cfg: Any
    model: nn.Module
    optimizer: Any
    scheduler: Any
    names: dict[int, str]
    stateful: dict[str, Any]

    def write(self, step: int, elapsed_s: float) -> None:
        """The checkpoint for `step` reached after `elapsed_s` seconds of training."""
        write(
            self.out, self.model, self.optimizer, self.scheduler, self.names,
            step=step, elapsed_s=elapsed_s, cfg=self.cfg, stateful=self.stateful,
        )  # fmt: skip

    def restore(self, state: dict) -> tuple[int, float]:
        """Load `state` (from `read`) into the run; returns (step, seconds)."""
        return restore(state, self.model, self.optimizer, self.scheduler, self.names, self.stateful)


def remove(out: Path) -> None:
    """Delete the checkpoint once the final adapter is written."""
    for name in (FOLDER, FOLDER + ".tmp", FOLDER + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)
