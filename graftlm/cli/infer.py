"""`graftlm generate`, `graftlm chat` and `graftlm eval`: run a base model with adapters."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")

# The CLI imports torch-backed modules inside each command, so that `graftlm --help` and
# argument errors answer at once instead of after several seconds of importing torch.


def adapter_map(values: list[str] | None) -> dict[str, str]:
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


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )


def sampling_config(args: argparse.Namespace):
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.infer.generate import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def add_generate(sub: argparse._SubParsersAction) -> None:
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
    add_sampling(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.data.dataset import prompt_for_generation
    from graftlm.infer.generate import generate, generate_file, load_for_inference

    if args.input and not args.output:
        raise GraftError("--input needs --output (the file to write the completions to)")
    if args.batch_size <= 0:
        raise GraftError(f"--batch-size should be a positive integer, got {args.batch_size!r}")
    if args.input and not Path(args.input).is_file():
        raise GraftError(f"--input {args.input}: file not found")
    sampling = sampling_config(args)
    adapters = adapter_map(args.adapter)
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


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (streams tokens)")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR")
    p.add_argument("--force", action="store_true")
    p.add_argument("--system", default=None, help="system message")
    add_sampling(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.data.dataset import prompt_for_generation
    from graftlm.infer.generate import load_for_inference, stream

    model, tokenizer = load_for_inference(
        args.model, adapter_map(args.adapter), dtype=args.dtype, force=args.force
    )
    sampling = sampling_config(args)
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


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="teacher-forced loss on the answers (and exact match with --generate)"
    )
    p.add_argument("--data", default=None, help="rows with answers (.jsonl/.csv/.parquet)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the base model alone)")
    p.add_argument("--model", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--generate", action="store_true", help="also greedy exact-match accuracy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="write the result as JSON here")
    p.add_argument(
        "--forgetting",
        action="store_true",
        help="also measure what the adapter kept of the base outside the task: kept_exact, "
        "kl, ppl_ratio (docs/forgetting.md)",
    )
    p.add_argument("--keep", default=None, help="--forgetting's keep set (default: graftlm's own)")
    p.add_argument("--keep-limit", type=int, default=None, help="score about this many keep rows")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.infer.evaluate import evaluate_file
    from graftlm.infer.generate import load_for_inference, parse_dtype
    from graftlm.methods.lora.files import atomic_write_json

    if args.data is None and not args.forgetting:
        raise GraftError("eval needs --data (a task score), --forgetting, or both")
    if args.data is not None and not Path(args.data).is_file():
        raise GraftError(f"--data {args.data}: file not found")
    if args.forgetting and not args.adapter:
        raise GraftError("--forgetting needs --adapter: it compares the adapter with its base")
    if args.keep is not None and not Path(args.keep).is_file():
        raise GraftError(f"--keep {args.keep}: file not found")
    adapters = {"default": args.adapter} if args.adapter else {}
    model, tokenizer = load_for_inference(args.model, adapters, dtype=args.dtype, force=args.force)
    result = {}
    if args.data is not None:
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
    if args.forgetting:
        # torch-backed: imported in the command so that `graftlm --help` answers at once
        from graftlm.infer.forgetting import forgetting_of_folder

        forgetting = forgetting_of_folder(
            model, tokenizer, args.adapter, model_name=args.model, keep=args.keep,
            limit=args.keep_limit, compute_dtype=parse_dtype(args.dtype),
        )  # fmt: skip
        result.update({k: forgetting[k] for k in ("kept_exact", "kl", "ppl_ratio")})
        result["forgetting"] = forgetting
    if args.output:
        atomic_write_json(Path(args.output), result)
    print(json.dumps(result, indent=2))
    return 0
