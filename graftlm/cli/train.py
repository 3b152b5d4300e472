"""`graftlm train`: flags built from TrainConfig's fields, YAML settings, torchrun launch."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from graftlm.errors import GraftError
from graftlm.train.config import TrainConfig
from graftlm.train.launch import launch_local, launched_by_torchrun

logger = logging.getLogger("graftlm")

# The CLI imports torch-backed modules inside each command, so that `graftlm --help` and
# argument errors answer at once instead of after several seconds of importing torch.


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a base model on a data file",
        description="Fine-tune with LoRA/QLoRA.",
    )
    p.add_argument("--config", help="YAML file of settings (flags given here override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool) and f.default is not True:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if f.type in ("bool", bool, "bool | None"):  # on by default, or unset = method's default
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )  # fmt: skip
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
            str(f.type), str
        )
        default = f.default if f.default is not dataclasses.MISSING else None
        p.add_argument(
            flag, type=kind, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})"
        )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="train with N processes on this machine (starts torchrun for you); "
        "for several machines run `torchrun ... -m graftlm train` yourself",
    )
    p.set_defaults(func=cmd_train)


def build_train_config(args: argparse.Namespace) -> Any:
    """Defaults < YAML file < flags, all through TrainConfig."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise GraftError(f"--config {args.config}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise GraftError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise GraftError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values, source=args.config or "command line")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_train_config(args)
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        if nproc < 1:
            raise GraftError(f"--nproc should be a positive integer, got {nproc!r}")
        if launched_by_torchrun():
            raise GraftError(
                "--nproc starts torchrun itself; under torchrun leave it out "
                "(torchrun's --nproc-per-node sets the process count)"
            )
        if nproc > 1:  # this process only waits: it never imports torch
            return launch_local(cfg, nproc, quiet=args.quiet, debug=args.debug)
    # torch-backed: imported only here, so `graftlm --help` and the --nproc launcher above
    # never wait for torch
    from graftlm.train.distributed import Runtime
    from graftlm.train.loop import train

    with Runtime.from_env() as runtime:
        if not runtime.is_main:
            logger.setLevel(logging.WARNING)  # rank 0 speaks for the run
        result = train(cfg, runtime=runtime, progress=not args.quiet)
        code = 130 if result.interrupted else 0
        if runtime.is_main and not result.interrupted:
            print(
                f"done: {result.steps} steps in {result.train_seconds:.0f} s, final loss {result.final_loss:.4f}"
                + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                + f"; adapter in {result.out}"
                + (f" ({runtime.world_size} processes)" if runtime.distributed else "")
            )
    if runtime.distributed:
        # Every rank has left the process group after a barrier and all files are written.
        # Interpreter teardown with gloo's threads still being destroyed can abort a worker
        # ("terminate called without an active exception", seen once in CI) and turn a finished
        # run into a failed one, so a distributed worker ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
