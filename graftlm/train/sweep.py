"""`graftlm sweep`: train one adapter per setting (method x rank x learning rate), score each on
validation (and on a test file), and recommend the smallest, fastest setting within a point of
the best score.

With `--seeds 0,1,2` every setting trains once per seed, and settings are compared by their
mean score over the seeds. Why: on the zoo's ticket_triage the seed alone moves one LoRA
recipe's held-out exact match by 12.5 points (bench/results/zoo.md, "Seeds"), more than most
differences between settings, so a one-seed sweep often recommends its luckiest run.

The base model and the tokenized data are loaded once and shared by every run (each trains a
copy of the base). Every finished run is written to `DIR/runs/<setting>/` and recorded in
`DIR/sweep.json` at once, so Ctrl-C keeps what finished and `--resume` skips it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.adapters.blocks import check_block_spec
from graftlm.adapters.io import load_any
from graftlm.data.dataset import load_dataset
from graftlm.errors import GraftError
from graftlm.methods import method_module
from graftlm.methods.lora.files import atomic_write_json
from graftlm.train.adaptive import pad_token_id
from graftlm.train.config import LAYERED_METHODS, METHODS, TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.forward import training_device
from graftlm.train.loop import Prepared, compute_dtype_for, prepare, train
from graftlm.train.validation import greedy_exact_match

logger = logging.getLogger("graftlm")

RESULTS = "sweep.json"
PLOT = "sweep.png"
BEST = "best"
# "within one point": settings this close to the best score count as equally good
TOLERANCE = 0.01
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "graftlm.json")


@dataclass(frozen=True)
class Setting:
    """One point of the sweep."""

    method: str
    rank: int | None
    lr: float | None
    seed: int | None = None  # None: the sweep's --seed
    layers: str | None = None  # --layers: the blocks adapted (None: every block)

    @property
    def group(self) -> str:
        """The setting's name without its seed: the runs that are averaged together."""
        rank = f"-r{self.rank}" if self.rank is not None else ""
        lr = f"-lr{self.lr:g}" if self.lr is not None else ""
        # a sweep's block selection holds no commas (--layers splits on them)
        layers = f"-layers{self.layers}" if self.layers is not None else ""
        return f"{self.method}{rank}{lr}{layers}"

    @property
    def name(self) -> str:
        """The run's name (its folder under runs/)."""
        return self.group + (f"-s{self.seed}" if self.seed is not None else "")


def split_items(flag: str, text: str) -> list[str]:
    """The comma-separated items of a flag's value; none at all is a one-line error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GraftError(f"{flag}: no values in {text!r}")
    return items


def parse_list(flag: str, text: str | None, kind: type, lowest: float = 0) -> list:
    """`--ranks 4,8,16` -> [4, 8, 16], every value above `lowest` (0: positive; -1: seeds,
    where 0 is one); a bad item is a one-line error naming the flag and item."""
    if text is None:
        return [None]
    values = []
    for item in split_items(flag, text):
        try:
            value = kind(item)
        except ValueError:
            value = None
        if value is None or value <= lowest or (kind is int and isinstance(value, bool)):
            noun = "a positive integer" if kind is int else "a positive number"
            noun = "an integer >= 0" if lowest < 0 else noun
            raise GraftError(f"{flag}: {item!r} is not {noun} (in {text!r})")
        values.append(value)
    return values


def settings_of(
    methods: str, ranks: str | None, lrs: str | None, seeds: str | None = None,
    layers: str | None = None,
) -> list[Setting]:  # fmt: skip
    """Every combination, in order; methods without a rank (ia3, prompt, ...) once per lr;
    with `seeds`, each of them once per seed; with `layers` ("all,top-half"), once per block
    selection for the methods that take one (LoRA, QLoRA, DoRA, AdaLoRA)."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise GraftError(f"--methods: unknown {unknown or methods!r}; known: {', '.join(METHODS)}")
    rank_values, lr_values = parse_list("--ranks", ranks, int), parse_list("--lrs", lrs, float)
    seed_values = parse_list("--seeds", seeds, int, lowest=-1)
    layer_values = parse_layers(layers)
    out = []
    for method in names:
        # a rank only for methods whose recipe has one (LoRA, QLoRA, AdaLoRA)
        method_ranks = rank_values if "rank" in method_module(method).DEFAULTS else [None]
        method_layers = layer_values if method in LAYERED_METHODS else [None]
        out += [
            Setting(method, r, lr, seed, chosen)
            for r in method_ranks
            for lr in lr_values
            for chosen in method_layers
            for seed in seed_values
        ]
    return list(dict.fromkeys(out))


def parse_layers(text: str | None) -> list[str | None]:
    """`--layers all,top-half,20-29` -> [None, "top-half", "20-29"] ("all": every block; a
    selection of several ranges, which holds commas itself, is `train --layers`' alone); a bad
    item is a one-line error naming the flag and item."""
    if text is None:
        return [None]
    values = []
    for item in split_items("--layers", text):
        if item == "all":
            values.append(None)
            continue
        try:
            check_block_spec(item)
        except GraftError as exc:
            raise GraftError(f"--{exc} (in {text!r})") from None
        values.append(item)
    return values


def sweep(
    base: TrainConfig, settings: list[Setting], out: str | os.PathLike, *,
    test: str | None = None, resume: bool = False, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Run every setting on `base`'s data; returns {"rows" (one per run), "settings" (one
    per setting: its runs' mean scores, see `summarize`), "recommended" (the run copied to
    best/), "why"}.

    Raises:
        GraftError: `out` holds a sweep and `resume` is off; bad data or settings.
    """
    out = Path(out)
    results = out / RESULTS
    if results.exists() and not resume:
        raise GraftError(f"{out} already holds a sweep ({RESULTS}); use --resume or another --out")
    rows = json.loads(results.read_text()) if results.exists() else []
    done = {row["setting"] for row in rows}
    runtime = Runtime.single()
    device = training_device()
    compute_dtype = compute_dtype_for(base.dtype, device)
    prepared = prepare(base.with_method_defaults(), runtime, device, compute_dtype)
    test_examples = load_dataset(test, prepared.tokenizer, base.seq_len)[0] if test else None
    for setting in settings:
        if setting.name in done:
            logger.info("sweep: %s already done, skipped", setting.name)
            continue
        row = _run(base, setting, out, prepared, test_examples, compute_dtype, progress)
        if row is None:  # Ctrl-C: the run stopped at a step; the finished ones are kept
            raise GraftError(
                f"sweep interrupted during {setting.name}: {len(rows)} finished run(s) kept in "
                f"{out / RESULTS}; --resume continues with the others"
            )
        rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(results, rows)
    recommended, why = recommend(rows)
    _copy_best(out, recommended)
    draw(rows, recommended, out / PLOT)
    logger.info("sweep: recommended %s: %s", recommended["setting"], why)
    return {
        "rows": rows,
        "settings": summarize(rows),
        "recommended": recommended["setting"],
        "why": why,
    }


def _run(
    base, setting, out, prepared: Prepared, test_examples, compute_dtype, progress
) -> dict | None:
    """Train one setting; its row for sweep.json, or None when Ctrl-C stopped it."""
    folder = out / "runs" / setting.name
    shutil.rmtree(folder, ignore_errors=True)  # a run cut off before it finished starts over
    changes = {"method": setting.method, "out": str(folder)}
    given = (
        ("rank", setting.rank), ("lr", setting.lr), ("seed", setting.seed),
        ("layers", setting.layers),
    )  # fmt: skip
    changes.update({k: v for k, v in given if v is not None})
    cfg = dataclasses.replace(base, **changes)
    logger.info("sweep: training %s", setting.name)
    # qlora quantizes its own copy of the base; the shared one stays full precision
    result = train(cfg, progress=progress, prepared=prepared)
    if result.interrupted:
        return None
    training = json.loads((folder / "graftlm.json").read_text())["training"]
    validation = training.get("validation") or {}
    score = validation.get("best_exact_match")
    row = {
        "setting": setting.name,
        "group": setting.group,
        "method": setting.method,
        "rank": setting.rank,
        "layers": setting.layers or "all",
        "lr": training["settings"]["lr"],
        "seed": cfg.seed,
        "score": score,
        "metric": validation.get("metric", "answer_loss"),
        "eval_loss": result.eval_loss,
        "adapter_mb": round((folder / "adapter_model.safetensors").stat().st_size / 1e6, 3),
        "trainable_parameters": result.trainable_parameters,
        "train_s": round(result.train_seconds, 1),
        "peak_rss_mb": round((result.memory or {}).get("peak_rss_bytes", 0) / 1e6, 1),
        "steps": result.steps,
    }
    if test_examples:
        row["test_score"] = _test_score(folder, prepared, test_examples, cfg, compute_dtype)
    return row


def _test_score(folder, prepared: Prepared, examples, cfg, compute_dtype) -> float:
    """Greedy exact match of the run's adapter on the test examples."""
    model = copy.deepcopy(prepared.model)
    load_any(model, folder)
    return round(
        greedy_exact_match(model, prepared.tokenizer, examples, pad_token_id(prepared.tokenizer),
                           compute_dtype),
        4,
    )  # fmt: skip


def _score_key(rows: list[dict]) -> str:
    """What the rows are compared by: test exact match when every row has one, else
    validation exact match, else (paragraph answers, no exact match) "eval_loss"."""
    key = "test_score" if all("test_score" in r for r in rows) else "score"
    return key if all(r.get(key) is not None for r in rows) else "eval_loss"


def summarize(rows: list[dict]) -> list[dict]:
    """One row per setting (runs of its seeds together), in the order of first appearance:
    the mean score, eval loss and train seconds over its runs, the score's spread across
    seeds (`score_sd`, population), and the number of runs (`seeds`)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:  # a sweep.json of an older graftlm has no "group": one run per setting
        groups.setdefault(row.get("group", row["setting"]), []).append(row)
    key = _score_key(rows) if rows else "score"
    out = []
    for group, runs in groups.items():
        n = len(runs)
        summary = {"setting": group, "seeds": n, "runs": [r["setting"] for r in runs]}
        for field in ("score", "test_score", "eval_loss", "train_s"):
            if all(r.get(field) is not None for r in runs):
                summary[field] = sum(r[field] for r in runs) / n
        values = [r[key] for r in runs]
        mean = sum(values) / n
        summary["score_sd"] = (sum((v - mean) ** 2 for v in values) / n) ** 0.5
        summary["adapter_mb"] = max(r["adapter_mb"] for r in runs)
        out.append(summary)
    return out


def recommend(rows: list[dict]) -> tuple[dict, str]:
    """The smallest and fastest setting within TOLERANCE of the best mean score over its seeds,
    and why; returns that setting's best run (the adapter best/ holds)."""
    if not rows:
        raise GraftError("the sweep has no finished runs to recommend from")
    key = _score_key(rows)
    settings = summarize(rows)
    if key != "eval_loss":
        best = max(s[key] for s in settings)
        close = [s for s in settings if s[key] >= best - TOLERANCE]
        label = f"{key.replace('_', ' ')} {best:.2f}"
    else:  # paragraph answers: judged by answer loss, lower is better
        best = min(s["eval_loss"] for s in settings)
        close = [s for s in settings if s["eval_loss"] <= best * (1 + TOLERANCE)]
        label = f"eval loss {best:.4f}"
    chosen = min(close, key=lambda s: (s["adapter_mb"], s["train_s"]))
    others = len(close) - 1
    seeds = max(s["seeds"] for s in settings)
    averaged = f", the mean of {seeds} seeds" if seeds > 1 else ""
    why = (
        f"the smallest and fastest of {len(close)} setting(s) within one point of the best "
        f"({label}{averaged}): {chosen['adapter_mb']:.1f} MB, {chosen['train_s']:.0f} s"
        + (f"; {others} other(s) as good but larger or slower" if others else "")
    )
    runs = [r for r in rows if r["setting"] in chosen["runs"]]
    sign = -1 if key == "eval_loss" else 1
    best_run = max(runs, key=lambda r: sign * r[key])
    if len(runs) > 1:
        why += f"; its best seed's adapter ({best_run['setting']})"
    return best_run, why


def _copy_best(out: Path, row: dict) -> None:
    source = out / "runs" / row["setting"]
    target = out / BEST
    tmp = out / (BEST + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def pareto(rows: list[dict], cost: str, score: str) -> list[dict]:
    """Rows no other row beats on both `cost` (lower) and `score` (higher)."""
    return [
        r for r in rows
        if not any(o[cost] <= r[cost] and o[score] >= r[score] and o != r
                   and (o[cost] < r[cost] or o[score] > r[score]) for o in rows)
    ]  # fmt: skip


def draw(rows: list[dict], recommended: dict, path: Path) -> None:
    """sweep.png: each setting's score (its mean over seeds) against adapter size and against
    train time, the Pareto fronts marked; with several seeds, each run as a small grey dot."""
    import matplotlib  # optional for the library, heavy: only a sweep draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, settings = _score_key(rows), summarize(rows)
    if key == "eval_loss":  # higher is better on the plot, as for exact match
        rows = [{**r, "neg_loss": -r["eval_loss"]} for r in rows]
        settings = [{**s, "neg_loss": -s["eval_loss"]} for s in settings]
        key = "neg_loss"
    several = any(s["seeds"] > 1 for s in settings)
    chosen = next(s for s in settings if recommended["setting"] in s["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, cost, label in (
        (axes[0], "adapter_mb", "adapter MB"),
        (axes[1], "train_s", "train s"),
    ):
        if several:
            axis.scatter([r[cost] for r in rows], [r[key] for r in rows], s=8, color="lightgrey",
                         label="one seed's run")  # fmt: skip
        axis.scatter([s[cost] for s in settings], [s[key] for s in settings], color="grey")
        front = sorted(pareto(settings, cost, key), key=lambda s: s[cost])
        axis.plot([s[cost] for s in front], [s[key] for s in front], "o-", color="tab:blue",
                  label="Pareto front")  # fmt: skip
        axis.scatter([chosen[cost]], [chosen[key]], marker="*", s=200, color="tab:red",
                     label="recommended", zorder=3)  # fmt: skip
        for s in settings:
            axis.annotate(s["setting"], (s[cost], s[key]), fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel(key.replace("_", " ") + (" (mean over seeds)" if several else ""))
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "Setting",
    "parse_list",
    "settings_of",
    "sweep",
    "summarize",
    "recommend",
    "pareto",
    "draw",
]
