"""`graftlm combine`: LoRA adapter folders into one (PEFT's `add_weighted_adapter`); and the
weighted mixes `graftlm serve --adapter mix=a:0.5,b:0.5` serves."""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import tempfile

from graftlm.adapters.combine_rules import HOWS
from graftlm.cli.infer import adapter_map
from graftlm.errors import GraftError


def add_combine(sub: argparse._SubParsersAction) -> None:
    """Register `graftlm combine` on the CLI's subparsers."""
    p = sub.add_parser(
        "combine",
        help="combine LoRA adapters into one (linear, cat, svd, ties, dare, magnitude_prune)",
        description="Write one LoRA adapter folder from several, with the numbers of PEFT's "
        "add_weighted_adapter. See README.md, 'Combining adapters'.",
    )
    p.add_argument(
        "--adapter", action="append", required=True, help="NAME=DIR (repeatable, in order)"
    )
    p.add_argument(
        "--weights", required=True, help="one weight per adapter, comma-separated: 0.7,0.3"
    )
    p.add_argument("--how", required=True, choices=HOWS, help="the combination rule")
    p.add_argument(
        "--density",
        type=float,
        default=None,
        help="fraction of entries kept, in (0, 1]: ties, dare_*, magnitude_prune (and _svd)",
    )
    p.add_argument(
        "--svd-rank", type=int, default=None, help="rank of an svd result (default: largest)"
    )
    p.add_argument(
        "--svd-clamp", type=float, default=None, help="clamp svd factors at this quantile"
    )
    p.add_argument(
        "--svd-full-matrices",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full (default, as PEFT) or reduced SVD",
    )
    p.add_argument(
        "--majority-sign",
        choices=["total", "frequency"],
        default="total",
        help="TIES' sign election (ties, dare_ties)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of DARE's random masks (torch.manual_seed)"
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model, for DARE's mask order only (default: the adapters' base)",
    )
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.set_defaults(func=cmd_combine)


def parse_weights(text: str) -> list[float]:
    """`--weights 0.7,0.3` as floats."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise GraftError(f"--weights: expected numbers separated by commas, got {text!r}") from None


def cmd_combine(args: argparse.Namespace) -> int:
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.adapters.combine import combine_adapters

    out = combine_adapters(
        adapter_map(args.adapter),
        parse_weights(args.weights),
        args.out,
        how=args.how,
        density=args.density,
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
        svd_full_matrices=args.svd_full_matrices,
        majority_sign=args.majority_sign,
        seed=args.seed,
        base=args.base,
    )
    print(f"combined adapter ({args.how}) written to {out}")
    return 0


# NAME:WEIGHT[,NAME:WEIGHT...], the names being other --adapter entries
_MIX = re.compile(
    r"[^,:=]+:[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?(?:,[^,:=]+:[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)*"
)


def expand_mixes(adapters: dict[str, str]) -> dict[str, str]:
    """Turn `--adapter NAME=a:0.5,b:0.5` entries into folders: the weighted sum of the
    adapters named a and b (other `--adapter` entries), written by rule `cat` (exactly
    0.5·ΔW_a + 0.5·ΔW_b, at the sum of their ranks) into a temporary folder removed at exit.

    Returns:
        {name: folder}, the mixes' values replaced by their folders.

    Raises:
        GraftError: a mix names no plain --adapter entry; what `combine_adapters` refuses.
    """
    mixes = {
        name: value
        for name, value in adapters.items()
        if _MIX.fullmatch(value) and not os.path.exists(value)
    }
    if not mixes:
        return adapters
    # torch-backed: imported only when a mix is asked for
    from graftlm.adapters.combine import combine_adapters

    root = tempfile.mkdtemp(prefix="graftlm-mix-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = dict(adapters)
    for name, value in mixes.items():
        parts = [part.rpartition(":") for part in value.split(",")]
        sources = {}
        for source, _, _ in parts:
            if source not in adapters or source in mixes:
                raise GraftError(
                    f"--adapter {name}={value}: {source!r} is not the name of another --adapter "
                    f"NAME=DIR (given: {', '.join(n for n in adapters if n not in mixes)})"
                )
            sources[source] = adapters[source]
        weights = [float(weight) for _, _, weight in parts]
        out[name] = str(combine_adapters(sources, weights, os.path.join(root, name), how="cat"))
    return out
