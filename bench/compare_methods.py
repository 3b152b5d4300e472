"""Every method on one task with its defaults: size, time, loss, accuracy — as a Markdown table.

    .venv/bin/python bench/compare_methods.py                       # all methods, tickets task
    .venv/bin/python bench/compare_methods.py --methods lora ia3 --task intent_slots

For each method, `graftlm train --method M --data examples/data/TASK/train.jsonl --out DIR` (only
--data and --out: the method's own recipe), then `graftlm eval --adapter DIR --data
examples/data/TASK/test.jsonl --generate`. A method whose folder already holds a finished run is
not trained again (`--fresh` retrains). The table (trainable parameters, adapter file size,
training seconds, peak RSS, teacher-forced eval loss on the test answers, greedy exact match and
field accuracy) is printed, written to bench/results/methods-TASK.md, and, for the tickets task,
put into README.md between the `methods-table` markers. Training seconds depend on machine load:
compare them only within a run made on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "qlora", "adalora", "ia3", "bottleneck", "prefix", "prompt"]
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def graftlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "graftlm", *args], check=True)


def run_method(method: str, task: str, work: Path, fresh: bool) -> dict:
    data = ROOT / "examples" / "data" / task
    out = work / f"{task}-{method}"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "graftlm.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        graftlm("train", "--method", method, "--quiet", "--data", str(data / "train.jsonl"),
                "--out", str(out))  # fmt: skip
    scores = out / "eval.json"
    if fresh or not scores.is_file():
        graftlm("eval", "--adapter", str(out), "--data", str(data / "test.jsonl"), "--generate",
                "--max-new-tokens", "64", "--output", str(scores))  # fmt: skip
    graft = json.loads((out / "graftlm.json").read_text())
    training = graft.get("training", {})
    result = json.loads(scores.read_text())
    weights = sum(f.stat().st_size for f in out.glob("adapter_model.*"))
    return {
        "method": method,
        "trainable": graft.get("trainable_parameters"),
        "file_mb": weights / 1e6,
        "train_s": training.get("train_seconds"),
        "steps": training.get("steps"),
        "peak_gb": (training.get("memory") or {}).get("peak_rss_bytes", 0) / 1e9,
        "eval_loss": result["loss"],
        "exact_match": result.get("exact_match"),
        "field_accuracy": result.get("field_accuracy"),
    }


def table(rows: list[dict], task: str) -> str:
    lines = [
        f"Task `{task}` (examples/data/{task}), each method with its defaults "
        "(`graftlm train --method M --data ... --out ...`), scored on the unseen test file.",
        "",
        "| method | trainable params | adapter file | steps | train time | peak RSS | eval loss | exact match | field accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['file_mb']:.2f} MB | {r['steps']} "
            f"| {r['train_s']:.0f} s | {r['peak_gb']:.2f} GB | {r['eval_loss']:.4f} "
            f"| {r['exact_match']:.2f} | {r['field_accuracy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tickets")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--work", default=str(ROOT / "runs" / "methods"))
    parser.add_argument("--fresh", action="store_true", help="retrain even if a run exists")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_method(m, args.task, work, args.fresh) for m in args.methods]
    text = table(rows, args.task)
    print(text)
    (ROOT / "bench" / "results" / f"methods-{args.task}.md").write_text(text)
    readme = ROOT / "README.md"
    if args.task == "tickets" and START in readme.read_text():
        body = readme.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        readme.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", body))


if __name__ == "__main__":
    main()
