"""Training speed on a machine that other jobs keep busy: OpenMP's wait policy and thread count.

torch's CPU wheel runs its parallel regions on GNU OpenMP (libgomp). By default a libgomp
worker that finishes its share spins for a while before it sleeps, so that the next region
starts without a wake-up. When other processes keep every core busy, a spinning worker burns
the time slice its partner needs, and a step of thousands of small regions waits for the
scheduler thousands of times. On a shared 2-core machine a `graftlm train` with its default
two threads then ran at 10-20 tokens/s instead of ~500 (load ~10 from other jobs), while one
thread ran at ~170 and two threads with `OMP_WAIT_POLICY=PASSIVE` at ~125.

This script measures that in a controlled way: each setting is a `graftlm train --steps S` run
in its own process (the wait policy must be set before libgomp starts), with 0 or more
background processes that each keep one core busy (`--load 0,2,4`). It reports the mean step
time over the steps after the first, from the run's metrics.jsonl, and the ratio against the
default setting under the same load. Settings alternate within a round, so drift slows all
alike. Results: bench/results/busy_machine.txt.

    python bench/busy_machine.py --load 0,2 --steps 6 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "tickets" / "train.jsonl"

# name -> (environment of the run: "" removes the variable, graftlm train flags). libgomp's own
# default, with neither variable set, is a spin count of 300,000; graftlm's CLI sets a wait policy
# only where the user set neither (graftlm/cli/__init__.py), so "default" names libgomp's count.
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": ""}, []),
    "spin10k": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, []),
    "threads1": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"}, ["--threads", "1"]),
    "graftlm": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}, []),
}


def _spin() -> None:
    while True:
        pass


def step_seconds(setting: str, steps: int, dtype: str) -> list[float]:
    """The seconds of the optimizer steps of one `graftlm train` run (not the first, nor those
    with an evaluation before them)."""
    extra_env, flags = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in extra_env}
    env.update({k: v for k, v in extra_env.items() if v})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "graftlm", "train", "--data", str(DATA), "--out", str(out),
            "--steps", str(steps), "--dtype", dtype, "--no-forgetting", "--eval-every", "1000", *flags,
        ]  # fmt: skip
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a step's time is the clock between two training rows, skipping those an evaluation ran in
    seconds, previous = [], None
    for row in rows:
        if "tokens" not in row:
            previous = None
            continue
        if previous is not None:
            seconds.append(row["elapsed_s"] - previous)
        previous = row["elapsed_s"]
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="0,2", help="background busy processes, e.g. 0,2,4")
    parser.add_argument("--settings", default="default,passive,spin10k,threads1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    settings = args.settings.split(",")
    print(f"data {DATA.name}, --steps {args.steps}, --dtype {args.dtype}, {os.cpu_count()} CPUs")
    for load in [int(x) for x in args.load.split(",")]:
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
        for p in spinners:
            p.start()
        try:
            times: dict[str, list[float]] = {s: [] for s in settings}
            for round_ in range(args.rounds):
                for s in settings:
                    steps = step_seconds(s, args.steps, args.dtype)
                    times[s].append(statistics.mean(steps))
                    print(f"load {load} round {round_ + 1} {s:<9} {times[s][-1]:7.2f} s/step")
        finally:
            for p in spinners:
                p.kill()
        base = statistics.median(times[settings[0]])
        for s in settings:
            median = statistics.median(times[s])
            print(f"load {load}: {s:<9} {median:7.2f} s/step ({median / base:.2f}x {settings[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
