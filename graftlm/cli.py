"""The `graftlm` command: train, generate, chat, eval, merge, export, inspect, serve.

Every subcommand builds the same objects the Python API uses (`TrainConfig`, `SamplingConfig`).
Errors print one line (`error: ...`) and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")


# -- train --------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    from graftlm.train_config import TrainConfig

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
    from graftlm.train_config import TrainConfig

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

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
    from graftlm.launch import launched_by_torchrun

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
            from graftlm.launch import launch_local

            return launch_local(cfg, nproc, quiet=args.quiet, debug=args.debug)
    from graftlm.runtime import Runtime
    from graftlm.train import train

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


# -- generate / chat ------------------------------------------------------------------------------


def _adapter_map(values: list[str] | None) -> dict[str, str]:
    """`--adapter DIR` (named 'default') or `--adapter NAME=DIR`, repeatable."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = ("default" if not out else Path(value).name), value
        if name in out:
            raise GraftError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )


def _sampling(args: argparse.Namespace):
    from graftlm.generate import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a base model and adapters")
    p.add_argument(
        "--model",
        default=None,
        help="base model (default: the one the adapter names, else built-in)",
    )
    p.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR (repeatable)")
    p.add_argument(
        "--force", action="store_true", help="load adapters despite a base fingerprint mismatch"
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one user message")
    group.add_argument(
        "--input", help="rows to complete (.jsonl/.csv/.parquet): chat rows or {'prompt': ...}"
    )
    p.add_argument("--output", help="where to write input rows + 'output' (with --input)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from graftlm.data import prompt_for_generation
    from graftlm.generate import generate, generate_file, load_for_inference

    if args.input and not args.output:
        raise GraftError("--input needs --output (the file to write the completions to)")
    if args.batch_size <= 0:
        raise GraftError(f"--batch-size should be a positive integer, got {args.batch_size!r}")
    if args.input and not Path(args.input).is_file():
        raise GraftError(f"--input {args.input}: file not found")
    sampling = _sampling(args)
    adapters = _adapter_map(args.adapter)
    model, tokenizer = load_for_inference(args.model, adapters, dtype=args.dtype, force=args.force)
    default = next(iter(adapters), None)
    if args.prompt is not None:
        prompt = prompt_for_generation({"prompt": args.prompt}, tokenizer)
        print(generate(model, tokenizer, [prompt], adapters=[default], sampling=sampling)[0])
        return 0
    start = time.perf_counter()
    count = generate_file(
        model,
        tokenizer,
        args.input,
        args.output,
        sampling=sampling,
        batch_size=args.batch_size,
        default_adapter=default,
    )
    logger.info("wrote %d rows to %s in %.1f s", count, args.output, time.perf_counter() - start)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (streams tokens)")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR")
    p.add_argument("--force", action="store_true")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from graftlm.data import prompt_for_generation
    from graftlm.generate import load_for_inference, stream

    model, tokenizer = load_for_inference(
        args.model, _adapter_map(args.adapter), dtype=args.dtype, force=args.force
    )
    sampling = _sampling(args)
    history: list[dict[str, str]] = (
        [{"role": "system", "content": args.system}] if args.system else []
    )
    print(
        "graftlm chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.",
        flush=True,
    )
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        prompt = prompt_for_generation({"messages": history}, tokenizer)
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in stream(model, tokenizer, prompt, sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


# -- eval ----------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="teacher-forced loss on the answers (and exact match with --generate)"
    )
    p.add_argument("--data", required=True, help="rows with answers (.jsonl/.csv/.parquet)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the base model alone)")
    p.add_argument("--model", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--generate", action="store_true", help="also greedy exact-match accuracy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from graftlm.adapters import atomic_write_json
    from graftlm.evaluate import evaluate_file
    from graftlm.generate import load_for_inference, parse_dtype

    if not Path(args.data).is_file():
        raise GraftError(f"--data {args.data}: file not found")
    adapters = {"default": args.adapter} if args.adapter else {}
    model, tokenizer = load_for_inference(args.model, adapters, dtype=args.dtype, force=args.force)
    result = evaluate_file(
        model,
        tokenizer,
        args.data,
        seq_len=args.seq_len,
        compute_dtype=parse_dtype(args.dtype),
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    if args.output:
        atomic_write_json(Path(args.output), result)
    print(json.dumps(result, indent=2))
    return 0


# -- merge / inspect ------------------------------------------------------------------------------


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge an adapter into its base: a plain Hugging Face model folder"
    )
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the saved weights",
    )
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from graftlm.export import merge_to_folder

    out = merge_to_folder(
        args.adapter, args.out, model=args.model, dtype=args.dtype, force=args.force
    )
    print(f"merged model written to {out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write an adapter, or base + adapter merged, as GGUF for llama.cpp",
        description="--format gguf: a llama.cpp LoRA file (llama-cli -m BASE.gguf --lora OUT); "
        "--format gguf-merged: one model file (llama-cli -m OUT). See graftlm/export_gguf.py.",
    )
    p.add_argument("--adapter", required=True)
    p.add_argument("--format", required=True, choices=["gguf", "gguf-merged"])
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced if it exists)")
    p.add_argument(
        "--model",
        "--base",
        dest="model",
        default=None,
        help="base: the built-in name, a .gguf file or a Hugging Face Llama folder "
        "(default: the one the adapter names, else the built-in model)",
    )
    p.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default=None,
        help="gguf: type of the LoRA tensors (default f32)",
    )
    p.add_argument(
        "--quant",
        choices=["f16", "q8_0", "q4_0", "q4_1"],
        default=None,
        help="gguf-merged: type of the adapted weights (default f16; other tensors of a GGUF "
        "base are copied as they are)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="export although the adapter's base fingerprint names another base",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from graftlm.export_gguf import export_adapter_gguf, export_merged_gguf

    if args.format == "gguf":
        if args.quant is not None:
            raise GraftError(
                "--quant is for --format gguf-merged; use --outtype with --format gguf"
            )
        out = export_adapter_gguf(
            args.adapter,
            args.out,
            model=args.model,
            outtype=args.outtype or "f32",
            force=args.force,
        )
    else:
        if args.outtype is not None:
            raise GraftError(
                "--outtype is for --format gguf; use --quant with --format gguf-merged"
            )
        out = export_merged_gguf(
            args.adapter, args.out, model=args.model, quant=args.quant or "f16", force=args.force
        )
    print(f"{args.format} written to {out}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe an adapter folder")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from graftlm.inspect_adapter import describe, format_description

    facts = describe(args.adapter)
    print(json.dumps(facts, indent=2) if args.json else format_description(facts))
    return 0


# -- serve --------------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    # defined next to the server (graftlm/serve.py); fastapi/uvicorn are imported only when run
    from graftlm.serve import add_serve_parser

    add_serve_parser(sub)


# -- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graftlm", description="Parameter-efficient fine-tuning of language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_generate,
        _add_chat,
        _add_eval,
        _add_merge,
        _add_export,
        _add_inspect,
        _add_serve,
    ):
        add(sub)
    return parser


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
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
    _setup_logging(debug)
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
