"""Choose `graftlm train`'s defaults by experiment: train with given settings, score exact match.

    .venv/bin/python bench/recipe.py --task tickets --set lr=1e-3 epochs=1 --set lr=4e-4 epochs=2

Each `--set` is one run (settings on top of TrainConfig's defaults), or one run per seed with
`--seeds 0,1,2`: a single seed moves a 120-row zoo test by 5-12 points. For every run it prints and
appends to `bench/results/recipe.jsonl`: the settings, optimizer steps, training seconds (from
metrics.jsonl), tokens/s, final eval loss, and greedy exact match and field accuracy on the
task's held-out test file (unseen phrasings). Accuracy does not depend on machine load; seconds
do, so compare seconds only between runs made on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def score(
    adapter: Path | None, test: Path, rows: int | None, answers_file: str | None = None, run=None
) -> tuple[float, float, int, float]:
    """Greedy exact match and field accuracy (`graftlm.infer.answer_fields`: per key of a JSON
    answer, equal to exact match for a single label) on `test` with the adapter in `adapter`
    (None: the base model alone), the rows scored, and the seconds generation took. With
    `answers_file`, every answer is appended there beside its reference, tagged with `run`."""
    from graftlm.data.dataset import prompt_for_generation, read_rows, reference_answer
    from graftlm.infer.answer_fields import field_accuracy
    from graftlm.infer.generate import SamplingConfig, generate, load_for_inference

    data, _ = read_rows(test)
    data = data[:rows] if rows else data
    model, tokenizer = load_for_inference(None, {"a": str(adapter)} if adapter else None)
    prompts = [prompt_for_generation(r, tokenizer) for r in data]
    refs = [reference_answer(r).strip() for r in data]
    # room for the longest reference: a cut answer would count as wrong
    longest = max(len(tokenizer(r)["input_ids"]) for r in refs)
    t = time.perf_counter()
    outputs = generate(
        model,
        tokenizer,
        prompts,
        sampling=SamplingConfig(max_new_tokens=longest + 8),
        batch_size=16,
    )
    correct = sum(o.strip() == r for o, r in zip(outputs, refs))
    fields = sum(field_accuracy(o, r) for o, r in zip(outputs, refs))
    if answers_file:  # every answer beside its reference, for reading the misses
        with open(answers_file, "a", encoding="utf-8") as handle:
            for prompt_row, output, ref in zip(data, outputs, refs):
                user = prompt_row["messages"][-2]["content"] if "messages" in prompt_row else ""
                line = {"task": test.parent.name, "run": run, "user": user,
                        "output": output.strip(), "reference": ref}  # fmt: skip
                handle.write(json.dumps(line) + "\n")
    return correct / len(data), fields / len(data), len(data), time.perf_counter() - t


def code_version() -> str | None:
    """The commit the run's code came from (+ "-dirty" with uncommitted changes), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tickets", help="a folder under examples/data")
    parser.add_argument(
        "--set", nargs="*", action="append", default=[], help="KEY=VALUE settings of one run"
    )
    parser.add_argument("--rows", type=int, default=None, help="score only the first N test rows")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "recipe.jsonl"))
    parser.add_argument("--base", action="store_true", help="score the untrained base model only")
    parser.add_argument("--outputs", help="append every test answer and its reference here")
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(x) for x in text.split(",")],
        help="run every --set once per seed, e.g. 0,1,2 (one seed moves a 120-row test by"
        " 5-12 points: bench/results/zoo.md)",
    )
    args = parser.parse_args()
    commit = code_version()  # the code these runs load, before anyone commits beside them
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from graftlm.train.config import TrainConfig
    from graftlm.train.distributed import bf16_supported
    from graftlm.train.loop import train

    if args.base:
        accuracy, fields, n, gen_s = score(
            None, DATA / args.task / "test.jsonl", args.rows, args.outputs, "base model"
        )
        record = {"task": args.task, "settings": "base model", "exact_match": round(accuracy, 3),
                  "field_accuracy": round(fields, 3), "test_rows": n,
                  "generate_s": round(gen_s, 1)}  # fmt: skip
        print(json.dumps(record), flush=True)
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return
    runs = [
        {k.replace("-", "_"): parse_value(v) for k, v in (s.split("=", 1) for s in settings)}
        for settings in (args.set or [[]])
    ]
    if args.seeds:
        runs = [{**overrides, "seed": seed} for overrides in runs for seed in args.seeds]
    for overrides in runs:
        out = Path(tempfile.mkdtemp(prefix="recipe-"))
        shutil.rmtree(out)
        cfg = TrainConfig(data=str(DATA / args.task / "train.jsonl"), out=str(out), **overrides)
        result = train(cfg, progress=False)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        graft = json.loads((out / "graftlm.json").read_text())
        steps = [r for r in rows if "loss" in r]
        tokens = sum(r["tokens"] for r in steps)
        accuracy, fields, n, gen_s = score(
            out, DATA / args.task / "test.jsonl", args.rows, args.outputs, overrides
        )
        record = {
            "task": args.task,
            "settings": overrides,
            "steps": result.steps,
            "train_s": steps[-1]["elapsed_s"],
            "tokens": tokens,
            "tokens_per_s": round(tokens / steps[-1]["elapsed_s"], 1),
            "final_loss": result.final_loss,
            "eval_loss": result.eval_loss,
            "exact_match": round(accuracy, 3),
            "field_accuracy": round(fields, 3),
            "test_rows": n,
            "generate_s": round(gen_s, 1),
            "validation": graft["training"].get("validation"),  # adaptive runs: why it stopped
            "cpu_bf16": bf16_supported(),
            "machine": platform.processor() or platform.machine(),
            "commit": commit,
        }
        print(json.dumps(record), flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
