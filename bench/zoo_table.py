"""Print the task-zoo table (markdown) from the rows that `bench/recipe.py` appended.

    .venv/bin/python bench/zoo_table.py > /tmp/table.md

Reads `bench/results/zoo-{base,old-defaults,new-defaults,qlora,sweep}.jsonl`; for each task and
column it takes the newest row (a task's rows after a change of its data replace the older ones).
The "best swept setting" column comes from `bench/results/zoo-sweeps/<task>.json`
(`bench/zoo_sweep.py`: the best test score of a `graftlm sweep`, and the setting it recommended).
Cells hold greedy exact match on the task's held-out test file (for JSON answers also field
accuracy, where the row has it), then the optimizer steps and the training seconds as measured
(under load: compare accuracies, not seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = [
    "bank_intent", "contact_card", "date_time", "quantities", "formal_rewrite", "order_total",
    "delivery_reply", "ticket_triage",
]  # fmt: skip
FIELD_TASKS = {"contact_card", "ticket_triage"}  # JSON answers: field accuracy shown too
COLUMNS = {
    "base": "base model",
    "old-defaults": "old defaults (1 epoch, cosine)",
    "new-defaults": "new defaults (adaptive)",
    "qlora": "QLoRA, new defaults",
    "sweep": "another setting tried (not a sweep)",
}


def newest(name: str) -> dict[str, dict]:
    """The last row per task of `zoo-<name>.jsonl` (empty when the file does not exist)."""
    path = RESULTS / f"zoo-{name}.jsonl"
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["task"].removeprefix("zoo/")] = row
    return rows


def cell(row: dict | None) -> str:
    if row is None:
        return "–"
    text = f"**{row['exact_match']:.3f}**"
    if row.get("field_accuracy") is not None and row["task"].removeprefix("zoo/") in FIELD_TASKS:
        text += f" fields {row['field_accuracy']:.2f}"
    if "steps" in row:
        text += f" ({row['steps']} steps, {row['train_s']:.0f} s)"
    if isinstance(row.get("settings"), dict):
        shown = {k: v for k, v in row["settings"].items() if k not in ("threads", "time_budget")}
        if shown and row.get("column") == "sweep":
            text += " " + ", ".join(f"{k}={v}" for k, v in shown.items())
    return text


def swept(task: str) -> str:
    """The best test score of the task's sweep, its setting, and the recommended setting."""
    path = RESULTS / "zoo-sweeps" / f"{task}.json"
    if not path.exists():
        return "–"
    sweep = json.loads(path.read_text())
    rows = {row["setting"]: row for row in sweep["rows"]}
    # a sweep with --seeds names its best by setting, scored by the mean over its runs
    settings = {s["setting"]: s for s in sweep.get("settings", sweep["rows"])}
    best = settings[sweep["best"]]
    length = f"{best['seeds']} seeds" if "seeds" in best else f"{best['steps']} steps"
    text = f"**{best['test_score']:.3f}** {best['setting']} ({length})"
    if sweep["recommended"] not in (sweep["best"], *best.get("runs", ())):
        chosen = rows[sweep["recommended"]]
        text += f"; recommended {chosen['setting']}: {chosen['test_score']:.3f}"
    return text + f" [{len(settings)} settings]"


def main() -> None:
    tables = {name: newest(name) for name in COLUMNS}
    header = [*COLUMNS.values(), "best swept setting (`graftlm sweep`)"]
    print("| task | " + " | ".join(header) + " | why the adaptive run stopped |")
    print("|---" * (len(header) + 2) + "|")
    for task in TASKS:
        cells = []
        for name in COLUMNS:
            row = tables[name].get(task)
            if row is not None:
                row = {**row, "column": name}
            cells.append(cell(row))
        cells.append(swept(task))
        adaptive = tables["new-defaults"].get(task) or {}
        why = (adaptive.get("validation") or {}).get("stopped", "")
        print(f"| {task} | " + " | ".join(cells) + f" | {why} |")


if __name__ == "__main__":
    main()
