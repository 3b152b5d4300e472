"""`graftlm compare`: train every method on the same data and put them side by side."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")

DEFAULT_METHODS = "full,lora,qlora"


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train several methods on the same data; compare memory, time, storage, task "
        "score and forgetting (compare.md / .json / .png)",
    )
    p.add_argument("--data", required=True, help="training rows (.jsonl/.csv/.parquet)")
    p.add_argument("--test", required=True, help="rows to score each method on (same format)")
    p.add_argument("--out", required=True, help="folder for compare.* and the runs")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated methods, each with its recipe; 'lora:16' sets a rank "
        f"(default: {DEFAULT_METHODS})",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--keep", default=None, help="the forgetting meter's keep set")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length on --test")
    p.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after '--': flags for every `graftlm train` (e.g. -- --steps 20 --keep-limit 0)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.train.compare import CompareConfig, MethodSpec, compare

    methods = [MethodSpec.parse(m) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise GraftError("--methods: name at least one method")
    extra = list(args.train_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    rows = compare(
        CompareConfig(
            data=args.data, test=args.test, out=args.out, methods=methods, model=args.model,
            train_args=extra, keep=args.keep, max_new_tokens=args.max_new_tokens,
        )
    )  # fmt: skip
    print((Path(args.out) / "compare.md").read_text(encoding="utf-8"))
    logger.info("compare: %d methods written to %s", len(rows), args.out)
    return 0
