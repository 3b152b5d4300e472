"""Run `graftlm sweep` on a zoo task and keep its rows as evidence: the zoo table's "best swept
setting" column.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/zoo_sweep.py --task quantities \\
        --ranks 4,8,16,32

It is the library call behind `graftlm sweep --data zoo/T/train.jsonl --test zoo/T/test.jsonl`
(the same settings, scoring and recommendation), with one thread and no time cap so that two
sweeps can share a 2-core machine without the cap cutting either. The sweep's folder goes to a
temporary directory; `bench/results/zoo-sweeps/<task>.json` keeps its rows (each with
`test_score`, the greedy exact match on the whole test file), the recommendation and why, the
commit and the CPU, and `<task>.png` its plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from recipe import DATA, ROOT, code_version

RESULTS = ROOT / "bench" / "results" / "zoo-sweeps"


def cpu_name() -> str:
    """The CPU's model name and whether it computes in bf16 (the figures depend on both)."""
    from graftlm.train.distributed import bf16_supported

    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {'bf16' if bf16_supported() else 'float32'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="a folder under examples/data/zoo")
    parser.add_argument("--ranks", default="4,8,16,32")
    parser.add_argument("--lrs", default=None, help="default: the method's own")
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--seeds", default=None, help="e.g. 0,1,2: settings by their mean")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    commit = code_version()  # before anything else can change the checkout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from graftlm.train.config import TrainConfig
    from graftlm.train.sweep import PLOT, settings_of, sweep

    folder = DATA / "zoo" / args.task
    settings = settings_of(args.methods, args.ranks, args.lrs, args.seeds)
    out = Path(tempfile.mkdtemp(prefix=f"sweep-{args.task}-"))
    base = TrainConfig(data=str(folder / "train.jsonl"), out=str(out), threads=args.threads,
                       time_budget=None)  # fmt: skip
    result = sweep(base, settings, out, test=str(folder / "test.jsonl"), progress=False)
    best = max(result["settings"], key=lambda s: s["test_score"])  # by the mean over seeds
    record = {
        "task": f"zoo/{args.task}",
        "command": f"graftlm sweep --methods {args.methods} --ranks {args.ranks}"
        + (f" --lrs {args.lrs}" if args.lrs else "")
        + (f" --seeds {args.seeds}" if args.seeds else "")
        + f" (threads={args.threads}, no time cap)",
        "rows": result["rows"],
        "settings": result["settings"],
        "best": best["setting"],
        "recommended": result["recommended"],
        "why": result["why"],
        "commit": commit,
        "cpu": cpu_name(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.task}.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.copy(out / PLOT, RESULTS / f"{args.task}.png")
    print(json.dumps(record))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
