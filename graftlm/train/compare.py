"""`graftlm compare`: every method on the same data, with its own recipe, side by side.

For each method, `graftlm train` runs in its own process (so the peak RSS is that run's alone;
graftlm.json records it, before the forgetting meter loads anything), then the adapter is
scored here on `--test` (greedy exact match). One row per method:

- trainable parameters, and their share of the base's;
- peak RSS of the training process, and the part that is optimizer state (AdamW's moments);
- training seconds;
- storage per adaptation: the bytes of the files the method writes (adapter weights and
  config; a full fine-tune's whole model folder), training logs and checkpoint left out;
- task score on `--test`;
- forgetting: `kept_exact`, `kl`, `ppl_ratio` (`infer/forgetting.py`).

Written to `OUT/compare.json`, `OUT/compare.md` and `OUT/compare.png`; the runs stay in
`OUT/runs/<method>/`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.adapters.folder import atomic_write_bytes, atomic_write_json
from graftlm.data.dataset import read_rows
from graftlm.errors import GraftError
from graftlm.infer.evaluate import evaluate_file
from graftlm.infer.forgetting import read_keep_rows
from graftlm.infer.generate import load_for_inference
from graftlm.methods import REGISTRY
from graftlm.models.load import BUILTIN_NAME, load_model

logger = logging.getLogger("graftlm")

# files of a run folder that are training records, not the adaptation
NOT_STORAGE = {"metrics.jsonl", "loss.png", "graftlm.json"}


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a `--method` value, and a rank where one is given
    (`lora:16`)."""

    method: str
    rank: int | None = None

    @property
    def label(self) -> str:
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """`lora`, `qlora`, `full`, or `lora:16` (a rank).

        Raises:
            GraftError: an unknown method or a rank that is not a positive integer.
        """
        name, _, rank = text.strip().partition(":")
        if name not in REGISTRY:
            raise GraftError(f"--methods: unknown method {name!r}; known: {', '.join(REGISTRY)}")
        if rank and (not rank.isdigit() or int(rank) <= 0):
            raise GraftError(
                f"--methods: {text!r}: the rank after ':' should be a positive integer"
            )
        return cls(name, int(rank) if rank else None)


@dataclass
class CompareConfig:
    """What `graftlm compare` runs (the CLI builds it)."""

    data: str
    test: str
    out: str
    methods: list[MethodSpec]
    model: str = BUILTIN_NAME
    train_args: list[str] = field(default_factory=list)  # passed to every `graftlm train`
    keep: str | None = None
    max_new_tokens: int = 64


def check_inputs(cfg: CompareConfig) -> None:
    """Refuse bad input before any training: missing files, a `--test` file in another row
    format than `--data`, a keep set without usable rows (each error names the file).

    Raises:
        GraftError: as above.
    """
    for flag, path in (("--data", cfg.data), ("--test", cfg.test), ("--keep", cfg.keep)):
        if path is not None and not Path(path).is_file():
            raise GraftError(f"{flag} {path}: file not found")
    _, data_format = read_rows(cfg.data)
    _, test_format = read_rows(cfg.test)
    if test_format != data_format:
        raise GraftError(
            f"--test {cfg.test}: rows are {test_format}, but --data {cfg.data} holds "
            f"{data_format} rows; score the task on rows of the same format"
        )
    if cfg.keep is not None:
        read_keep_rows(cfg.keep)
    if Path(cfg.out).exists() and (Path(cfg.out) / "compare.json").exists():
        raise GraftError(f"--out {cfg.out}: holds a comparison already (compare.json)")


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Train and score every method of `cfg`; write compare.json/.md/.png; return the rows."""
    check_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    total = base_parameter_count(cfg.model)
    rows = []
    for spec in cfg.methods:
        logger.info("compare: training %s", spec.label)
        folder = train_in_subprocess(cfg, spec, out / "runs" / spec.label)
        rows.append(method_row(cfg, spec, folder, total))
        atomic_write_json(out / "compare.json", {"model": cfg.model, "rows": rows})
    write_markdown(out / "compare.md", cfg, rows)
    write_plot(out / "compare.png", rows)
    return rows


def base_parameter_count(model: str) -> int:
    """Parameters of the base model (shared tensors once)."""
    base, _ = load_model(model)
    return sum(p.numel() for p in base.parameters())


def train_in_subprocess(cfg: CompareConfig, spec: MethodSpec, folder: Path) -> Path:
    """`graftlm train` for one method in its own process; its output folder."""
    args = [
        sys.executable, "-m", "graftlm", "train", "--method", spec.method, "--data", cfg.data,
        "--out", str(folder), "--model", cfg.model, "--quiet",
    ]  # fmt: skip
    if spec.rank is not None:
        args += ["--rank", str(spec.rank)]
    if cfg.keep is not None:
        args += ["--keep", cfg.keep]
    args += cfg.train_args
    done = subprocess.run(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise GraftError(
            f"compare: `graftlm train --method {spec.method}` failed (exit {done.returncode})"
        )
    return folder


def storage_bytes(folder: Path) -> int:
    """Bytes of the files a run writes as its adaptation (see the module docstring)."""
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and p.name not in NOT_STORAGE and not p.name.startswith(".")
    )


def method_row(cfg: CompareConfig, spec: MethodSpec, folder: Path, total: int) -> dict[str, Any]:
    """One row of compare.json from a finished run folder and a score on `--test`."""
    graft = json.loads((folder / "graftlm.json").read_text(encoding="utf-8"))
    training = graft["training"]
    memory = training.get("memory") or {}
    model, tokenizer = load_for_inference(cfg.model, {"default": str(folder)})
    score = evaluate_file(
        model, tokenizer, cfg.test, generate=True, max_new_tokens=cfg.max_new_tokens
    )
    forgetting = training.get("forgetting") or {}
    trainable = int(graft["trainable_parameters"])
    return {
        "method": spec.label,
        "trainable_parameters": trainable,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "peak_rss_bytes": memory.get("peak_rss_bytes"),
        "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
        "train_seconds": training.get("train_seconds"),
        "steps": training.get("steps"),
        # methods stop at different steps (each its own recipe): the time of one step compares
        # their cost, the total their recipes
        "seconds_per_step": _per_step(training.get("train_seconds"), training.get("steps")),
        "storage_bytes": storage_bytes(folder),
        "exact_match": score.get("exact_match"),
        "test_loss": round(score["loss"], 5),
        "kept_exact": forgetting.get("kept_exact"),
        "kl": forgetting.get("kl"),
        "ppl_ratio": forgetting.get("ppl_ratio"),
        "folder": str(folder),
    }


def _per_step(seconds: float | None, steps: int | None) -> float | None:
    return None if seconds is None or not steps else round(seconds / steps, 3)


def _size(value: float | None, unit: float, suffix: str, digits: int = 2) -> str:
    return "-" if value is None else f"{value / unit:.{digits}f} {suffix}"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(path: Path, cfg: CompareConfig, rows: list[dict[str, Any]]) -> None:
    """compare.md: the table, one row per method."""
    lines = [
        f"`graftlm compare` on `{cfg.model}`: data `{cfg.data}`, test `{cfg.test}`"
        + (f", train args `{' '.join(cfg.train_args)}`" if cfg.train_args else ""),
        "",
        "| method | trainable params | % | peak RSS | optimizer state | train time (steps) "
        "| s/step | storage | exact match | kept_exact | kl | ppl_ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.3f} "
            f"| {_size(r['peak_rss_bytes'], 1e9, 'GB')} "
            f"| {_size(r['optimizer_state_bytes'], 1e6, 'MB', 1)} "
            f"| {_num(r['train_seconds'], 0)} s ({r.get('steps') or '-'}) "
            f"| {_num(r.get('seconds_per_step'), 2)} | {_size(r['storage_bytes'], 1e6, 'MB', 2)} "
            f"| {_num(r['exact_match'], 3)} | {_num(r['kept_exact'], 3)} | {_num(r['kl'], 4)} "
            f"| {_num(r['ppl_ratio'], 3)} |"
        )
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """compare.png: one bar chart per column that differs most between methods."""
    # matplotlib is slow to import: only here, once the runs are done
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("peak RSS (GB)", "peak_rss_bytes", 1e9),
        ("train time (s)", "train_seconds", 1.0),
        ("storage (MB)", "storage_bytes", 1e6),
        ("exact match on --test", "exact_match", 1.0),
        ("kept_exact", "kept_exact", 1.0),
        ("kl from the base (nats/token)", "kl", 1.0),
    ]
    labels = [r["method"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (title, key, unit) in zip(axes.flat, panels):
        values = [(r[key] or 0) / unit for r in rows]
        ax.bar(labels, values, color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
