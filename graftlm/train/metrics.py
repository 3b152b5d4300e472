"""A run's metrics: metrics.jsonl (one row per step, plus evaluation rows), the progress bar,
and loss.png drawn from the file at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm


class MetricsWriter:
    """Owns `out/metrics.jsonl` and `out/loss.png` for one run."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.png = out / "loss.png"

    def exists(self) -> bool:
        """Whether the folder already holds a run's metrics."""
        return self.path.exists()

    def truncate(self, step: int) -> None:
        """Drop rows past `step` (the checkpoint a resumed run starts from)."""
        truncate_metrics(self.path, step)

    def append(self, row: dict, eval_row: dict | None) -> None:
        """Add one step's row and its evaluation row, if any."""
        append_metrics(self.path, row, eval_row)

    def plot(self, ylabel: str = "cross-entropy (labelled tokens)") -> None:
        """Draw loss.png from the rows written so far (`ylabel`: what the loss is)."""
        plot(self.path, self.png, ylabel)


def progress_bar(total: int, initial: int, enabled: bool):
    """The run's tqdm bar over optimizer steps (disabled: a no-op bar)."""

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def append_metrics(path: Path, row: dict, eval_row: dict | None) -> None:
    """Add one step's row (and its evaluation row, if any) to metrics.jsonl."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        if eval_row:
            handle.write(json.dumps(eval_row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint, so a resumed run's file has each step once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def plot(metrics_path: Path, png: Path, ylabel: str = "cross-entropy (labelled tokens)") -> None:
    """loss.png: training loss per step (and a smoothed line), eval loss as points."""
    # matplotlib is imported only when a run finishes (it is slow to import), and the
    # non-interactive backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        (eval_rows if "eval_loss" in row else train_rows).append(row)
    if not train_rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in train_rows]
    losses = [r["loss"] for r in train_rows]
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="#3182bd", linewidth=2, label=f"train loss (mean of {window})")
    if eval_rows:
        ax.plot(
            [r["step"] for r in eval_rows],
            [r["eval_loss"] for r in eval_rows],
            "o-",
            color="#e6550d",
            label="eval loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
