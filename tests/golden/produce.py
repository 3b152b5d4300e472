"""Write every file format graftlm produces, on a fixed seed, and print their SHA-256 as JSON.

Run as ``python tests/golden/produce.py WORKDIR MANIFEST.json`` (from the repository root). It goes through the
public API and the CLI only, so the same script runs on the code from before the "one house plan"
restructure and on the code of today; ``tests/end_to_end/test_golden_files.py`` runs both on one
machine and asks for the same bytes.

What is compared: each method's adapter folder (adapter_config.json, weights, graftlm.json less
its time and peak memory), metrics.jsonl less its timing fields, the merged model folder, and the GGUF
adapter and merged files. Times and the checkpoint's pickles are left out (they hold the time).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

import helpers  # noqa: E402

from graftlm.cli import main as cli_main  # noqa: E402

try:  # the tree of before the restructure has it elsewhere
    from graftlm.train.config import TrainConfig  # noqa: E402
except ImportError:
    from graftlm.train_config import TrainConfig  # noqa: E402

METHODS = ("lora", "qlora", "adalora", "ia3", "bottleneck", "prompt", "prefix")
# metrics.jsonl fields that depend on the clock or the machine's load
TIMING = ("tokens_per_s", "elapsed_s", "seconds", "rss", "peak")
# Settings the adaptive recipe changed after the restructure (issue 18): new fields, and `epochs`,
# which the methods' recipes no longer fill in (they give `max_epochs`). graftlm.json records
# every setting, so these differ by design; with --steps none of them changes what a run computes.
# `force` (issue 20: train despite the plan's memory check) changes nothing a run computes either.
# Issue 19's settings (the lean AdamW, the forgetting meter) are off here or change nothing, and
# the meter's result (training.forgetting) is not written with --no-forgetting. NEFTune
# (`neftune_alpha`) is off here (given as 0 where a method's recipe turns it on) and then draws
# nothing; so is the weight average
# (`ema_decay`), which then keeps no average. The validation split (`validation_split`) is
# drawn only by adaptive runs, and these runs have a fixed length. `layers` is unset: every
# block, as before the setting.
RECIPE_SETTINGS = (
    "max_epochs", "patience", "time_budget", "lora_init", "epochs", "force",
    "lean_optimizer", "forgetting", "keep", "keep_limit", "neftune_alpha", "ema_decay",
    "validation_split", "layers",
)  # fmt: skip


def _rows(n: int = 24) -> list[dict]:
    colours = ["red", "green", "blue", "amber"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Ticket {i}: the {colours[i % 4]} light blinks."},
                {"role": "assistant", "content": f"Category: {colours[i % 4]}"},
            ]
        }
        for i in range(n)
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strip_metrics(text: str) -> str:
    rows = []
    for line in text.splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not any(t in k for t in TIMING)})
    return "\n".join(json.dumps(r, sort_keys=True) for r in rows)


def _digest_folder(folder: Path, out: dict, prefix: str, root: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or "checkpoint" in path.parts or path.suffix == ".png":
            continue
        key = f"{prefix}/{path.relative_to(folder)}"
        if path.name == "graftlm.json":
            data = json.loads(path.read_text())
            data.pop("created", None)
            data.get("training", {}).pop("train_seconds", None)
            data.get("training", {}).get("memory", {}).pop("peak_rss_bytes", None)
            for setting in RECIPE_SETTINGS:
                data.get("training", {}).get("settings", {}).pop(setting, None)
            out[key] = _sha(json.dumps(data, sort_keys=True).replace(str(root), "ROOT").encode())
        elif path.name == "metrics.jsonl":
            out[key] = _sha(_strip_metrics(path.read_text()).encode())
        elif path.suffix == ".json":  # they name the base folder, which differs run to run
            out[key] = _sha(path.read_text().replace(str(root), "ROOT").encode())
        else:
            out[key] = _sha(path.read_bytes())


def produce(root: Path) -> dict[str, str]:
    torch.manual_seed(0)
    base = helpers.save_tiny_model_dir(root / "base", "llama", seed=0)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    digests: dict[str, str] = {}
    for method in METHODS:
        out = root / method
        args = [
            "train",
            "--model",
            str(base),
            "--data",
            str(data),
            "--out",
            str(out),
            "--method",
            method,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--seq-len",
            "64",
            "--dtype",
            "float32",
            "--seed",
            "0",
            "--threads",
            "1",
            "--quiet",
        ]
        if "forgetting" in TrainConfig.__dataclass_fields__:  # absent before issue 19
            args.append("--no-forgetting")
        if method in ("lora", "qlora") and "neftune_alpha" in TrainConfig.__dataclass_fields__:
            # the LoRA family's recipe gained NEFTune after the restructure (issue 18, alpha 5;
            # bench/results/zoo.md): off, given, is the same run in both trees
            args += ["--neftune-alpha", "0"]
        if method == "qlora":
            # QLoRA's recipe changed after the restructure (issue 18: float32 low-memory runs no
            # longer recompute layers, so rows share their prompt's forward): the same explicit
            # setting makes both trees compute the same run
            args.append("--no-activation-checkpointing")
        if method == "adalora":
            # AdaLoRA's default learning rate changed after the restructure (issue 18: 5e-3 ->
            # 2e-3, bench/results/zoo.md): the old default, given, is the same run in both trees
            args += ["--lr", "5e-3"]
        if method == "ia3":
            # IA3's default layers changed after the restructure (issue 18: PEFT's k_proj,
            # v_proj, down_proj -> all-linear): the old default layers, given, are the same run
            args += ["--targets", "k_proj,v_proj,down_proj"]
        assert cli_main(args) == 0, method
        _digest_folder(out, digests, method, root)
    merged = root / "merged"
    assert (
        cli_main(
            ["merge", "--adapter", str(root / "lora"), "--out", str(merged), "--model", str(base)]
        )
        == 0
    )
    _digest_folder(merged, digests, "merged", root)
    gguf_adapter = root / "lora.gguf"
    assert (
        cli_main(
            [
                "export",
                "--adapter",
                str(root / "lora"),
                "--format",
                "gguf",
                "--out",
                str(gguf_adapter),
                "--model",
                str(base),
            ]
        )
        == 0
    )
    digests["lora.gguf"] = _sha(gguf_adapter.read_bytes())
    return digests


if __name__ == "__main__":
    target, manifest = Path(sys.argv[1]), Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(produce(target), indent=1, sort_keys=True) + "\n")
