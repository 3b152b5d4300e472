"""A longer run of the reader fuzz tests (tests/fuzz): the suite's properties with `--scale`
times the examples and a fresh random seed, recorded with the cases tried.

    python bench/fuzz.py --scale 20 --out bench/results/fuzz.txt

The suite runs them with a fixed seed (hypothesis' derandomize) and a few thousand cases in all;
here each property draws `scale` times as many from a random seed, which hypothesis prints at a
failure so that it can be replayed (`--hypothesis-seed`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--out", default=None, help="append the summary to this file")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    env = dict(os.environ, GRAFTLM_FUZZ_SCALE=str(args.scale), MKL_CBWR="AUTO,STRICT")
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/fuzz"),
        "--hypothesis-show-statistics", f"--hypothesis-seed={seed}",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    tried = {}
    for test, block in re.findall(r"test_fuzz\.py::(\w+):\n(.*?)(?=\n\S|\Z)", output, re.S):
        passing = sum(int(n) for n in re.findall(r"(\d+) passing", block))
        failing = sum(int(n) for n in re.findall(r"(\d+) failing", block))
        tried[test] = (passing, failing)
    summary = re.findall(r"^\d+ (?:passed|failed).*$", output, re.M)
    lines = [
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: scale {args.scale:g}, "
        f"hypothesis seed {seed}, {seconds:.0f} s",
        *(f"{t}: {p} cases passed, {f} failing" for t, (p, f) in tried.items()),
        f"total: {sum(p + f for p, f in tried.values())} cases; pytest: "
        f"{summary[-1] if summary else 'no summary'}",
    ]
    text = "\n".join(lines)
    print(text)
    if done.returncode != 0:  # the failures' tracebacks and the examples that made them
        log = Path(args.out or "fuzz").with_suffix(".log")
        log.write_text(output, encoding="utf-8")
        print(f"failures: see {log}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
