"""Full fine-tuning's memory: plain AdamW against the lean AdamW (bf16 moments), same run.

    .venv/bin/python bench/full_ft_memory.py [--steps 3] [--task tickets]

Each run is `graftlm train --method full --steps N --batch-size 8` on the built-in model, in its
own process (a clean peak RSS), with and without `--lean-optimizer`; the table (peak RSS, the
optimizer state, seconds, final loss) is printed and written to bench/results/full_ft.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(task: str, steps: int, lean: bool, work: Path) -> dict:
    out = work / ("lean" if lean else "plain")
    shutil.rmtree(out, ignore_errors=True)
    args = [
        sys.executable, "-m", "graftlm", "train", "--method", "full",
        "--data", str(ROOT / "examples" / "data" / task / "train.jsonl"), "--out", str(out),
        "--steps", str(steps), "--batch-size", "8", "--save-every", "1000", "--no-forgetting",
    ]  # fmt: skip
    if lean:
        args.append("--lean-optimizer")
    subprocess.run(args, check=True)
    graft = json.loads((out / "graftlm.json").read_text())
    training = graft["training"]
    shutil.rmtree(out, ignore_errors=True)  # the full checkpoint is 12 bytes per parameter
    return {
        "optimizer": "lean AdamW (bf16 moments)" if lean else "AdamW (fp32 moments)",
        "peak_rss_gb": training["memory"]["peak_rss_bytes"] / 1e9,
        "optimizer_state_gb": training["memory"]["optimizer_state_bytes"] / 1e9,
        "weights_gb": training["memory"]["adapter_bytes"] / 1e9,
        "train_seconds": training["train_seconds"],
        "final_loss": training["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--task", default="tickets")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args.task, args.steps, lean, Path(tmp)) for lean in (False, True)]
    lines = [
        f"full fine-tuning of the built-in model, {args.task}, {args.steps} steps of 8 rows, "
        f"--dtype auto; {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        "(shared with other jobs: times are under load)",
        "",
        "| optimizer | peak RSS | optimizer state | trained weights | train time | final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['peak_rss_gb']:.2f} GB | {r['optimizer_state_gb']:.2f} GB "
            f"| {r['weights_gb']:.2f} GB | {r['train_seconds']:.0f} s | {r['final_loss']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / "full_ft.txt").write_text(text)


if __name__ == "__main__":
    main()
