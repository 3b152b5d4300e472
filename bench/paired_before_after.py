"""graftlm's training step on two checkouts at the same time, one core each, to measure a change
on a host whose speed drifts.

    .venv/bin/python bench/paired_before_after.py --before /work/base --rounds 2
    .venv/bin/python bench/paired_before_after.py --before /work/base --dtype float32 --steps 6

`bench/train_vs_peft.py --before TREE` runs the two sides one after the other; on a shared host
their speeds can drift by ~10% between the two slots of one call (bench/results/fusion.txt, 7a.),
more than a change to the element-wise work moves the step. Here both run at once: `before` (the
graftlm package of TREE, e.g. `git worktree add TREE COMMIT`) pinned to one core and `after`
(this checkout) to another, one torch thread each, then swapped, `--rounds` times. Each side is
graftlm's training loop (`graftlm.train.loop.train`, what `graftlm train` runs) on the same
plain-text rows of `--seq-len` tokens, every position labelled (the text workload of
train_vs_peft.py), LoRA r=8 on q/v; a side's speed is its tokens over the summed wall time of its
steps after the first (which holds the first allocations). Needs Linux (`taskset`) and two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def worker(args) -> None:
    """One side: the training loop with each optimizer step timed; prints a JSON line."""
    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train
    from graftlm.train.step import OptimizerStep

    seconds: list[float] = []
    one_step = OptimizerStep.__call__

    def timed(self, *a, **k):
        start = time.perf_counter()
        result = one_step(self, *a, **k)
        seconds.append(time.perf_counter() - start)
        return result

    OptimizerStep.__call__ = timed
    cfg = TrainConfig(
        data=args.data, out=tempfile.mkdtemp(prefix="bench-paired-"), rank=8, alpha=16,
        targets="q_proj,v_proj", batch_size=args.batch_size, seq_len=args.seq_len, lr=2e-4,
        seed=0, warmup_ratio=0.0, steps=args.steps, dtype=args.dtype, threads=1,
    )  # fmt: skip
    train(cfg, progress=False)
    import graftlm

    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows if "loss" in r]
    print(
        json.dumps(
            {
                "package": str(Path(graftlm.__file__).parent),
                "seconds": seconds,
                "tokens_per_s": sum(tokens[1:]) / sum(seconds[1:]),
                "losses": [r["loss"] for r in rows if "loss" in r],
            }
        )
    )


def start(tree: Path, core: int, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    command = [
        "taskset", "-c", str(core), sys.executable, __file__, "--worker", "--data", args.data,
        "--steps", str(args.steps), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len),
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a side failed ({proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="the checkout of the earlier commit (required)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (cores swapped)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.before:  # not `required=True`: the workers run this parser without it
        parser.error("--before is required")
    from train_vs_peft import make_text_rows

    from graftlm.models.load import load_tokenizer

    args.data = str(Path(tempfile.mkdtemp(prefix="bench-paired-data-")) / "text.jsonl")
    rows = args.batch_size * args.steps
    make_text_rows(Path(args.data), load_tokenizer("smollm2-135m-instruct"), args.seq_len, rows)
    trees = {"before": Path(args.before).resolve(), "after": ROOT}
    ratios = []
    for index in range(2 * args.rounds):
        cores = {"before": index % 2, "after": 1 - index % 2}
        procs = {side: start(trees[side], cores[side], args) for side in trees}
        results = {side: result_of(proc) for side, proc in procs.items()}
        for side, r in results.items():
            first = r["seconds"][0]
            print(
                f"run {index + 1}: {side:6s} core {cores[side]}  {r['tokens_per_s']:7.1f} tokens/s "
                f"after the first step (first {first:.2f} s)  loss last {r['losses'][-1]:.4f}  "
                f"{r['package']}"
            )
        ratios.append(results["after"]["tokens_per_s"] / results["before"]["tokens_per_s"])
        print(f"run {index + 1}: after / before {ratios[-1]:.3f}x")
    print(f"after / before over {len(ratios)} runs: " + ", ".join(f"{r:.3f}x" for r in ratios))
    print(f"mean {sum(ratios) / len(ratios):.3f}x")


if __name__ == "__main__":
    main()
