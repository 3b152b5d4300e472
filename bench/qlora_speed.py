"""QLoRA's default training run against LoRA's: step time and peak RSS, and their ratios.

The issue's limits: QLoRA's default run may take at most 1.5x LoRA's time per step and must peak
at no more than 0.6x LoRA's RSS. Each run is its own process (`graftlm train --method M --data F
--steps S --dtype D`, each method with its own defaults), so each peak is that run's alone; the
methods alternate, round after round, so a machine whose load drifts slows both alike. Step time
is the mean over a run's steps (the same batches for every method), from the run's own clock around each optimizer step (wall, and CPU: this process's user + system
seconds, which another job's load on the machine barely moves at `--threads 1`); peak RSS is the
run's own (graftlm.json, training.memory). Medians over rounds.

Extra variants compare settings against the same LoRA runs: `--variant NAME=METHOD [FLAGS]`,
where an upper-case `KEY=VALUE` token sets an environment variable of that run, e.g.

    python bench/qlora_speed.py --dtype float32 --threads 1 --rounds 2 \\
        --variant "torch-dequant=qlora GRAFTLM_NF4_KERNEL=0" \\
        --variant "no-ac=qlora --no-activation-checkpointing"

Results: bench/results/qlora_speed.txt; the reasoning they fed: docs/measurements.md, "QLoRA's
recipe".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "tickets" / "train.jsonl"
ENV_TOKEN = re.compile(r"^[A-Z][A-Z0-9_]*=")


def parse_variant(text: str) -> tuple[str, str, list[str], dict[str, str]]:
    """`NAME=METHOD [FLAGS] [KEY=VALUE]` -> (name, method, flags, environment)."""
    name, _, rest = text.partition("=")
    method, *tokens = rest.split()
    env = dict(t.split("=", 1) for t in tokens if ENV_TOKEN.match(t))
    flags = [t for t in tokens if not ENV_TOKEN.match(t)]
    return name, method, flags, env


def child(argv: list[str]) -> int:
    """`graftlm train ARGV`, timing every optimizer step into $QLORA_SPEED_TIMES (JSON)."""
    from graftlm.cli.parser import main as graftlm_main
    from graftlm.train.step import OptimizerStep

    times = []
    step = OptimizerStep.__call__

    def timed(self, *a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        result = step(self, *a, **kw)
        times.append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu})
        return result

    OptimizerStep.__call__ = timed
    code = graftlm_main(argv)
    Path(os.environ["QLORA_SPEED_TIMES"]).write_text(json.dumps(times))
    return code


def run_once(method, flags, env, args, out: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", "train", "--method", method, "--data", str(args.data),
        "--out", str(out), "--steps", str(args.steps), "--dtype", args.dtype, "--quiet",
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    times_file = out.with_suffix(".times.json")
    env = {**os.environ, **env, "QLORA_SPEED_TIMES": str(times_file)}
    subprocess.run(command + flags, check=True, capture_output=True, env=env, cwd=ROOT)
    graft = json.loads((out / "graftlm.json").read_text())
    steps = json.loads(times_file.read_text())
    return {
        "step_s": statistics.mean(s["wall"] for s in steps),
        "step_cpu_s": statistics.mean(s["cpu"] for s in steps),
        "first_step_s": steps[0]["wall"],
        "peak_gb": graft["training"]["memory"]["peak_rss_bytes"] / 1e9,
        "final_loss": graft["training"]["final_loss"],
        "train_s": graft["training"]["train_seconds"],
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=METHOD [FLAGS]")
    parser.add_argument("--no-defaults", action="store_true", help="only lora and --variant runs")
    args = parser.parse_args()
    variants = [("lora", "lora", [], {})]
    if not args.no_defaults:
        variants.append(("qlora", "qlora", [], {}))
    variants += [parse_variant(v) for v in args.variant]

    print(
        f"data {args.data.name}, --steps {args.steps}, --dtype {args.dtype}, "
        f"--threads {args.threads or 'all'}, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, method, flags, env in variants:
                result = run_once(method, flags, env, args, Path(tmp) / f"{name}-{r}")
                results[name].append(result)
                print(
                    f"round {r + 1} {name:14s} step {result['step_s']:6.2f} s wall, "
                    f"{result['step_cpu_s']:6.2f} s CPU (first {result['first_step_s']:6.2f} s), "
                    f"peak {result['peak_gb']:.2f} GB, loss {result['final_loss']:.4f}, "
                    f"run {result['train_s']:.0f} s with evaluations, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )

    def median(name, key):
        return statistics.median(r[key] for r in results[name])

    lora = {key: median("lora", key) for key in ("step_s", "step_cpu_s", "peak_gb", "train_s")}
    print("median over rounds; ratios against lora (limits: time <= 1.5x, peak <= 0.6x)")
    for name, *_ in variants:
        keys = ("step_s", "step_cpu_s", "peak_gb", "train_s")
        step, cpu, peak, run = (median(name, key) for key in keys)
        print(
            f"  {name:14s} step {step:6.2f} s wall ({step / lora['step_s']:4.2f}x), "
            f"{cpu:6.2f} s CPU ({cpu / lora['step_cpu_s']:4.2f}x), "
            f"peak {peak:.2f} GB ({peak / lora['peak_gb']:4.2f}x), "
            f"run {run:.0f} s ({run / lora['train_s']:4.2f}x)"
        )


if __name__ == "__main__":
    main()
