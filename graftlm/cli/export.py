"""`graftlm merge`, `graftlm export` and `graftlm inspect`: adapter folders to other forms."""

from __future__ import annotations

import argparse
import json

from graftlm.errors import GraftError

# The CLI imports torch-backed modules inside each command, so that `graftlm --help` and
# argument errors answer at once instead of after several seconds of importing torch.


def add_merge(sub: argparse._SubParsersAction) -> None:
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
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.export.merged_folder import merge_to_folder

    out = merge_to_folder(
        args.adapter, args.out, model=args.model, dtype=args.dtype, force=args.force
    )
    print(f"merged model written to {out}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write an adapter, or base + adapter merged, as GGUF for llama.cpp",
        description="--format gguf: a llama.cpp LoRA file (llama-cli -m BASE.gguf --lora OUT); "
        "--format gguf-merged: one model file (llama-cli -m OUT). See graftlm/export/gguf.py.",
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
    # torch-backed: imported in the command so that `graftlm --help` answers at once
    from graftlm.export.gguf import export_adapter_gguf, export_merged_gguf

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


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="describe an adapter folder, or a diffusers / kohya LoRA .safetensors file"
    )
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    # loads the method modules (torch) to describe a folder: imported in the command, as above
    from graftlm.adapters.inspect import describe, format_description
    from graftlm.image import inspect as image_inspect

    if image_inspect.is_image_lora(args.adapter):  # a diffusers or kohya LoRA file
        facts = image_inspect.describe(args.adapter)
        print(json.dumps(facts, indent=2) if args.json else image_inspect.format_description(facts))
        return 0
    facts = describe(args.adapter)
    print(json.dumps(facts, indent=2) if args.json else format_description(facts))
    return 0
