"""Which validation split picks the adapter that generalises: a random one, or one whose phrasings
training never saw?

The adaptive recipe keeps the adapter of its best validation score. Its validation split is random
(`graftlm.train.validation.split_validation`), so every validation phrasing also occurs in training,
and on the zoo validation exact match reaches 0.96-1.00 while the held-out test (new phrasings by
construction) reads 0.3-0.7 (bench/results/zoo.md). A split that holds out whole phrasings might
rank the adapters along a run the way the test does.

One run per call, on a zoo task:

- two validation splits of `--rows` rows each, both left out of training: "random" (as the recipe
  draws it) and "unseen" (every row that holds one of a few word pairs of the prompt, drawn at
  random among pairs that occur in 1-5% of the rows, so training never sees that pair; the
  selection of `graftlm train --validation-split phrasings`, `graftlm.train.phrasing_split`);
- the recipe's defaults, with the stop rule off (patience 1000), so the run goes to its longest
  length and evaluates 3 times an epoch;
- at every evaluation: greedy exact match and answer loss on both splits, and greedy exact match on
  the task's test file.

Each evaluation is a row of `--out` (JSON lines). `--report` reads them back and prints, per run:
the test score of the adapter that each split would keep (its best exact match, ties by loss) and
each split's rank correlation with the test over the evaluations.

    .venv/bin/python bench/validation_tracking.py --task zoo/ticket_triage --seed 1 \\
        --set threads=1 --out bench/results/validation-tracking.jsonl
    .venv/bin/python bench/validation_tracking.py --report bench/results/validation-tracking.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def prompt_text(row: dict) -> str:
    """The user's side of a row: every user message of a chat row, else its prompt/input."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
    return str(row.get("prompt") or row.get("input") or row.get("instruction") or "")


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run(task: str, seed: int, rows: int, overrides: dict, out: Path) -> None:
    """Train once on `task` with both splits held out, and append a row per evaluation."""
    from graftlm.data.dataset import load_dataset
    from graftlm.train import evaluation
    from graftlm.train.config import TrainConfig
    from graftlm.train.forward import evaluate
    from graftlm.train.loop import train
    from graftlm.train.phrasing_split import held_out_phrasings
    from graftlm.train.validation import greedy_exact_match

    data = [json.loads(x) for x in (DATA / task / "train.jsonl").read_text().splitlines() if x]
    unseen = held_out_phrasings([prompt_text(r) for r in data], rows, seed)
    unseen_rows = set(unseen)
    rest = [i for i in range(len(data)) if i not in unseen_rows]
    randomly = sorted(random.Random(f"random:{seed}").sample(rest, len(unseen)))
    held = unseen_rows | set(randomly)
    work = Path(tempfile.mkdtemp(prefix="valtrack-"))
    write_rows(work / "train.jsonl", [r for i, r in enumerate(data) if i not in held])
    write_rows(work / "random.jsonl", [data[i] for i in randomly])
    write_rows(work / "unseen.jsonl", [data[i] for i in unseen])
    print(f"{task}: {len(data) - len(held)} training rows, {len(randomly)} random and "
          f"{len(unseen)} unseen-phrasing validation rows", flush=True)  # fmt: skip

    cfg = TrainConfig(
        data=str(work / "train.jsonl"), eval_data=str(work / "random.jsonl"), out=str(work / "out"),
        seed=seed, time_budget=None, patience=1000, **overrides,
    )  # fmt: skip
    extra: dict[str, list] = {}
    original = evaluation.RunEvaluation._evaluate

    def scored(self, done: int, elapsed_s: float) -> dict:
        row_eval = original(self, done, elapsed_s)
        if not extra:  # tokenized once, with the run's own tokenizer and template
            for name, path in (
                ("unseen", work / "unseen.jsonl"),
                ("test", DATA / task / "test.jsonl"),
            ):
                extra[name] = load_dataset(str(path), self.tokenizer, cfg.seq_len)[0]
        args = (self.model, self.tokenizer)
        record = {
            "task": task, "seed": seed, "settings": overrides, "step": done,
            "random_exact": row_eval.get("exact_match"), "random_loss": row_eval["eval_loss"],
            "unseen_exact": greedy_exact_match(*args, extra["unseen"], self.pad_id, self.compute_dtype),
            "unseen_loss": evaluate(self.model, extra["unseen"], self.pad_id, self.compute_dtype,
                                    self.runtime, share_prefix=self.share_prefix)[0],
            "test_exact": greedy_exact_match(*args, extra["test"], self.pad_id, self.compute_dtype),
            "rows": {"random": len(randomly), "unseen": len(unseen), "test": len(extra["test"])},
        }  # fmt: skip
        print(json.dumps(record), flush=True)
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return row_eval

    evaluation.RunEvaluation._evaluate = scored
    train(cfg, progress=False)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 where a side is constant."""

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else 0.0


def kept(evals: list[dict], split: str, patience: int | None) -> dict:
    """The evaluation whose adapter a split would keep: best exact match, ties by the lower
    loss; with `patience`, among the evaluations before the stop rule would have fired."""
    best, since = None, 0
    for row in evals:
        key = (row[f"{split}_exact"], -row[f"{split}_loss"])
        if best is None or key > (best[f"{split}_exact"], -best[f"{split}_loss"]):
            best, since = row, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    return best


def report(path: Path) -> None:
    """Per run: the test score each split keeps (whole run, and with the recipe's patience 2),
    the best test score of any evaluation, and each split's rank correlation with the test."""
    runs: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        runs.setdefault((row["task"], row["seed"], json.dumps(row["settings"])), []).append(row)
    print("| task | seed | evals | test: best of any eval | random keeps | unseen keeps | "
          "random, patience 2 | unseen, patience 2 | rank corr. random / unseen with test |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, seed, _), evals in runs.items():
        evals.sort(key=lambda r: r["step"])
        test = [r["test_exact"] for r in evals]

        def cell(row: dict) -> str:
            return f"{row['test_exact']:.3f} (step {row['step']})"

        corr = [spearman([r[f"{s}_exact"] - 1e-6 * r[f"{s}_loss"] for r in evals], test)
                for s in ("random", "unseen")]  # fmt: skip
        print(f"| {task} | {seed} | {len(evals)} | {max(test):.3f} | "
              f"{cell(kept(evals, 'random', None))} | {cell(kept(evals, 'unseen', None))} | "
              f"{cell(kept(evals, 'random', 2))} | {cell(kept(evals, 'unseen', 2))} | "
              f"{corr[0]:+.2f} / {corr[1]:+.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="zoo/ticket_triage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=30, help="rows in each validation split")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE training settings")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/validation-tracking.jsonl"
    )
    parser.add_argument("--report", type=Path, help="summarise this file instead of training")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    from recipe import parse_value  # bench/recipe.py: the same KEY=VALUE reading

    overrides = {
        k.replace("-", "_"): parse_value(v) for k, v in (s.split("=", 1) for s in args.set)
    }
    run(args.task, args.seed, args.rows, overrides, args.out)


if __name__ == "__main__":
    main()
