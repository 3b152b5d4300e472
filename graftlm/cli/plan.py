"""`graftlm plan`: a fine-tune's memory and time from a model's config.json, before it starts."""

from __future__ import annotations

import argparse
import json
import re

from graftlm.errors import GraftError
from graftlm.plan import METHODS

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
UNITS |= {"t": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GB' (10^9), '24GiB' / '24G' (2^30), '1.5e9' -> bytes.

    Raises:
        GraftError: anything else.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in UNITS:
        raise GraftError(f"--memory {text!r}: expected a size like 24GB, 24GiB or 16G")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict a fine-tune's memory and time from a model's config.json",
        description="Trainable parameters, adapter size, memory by part and its peak, the "
        "largest micro-batch and sequence length that fit --memory, and the time per step "
        "and epoch, beside full fine-tuning's; from config.json alone.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        help="a shipped model name (smollm2-135m-instruct (default), llama-2-7b, llama-3-8b, "
        "mistral-7b, qwen2.5-7b, llama-3-70b) or a Hugging Face folder",
    )
    source.add_argument("--config", help="a model's config.json (or a shipped name)")
    p.add_argument("--method", default="lora", choices=METHODS, help="(default: lora)")
    p.add_argument("--rank", type=int, help="LoRA rank (default per method)")
    p.add_argument(
        "--targets", help="layers to adapt: names 'q_proj,v_proj', a regex or all-linear"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument(
        "--micro-batch-size", type=int, help="sequences per pass (default: as graftlm train)"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(default: as graftlm train decides)",
    )
    p.add_argument("--memory", help="memory to fit in, e.g. 24GB or 24GiB")
    p.add_argument(
        "--matmul-tflops",
        type=float,
        help="a matrix-product rate to plan with (a GPU's); default: measured on this machine",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads the time is measured with: as graftlm train --threads (default: all)",
    )
    p.add_argument("--examples", type=int, default=1000, help="sequences per epoch (default: 1000)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="as graftlm train --ema-decay: counts the weight average's memory (default: 0, off)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    # torch-backed: imported only here (see cli/train.py)
    import torch

    from graftlm.plan.report import PlanRequest, format_plan, plan_run
    from graftlm.plan.shapes import model_shape, read_config

    if args.threads is not None:
        if args.threads <= 0:
            raise GraftError(f"--threads should be a positive integer, got {args.threads!r}")
        torch.set_num_threads(args.threads)  # the step is timed on this many, as training's

    request = PlanRequest(
        method=args.method,
        rank=args.rank,
        targets=args.targets,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        device=args.device,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        memory=parse_bytes(args.memory) if args.memory else None,
        matmul_tflops=args.matmul_tflops,
        examples=args.examples,
        ema_decay=args.ema_decay,
    )
    values, source = read_config(args.model, args.config)
    shape = model_shape(values, source)
    plan = plan_run(shape, request, args.model or args.config or "smollm2-135m-instruct")
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
