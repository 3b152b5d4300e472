"""`graftlm sweep`: one adapter per method x rank x learning rate (x blocks, x seed), scored, with a
recommendation."""

from __future__ import annotations

import argparse
import json
import os

from graftlm.errors import GraftError
from graftlm.train.config import TrainConfig


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train several settings (rank, learning rate, method) and recommend one",
        description="Train one adapter per setting on the same data, score each on a held-out "
        "validation split (and --test), write DIR/sweep.json, DIR/sweep.png and copy the "
        "recommended adapter (the smallest and fastest within one point of the best) to "
        "DIR/best/.",
    )
    p.add_argument("--data", required=True, help="training data file")
    p.add_argument("--out", required=True, help="output folder of the sweep")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--methods", default="lora", help="comma-separated methods (default: lora)")
    p.add_argument(
        "--ranks", default="4,8,16,32", help="comma-separated ranks (default: 4,8,16,32)"
    )
    p.add_argument(
        "--lrs", default=None, help="comma-separated learning rates (default: per method)"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated block selections for LoRA, QLoRA, DoRA and AdaLoRA: all, "
        "top-half, top-K, 15-29 (default: all, every block)",
    )
    p.add_argument("--test", default=None, help="a test file: score each setting on it too")
    p.add_argument("--resume", action="store_true", help="skip the settings already finished")
    p.add_argument("--max-epochs", type=float, default=None, help="longest run per setting")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per setting at most")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="the seed of every run (default: 0)")
    seeds.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: each setting trains once per seed, and settings are "
        "compared by their mean score (one seed's luck can move a score by 10 points)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    # imported here: the sweep pulls in torch and transformers, `graftlm --help` should not
    from graftlm.train.sweep import settings_of, sweep

    # bad values fail before loading
    settings = settings_of(args.methods, args.ranks, args.lrs, args.seeds, args.layers)
    values = {"data": args.data, "out": args.out, "model": args.model, "seed": args.seed}
    if args.max_epochs is not None:
        values["max_epochs"] = args.max_epochs
    if args.time_budget is not None:
        values["time_budget"] = args.time_budget
    base = TrainConfig(**values)
    if not os.path.isfile(args.data):
        raise GraftError(f"--data {args.data}: file not found")
    result = sweep(base, settings, args.out, test=args.test, resume=args.resume,
                   progress=not args.quiet)  # fmt: skip
    for row in result["rows"]:
        print(json.dumps(row))
    if any(s["seeds"] > 1 for s in result["settings"]):
        for summary in result["settings"]:
            print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    print(f"recommended: {result['recommended']} ({result['why']}); adapter in {args.out}/best")
    return 0
