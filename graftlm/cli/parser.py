"""The `graftlm` command: train, plan, generate, chat, eval, merge, export, inspect, combine, serve.

Every subcommand builds the same objects the Python API uses (`TrainConfig`, `SamplingConfig`);
each command group has its module here. Errors print one line (`error: ...`) and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from graftlm.cli.combine import add_combine
from graftlm.cli.compare import add_compare
from graftlm.cli.export import add_export, add_inspect, add_merge
from graftlm.cli.image import add_generate_image, add_train_image
from graftlm.cli.infer import add_chat, add_eval, add_generate
from graftlm.cli.plan import add_plan
from graftlm.cli.serve import add_serve
from graftlm.cli.sweep import add_sweep
from graftlm.cli.train import add_train
from graftlm.errors import GraftError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graftlm", description="Parameter-efficient fine-tuning of language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_train,
        add_train_image,
        add_sweep,
        add_compare,
        add_plan,
        add_generate,
        add_generate_image,
        add_chat,
        add_eval,
        add_merge,
        add_export,
        add_inspect,
        add_combine,
        add_serve,
    ):
        add(sub)
    return parser


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
        # imported here, after parsing: `graftlm --help` and flag errors skip transformers (~1 s)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the graftlm command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(debug)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except GraftError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
