"""`graftlm train`'s check before it loads anything: the plan's peak against the machine's memory.

The run's model config is read (the built-in model's shipped copy, or a folder's config.json),
planned with the run's settings, its pass size chosen (`plan/micro_batch.py`), and its
predicted peak logged. A run whose peak exceeds the machine's memory (total RAM from
/proc/meminfo, or the CUDA device's memory) even at the smallest pass stops here with the
numbers, unless `--force`: minutes of loading that would end in the kernel's OOM killer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from graftlm.errors import GraftError
from graftlm.plan import METHODS
from graftlm.plan.micro_batch import PassSize, choose_pass_size
from graftlm.plan.report import Plan, PlanRequest, plan_run
from graftlm.plan.shapes import BUILTIN, model_shape, read_config, shipped_configs

logger = logging.getLogger("graftlm")


def machine_memory(device: torch.device) -> int | None:
    """Bytes of memory a run on `device` can use: the CUDA device's, or the machine's RAM
    (`MemTotal`); None where neither is known."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _config_source(model: str) -> str | None:
    """What `read_config` plans for `model`: the built-in's shipped config, or the folder;
    None for a GGUF file (its config is known only once converted)."""
    if model.strip().lower() in (BUILTIN, *shipped_configs()):
        return model.strip().lower()
    path = Path(model).expanduser()
    return str(path) if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Preflight:
    """What the check decided: the plan, the memory it had, and the pass size it chose."""

    plan: Plan
    available: int | None  # bytes (None: unknown)
    pass_size: PassSize

    def pass_tokens(self, cfg, checkpointing: bool, log=logger.info) -> int:
        """Padded tokens per pass for the run's actual checkpointing (known once the data
        is read; the plan guessed it from the settings, and re-chooses where it differs)."""
        if checkpointing == self.pass_size.checkpointing:
            return self.pass_size.tokens
        size = choose_pass_size(self.plan, cfg, checkpointing, self.available)
        log(f"plan: checkpointing {'on' if checkpointing else 'off'}: {_described(size, cfg)}")
        return size.tokens


def plan_for_run(cfg, device: torch.device) -> Plan | None:
    """The plan of a `graftlm train` run's settings, untimed; None where none can be made
    (a GGUF model, a method the planner lacks)."""
    source = _config_source(str(cfg.model))
    if source is None or cfg.method not in METHODS:
        return None
    request = PlanRequest(
        method=cfg.method,
        rank=cfg.rank,
        targets=cfg.targets,
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
        device=device.type,
        dtype=cfg.dtype,
        activation_checkpointing=cfg.activation_checkpointing,
        ema_decay=cfg.ema_decay,
    )
    return plan_run(
        model_shape(*read_config(source)), request, source, with_full=False, timed=False
    )


def _described(size: PassSize, cfg) -> str:
    return f"micro-batch {size.micro_batch} x {cfg.seq_len} tokens ({size.reason})"


def preflight(cfg, device: torch.device, log=logger.info) -> Preflight | None:
    """Log the run's predicted peak and pass size; refuse one that cannot fit unless `cfg.force`.

    The pass size is `plan/micro_batch.py: choose_pass_size`: the throughput-optimal one where
    it fits the machine's memory, else the largest that does.

    Args:
        cfg: the run's `TrainConfig` (method defaults filled in).
        device: where it trains.
        log: where the prediction goes (rank 0's logger in a distributed run).

    Returns:
        The plan and the chosen pass size, or None where no plan can be made.

    Raises:
        GraftError: the predicted peak is above the machine's memory and `cfg.force` is off.
    """
    plan = plan_for_run(cfg, device)
    if plan is None:
        return None
    available = machine_memory(device)
    checkpointing = plan.chosen.run.checkpointing
    size = choose_pass_size(plan, cfg, checkpointing, available)
    m = size.memory
    where = "GPU memory" if device.type == "cuda" else "RAM"
    log(
        f"plan: predicted peak {m.peak / 1e9:.2f} GB (micro-batch {size.micro_batch}"
        f" x {cfg.seq_len} tokens)" + (f" of {available / 1e9:.1f} GB {where}" if available else "")
    )
    log(f"plan: {_described(size, cfg)}")
    if available is not None and m.peak > available:
        state = m.trainable_weights + m.gradients + m.optimizer_state + m.weight_average
        numbers = (
            f"base weights {m.base_weights / 1e9:.2f} GB, trainable + gradients + AdamW "
            f"{'+ weight average ' if m.weight_average else ''}{state / 1e9:.2f} GB, "
            f"activations {m.activations / 1e9:.2f} GB"
        )
        message = (
            f"the run needs ~{m.peak / 1e9:.1f} GB at its peak ({numbers}) but this machine has "
            f"{available / 1e9:.1f} GB of {where}; try --method qlora, a smaller --micro-batch-size "
            "or --seq-len, or --activation-checkpointing (graftlm plan shows each), or --force"
        )
        if not cfg.force:
            raise GraftError(message)
        log(f"warning: {message} (going on: --force)")
    return Preflight(plan, available, size)
