"""Print the zoo's settings that ran with several seeds (each seed's exact match, mean, spread),
and every setting against its task's defaults on the seeds both ran.

    .venv/bin/python bench/zoo_seeds.py > /tmp/seeds.md

Reads the `bench/recipe.py` rows of `bench/results/zoo-reg.jsonl` and `zoo-seeds.jsonl` (one
package code, 350b179's, on the 2-core AMD EPYC in float32: rows of other machines or code do
not belong in one group; the rows of 62892d6 count as that code, since what it added,
`--ema-decay`, changes nothing unless set and 6d409cb's IA3 layers are spelled out in its rows;
so do 6ec1a75's, whose package differs from 62892d6 in a docstring, and 961312f's, whose
package changes do not reach a `train` run: the planner, the sweep, naming the trainable tensors)
and the runs of `graftlm sweep` in `zoo-sweeps/` (a sweep's run trains bit for bit what a
`train` run of its setting trains: tests/train/test_sweep.py). A row without
a `seed` setting ran with TrainConfig's default, 0. Settings are grouped by everything but the
seed and the harness's `threads` and `time_budget`. Rows made on a CPU with bf16 (`cpu_bf16`, so
`--dtype auto` trained in bf16; 2026-12-07, stop 41, a 2-core AMD EPYC with AVX-512 BF16) are
tasks of their own, "(bf16)", compared only with their own defaults.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("zoo-reg.jsonl", "zoo-seeds.jsonl")
HARNESS = ("seed", "threads", "time_budget")


def recipe_rows() -> list[tuple[str, str, int, float]]:
    """(task, setting, seed, exact match) of every recipe run in SOURCES."""
    found = []
    for name in SOURCES:
        path = RESULTS / name
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            settings = row["settings"]
            shown = {k: v for k, v in settings.items() if k not in HARNESS}
            setting = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
            task = row["task"].removeprefix("zoo/")
            # a bf16 machine's runs are compared only with each other: the dtype moves the numbers
            task += " (bf16)" if row.get("cpu_bf16") else ""
            found.append((task, setting, settings.get("seed", 0), row["exact_match"]))
    return found


def sweep_rows() -> list[tuple[str, str, int, float]]:
    """(task, setting, seed 0, test score) of every sweep run; rank 16 is LoRA's default."""
    found = []
    for path in sorted((RESULTS / "zoo-sweeps").glob("*.json")):
        sweep = json.loads(path.read_text())
        for row in sweep["rows"]:
            setting = "defaults" if row["setting"] == "lora-r16" else f"rank={row['rank']}"
            found.append((sweep["task"].removeprefix("zoo/"), setting, 0, row["test_score"]))
    return found


def main() -> None:
    groups: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for task, setting, seed, score in sweep_rows() + recipe_rows():
        groups[(task, setting)][seed] = score
    print("| task | setting | exact match per seed | mean | standard deviation |")
    print("|---|---|---|---|---|")
    for (task, setting), scores in sorted(groups.items()):
        if len(scores) < 2:
            continue
        per_seed = ", ".join(f"{scores[s]:.3f} (seed {s})" for s in sorted(scores))
        mean, spread = statistics.mean(scores.values()), statistics.stdev(scores.values())
        print(f"| {task} | {setting} | {per_seed} | **{mean:.3f}** | {spread:.3f} |")
    print()
    print("Each setting against the defaults of its task, on the seeds both ran:")
    print()
    print("| task | setting | seeds | setting | defaults | difference (points) |")
    print("|---|---|---|---|---|---|")
    differences: dict[str, list[float]] = defaultdict(list)
    for (task, setting), scores in sorted(groups.items()):
        defaults = groups.get((task, "defaults"), {})
        common = sorted(set(scores) & set(defaults))
        if setting == "defaults" or not common:
            continue
        mine = statistics.mean(scores[s] for s in common)
        theirs = statistics.mean(defaults[s] for s in common)
        points = 100 * (mine - theirs)
        differences[setting].append(points)
        seeds = ", ".join(str(s) for s in common)
        print(f"| {task} | {setting} | {seeds} | {mine:.3f} | {theirs:.3f} | **{points:+.1f}** |")
    print()
    print("Each setting over the tasks it ran on (every task weighs the same, whatever its seeds):")
    print()
    print("| setting | tasks | mean difference (points) | ahead / behind / level |")
    print("|---|---|---|---|")
    for setting, points in sorted(differences.items()):
        shown = [round(p, 1) for p in points]  # a tenth of a point is as fine as the table reads
        ahead, behind = sum(p > 0 for p in shown), sum(p < 0 for p in shown)
        level = len(points) - ahead - behind
        print(f"| {setting} | {len(points)} | **{statistics.mean(points):+.1f}** | "
              f"{ahead} / {behind} / {level} |")  # fmt: skip


if __name__ == "__main__":
    main()
