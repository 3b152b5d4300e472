"""graftlm vs Hugging Face PEFT + the plain PyTorch loop a PEFT user writes, side by side.

    .venv/bin/python bench/train_vs_peft.py --workload text --rank 8 --targets q_proj,v_proj
    .venv/bin/python bench/train_vs_peft.py --workload chat --rank 16 --targets all-linear
    .venv/bin/python bench/train_vs_peft.py --method qlora --rank 16 --targets all-linear

Both sides run in their own subprocess (so peak RSS is each one's own), on the same model, the
same tokenized rows, rank, targets, batch, sequence length, learning rate and seed:

- graftlm: `graftlm.train.loop.train` (what `graftlm train` runs), its defaults for everything else;
  tokens/s from each step's own `tokens` and `tokens_per_s` in its metrics.jsonl.
- graftlm-cli: the `graftlm train` command itself, as a user types it (the same settings as flags,
  its defaults for the rest), timed from outside: tokens/s from each step's own `tokens` and
  `tokens_per_s` in metrics.jsonl (evaluation rows are separate rows, not training time), peak RSS
  of the command's process from `wait4`. No `--profile` for this side (nothing to hook into).
- graftlm-cli-before (with `--before TREE`): the same command on the code of an earlier commit
  checked out at TREE (`git worktree add TREE COMMIT`), so that a change is measured before and
  after in one run.
- PEFT: `get_peft_model` + AdamW + a padded batch loop with `model(**batch, labels=...)`, in the
  best precision this CPU has (bf16 weights + autocast where bf16 is fast, else fp32; `--dtype`
  sets it for every side).
  With `--method qlora` its base is loaded by transformers + bitsandbytes in 4-bit NF4 with double
  quantization (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)`), the QLoRA recipe of the PEFT documentation.

Workloads: `text` = plain-text rows of `--seq-len` tokens, every position labelled (the timed
check of the issue); `chat` = the tickets chat task, rows of varied length, loss on answers only
(where padding and unlabelled positions matter), timed to finish `--epochs` epochs.
Peak RSS is each side's process's own, read by the parent from `wait4` when it exits.
Prints tokens/s, peak RSS, the loss of the last steps and the ratios, and each side's achieved
FLOP/s (tokens/s times the model's forward + backward FLOPs per token, counted by torch in a third
process) against matrix-product peaks measured here in fp32 and bf16.

`--profile N`: each side also runs torch's profiler over N steps after two untimed ones (the
first loads, the second warms up) and prints its top operators by share of the step's own CPU
time (self time; with `--threads 1` that is the wall time), with the copies
(`aten::copy_` + `aten::_to_copy`) and the matrix products (`aten::mm`/`addmm`/`addmm_`/`bmm`)
summed, and the copies split by the dtypes the profiler records for each `copy_`: dtype casts
(`copy_` between two dtypes, and `_to_copy`) and layout copies (`copy_` within one dtype:
`.contiguous()` of a transposed view), so every change to the step is measured before and
after. Profiled steps run slower than plain ones: read the shares, and the tokens/s of a run
without `--profile`.
`--threads N`: torch threads in each worker (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "data" / "tickets" / "train.jsonl"


def make_text_rows(path: Path, tokenizer, seq_len: int, rows: int) -> None:
    """Plain-text rows of about seq_len tokens, made from the tickets' user messages."""
    messages = [json.loads(x)["messages"][1]["content"] for x in TICKETS.read_text().splitlines()]
    out, current, i = [], [], 0
    while len(out) < rows:
        current.append(messages[i % len(messages)])
        i += 1
        if len(tokenizer(" ".join(current))["input_ids"]) >= seq_len:
            out.append({"text": " ".join(current)})
            current = []
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


# operators summed into one line of the profile's summary
COPY_OPS = ("aten::copy_", "aten::_to_copy")
# (addmm_: graftlm's LoRA update, `out += scale * t @ B^T`, summed inside the product)
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
)


def step_profiler(steps: int):
    """torch's profiler over `steps` training steps after two that are not recorded (the first
    step includes the load, the second warms up); call `.step()` after each training step.
    None where no profile was asked for."""
    if not steps:
        return None
    import torch

    return torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
        record_shapes=True,  # with the input dtypes that tell a cast from a layout copy
    )


def profile_table(prof, top: int = 16) -> dict:
    """The profile as shares of the recorded self CPU time: the `top` operators, the copies
    (dtype casts and layout copies apart) and the matrix products summed."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    share = {e.key: e.self_cpu_time_total / total for e in events}
    ranked = sorted(share.items(), key=lambda kv: -kv[1])
    # a copy_ whose destination and source dtypes differ is a cast (input_dtypes: dst, src)
    layout = sum(
        e.self_cpu_time_total
        for e in prof.events()
        if e.name == "aten::copy_" and len(set(e.input_dtypes[:2])) == 1
    )
    copies = sum(share.get(op, 0.0) for op in COPY_OPS)
    return {
        "total_s": total / 1e6,
        "top": [[name, round(value, 4)] for name, value in ranked[:top]],
        "copies": round(copies, 4),
        "casts": round(copies - layout / total, 4),
        "matmul": round(sum(share.get(op, 0.0) for op in MATMUL_OPS), 4),
    }


def set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def worker_graftlm(args) -> dict:
    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train
    from graftlm.train.step import OptimizerStep

    set_threads(args)
    out = Path(tempfile.mkdtemp(prefix="bench-graftlm-")) / "out"
    extra = {"steps": args.steps} if args.steps else {"epochs": args.epochs}
    cfg = TrainConfig(
        data=args.data,
        out=str(out),
        method=args.method,
        rank=args.rank,
        alpha=2 * args.rank,
        targets=args.targets,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=0,
        warmup_ratio=0.0,
        low_memory=True if args.low_memory else None,  # None: the method's recipe (QLoRA: on)
        # None: the recipe (QLoRA: on; LoRA: only with --low-memory and rows over 1024 tokens)
        activation_checkpointing=False if args.no_activation_checkpointing else None,
        fused_kernels=not args.no_fused_kernels,
        dtype=args.dtype,
        micro_batch_size=args.micro_batch_size,
        **extra,
    )
    prof = step_profiler(args.profile)
    if prof is not None:
        # the bench's own hook: the profiler's schedule advances after every optimizer step
        one_step = OptimizerStep.__call__

        def profiled_step(self, *a, **k):
            result = one_step(self, *a, **k)
            prof.step()
            return result

        OptimizerStep.__call__ = profiled_step
        with prof:
            train(cfg, progress=False)
    else:
        train(cfg, progress=False)
    return {
        **step_totals(out),
        **({"profile": profile_table(prof)} if prof is not None else {}),
    }


def step_totals(out: Path) -> dict:
    """Tokens, seconds and losses of a graftlm run's steps, from its metrics.jsonl: each step's
    own tokens and seconds, so evaluation passes are not training time."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {
        "tokens": sum(r["tokens"] for r in steps),
        "seconds": sum(r["tokens"] / r["tokens_per_s"] for r in steps),
        "losses": [r["loss"] for r in steps],
    }


def with_peft_lora(model, args):
    """`model` wrapped by PEFT's `get_peft_model` with the bench's LoRA (rank, alpha 2 x rank,
    targets, no dropout), in training mode."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    model = get_peft_model(
        model,
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0),
    )
    return model.train()


def worker_peft(args, attention_mask: bool = True) -> dict:
    """PEFT's plain loop; `attention_mask=False` is its fastest form where rows have no padding
    (the text workload): transformers then takes SDPA's causal path without building a mask."""
    import torch

    from graftlm.data.dataset import collate, length_grouped_batches, load_dataset
    from graftlm.models.load import load_model
    from graftlm.train.distributed import bf16_supported

    set_threads(args)
    torch.manual_seed(0)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=dtype)
    if args.method == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from graftlm.models.gguf_cache import builtin_gguf_path, ensure_converted

        del model
        model = AutoModelForCausalLM.from_pretrained(
            ensure_converted(builtin_gguf_path(), None),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            ),
            device_map="cpu",
            dtype=dtype,
        )
    examples, _ = load_dataset(args.data, tokenizer, args.seq_len)
    model = with_peft_lora(model, args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # the plain loop: shuffled fixed-size batches, padded to the longest row
    order = [
        i
        for epoch in range(100)
        for b in length_grouped_batches([1] * len(examples), args.batch_size, seed=0, epoch=epoch)
        for i in [b]
    ]
    steps = args.steps or int(args.epochs * len(examples) / args.batch_size + 0.999)
    from graftlm.train.steps import lr_lambda

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps, 0.0)
    )  # graftlm's schedule
    losses, tokens, seconds = [], 0, 0.0
    prof = step_profiler(args.profile)
    if prof is not None:
        prof.start()
    for step in range(steps):
        batch = collate([examples[i] for i in order[step]], tokenizer.pad_token_id)
        mask = batch["attention_mask"] if attention_mask else None
        if mask is None and not bool(batch["attention_mask"].all()):
            raise SystemExit("peft-fast: a batch has padding; it needs the attention mask")
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        tokens += int(batch["attention_mask"].sum())
        losses.append(round(out.loss.item(), 6))
        if prof is not None:
            prof.step()
    if prof is not None:
        prof.stop()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "losses": losses,
        "bf16": bf16,
        **({"profile": profile_table(prof)} if prof is not None else {}),
    }


def worker_peft_fast(args) -> dict:
    """PEFT's fastest form: bf16 weights + autocast (fp32 without bf16), no attention mask
    (rows without padding)."""
    return worker_peft(args, attention_mask=False)


def worker_flops(args) -> dict:
    """Model FLOPs per token and this machine's matmul peaks, for the achieved-FLOP/s lines.

    FLOPs: one forward + backward of PEFT's model (fp32, the same rank and targets) over the
    first `--batch-size` rows, each alone (no padding), counted by torch's FlopCounterMode
    (matrix products and attention); per token, that is the work a training step must do, so
    tokens/s times it is each side's achieved FLOP/s. Peaks: a 2048 x 2048 fp32 and a bf16
    matrix product (512 x 512 where bf16 is emulated) with this process's threads (what both
    workers get).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from graftlm.data.dataset import collate, load_dataset
    from graftlm.models.load import load_model
    from graftlm.train.distributed import bf16_supported

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32)
    examples, _ = load_dataset(args.data, tokenizer, args.seq_len)
    model = with_peft_lora(model, args)
    flops, tokens = 0, 0
    for example in examples[: args.batch_size]:
        batch = collate([example], tokenizer.pad_token_id)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        flops += counter.get_total_flops()
        tokens += batch["input_ids"].shape[1]
        model.zero_grad(set_to_none=True)

    def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        return 2 * size**3 * repeats / (time.perf_counter() - start)

    # smaller where bf16 is emulated: one 2048 x 2048 bf16 product takes ~1 min there
    bf16_size = 2048 if bf16_supported() else 512
    return {
        "flops_per_token": flops / tokens,
        "peak_fp32": matmul_peak(torch.float32, 2048, 4),
        "peak_bf16": matmul_peak(torch.bfloat16, bf16_size, 2),
        "bf16_size": bf16_size,
        "threads": torch.get_num_threads(),
    }


def run_measured(kind: str, command: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run `command` to its end; its stdout and its peak RSS in MB, from `wait4`'s
    `ru_maxrss` (the process's own high-water mark, KiB on Linux), read from outside."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed ({proc.returncode}):\n{stderr.read()[-3000:]}")
        return stdout.read(), usage.ru_maxrss / 1024


def run_worker(kind: str, argv: list[str]) -> dict:
    stdout, peak_mb = run_measured(kind, [sys.executable, __file__, "--worker", kind, *argv])
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak_mb
    return result


def graftlm_command() -> list[str]:
    """The `graftlm` console script beside this Python (the venv's), else `python -m graftlm`."""
    script = Path(sys.executable).with_name("graftlm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "graftlm"]


def run_graftlm_cli(args, data: Path, tree: str | None = None) -> dict:
    """`graftlm train` with the bench's settings, timed from its metrics.jsonl: each step's own
    `tokens` and `tokens_per_s` (its evaluation passes are rows of their own, left out).
    `tree`: a checkout whose `graftlm` package runs instead of this one (first on PYTHONPATH)."""
    out = Path(tempfile.mkdtemp(prefix="bench-graftlm-cli-")) / "out"
    length = ["--steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]
    command = [
        *graftlm_command(), "train", "--data", str(data), "--out", str(out),
        "--method", args.method, "--rank", str(args.rank), "--alpha", str(2 * args.rank),
        "--targets", args.targets, "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--seed", "0",
        "--warmup-ratio", "0", "--quiet", *length,
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--low-memory"] if args.low_memory else []),
        *(["--no-activation-checkpointing"] if args.no_activation_checkpointing else []),
        *(["--no-fused-kernels"] if args.no_fused_kernels else []),
        *(["--dtype", args.dtype] if args.dtype != "auto" else []),
        *(["--micro-batch-size", str(args.micro_batch_size)] if args.micro_batch_size else []),
    ]  # fmt: skip
    env = None
    if tree:
        path = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
    _, peak_mb = run_measured("graftlm-cli", command, env)
    return {**step_totals(out), "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["text", "chat"], default="text")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--no-fused-kernels", action="store_true", help="graftlm on transformers' code"
    )
    parser.add_argument(
        "--sides",
        default="peft,peft-fast,graftlm",
        help="which to run, of peft (with the attention mask), peft-fast (no mask), graftlm "
        "(the training function in a worker), graftlm-cli (the `graftlm train` command), "
        "graftlm-cli-before (that command on the --before tree's code)",
    )
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="a checkout of an earlier commit (`git worktree add TREE COMMIT`) for the side "
        "graftlm-cli-before: the same command, with TREE's graftlm package first on PYTHONPATH",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count and peaks")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="every side's compute dtype (auto: bf16 where the CPU has it, as graftlm's default)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="graftlm's rows per forward pass (default: its own, ~1024 tokens; PEFT's loop "
        "runs the whole batch in one pass)",
    )
    workers = ["graftlm", "peft", "peft-fast", "flops"]
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        workers = {
            "graftlm": worker_graftlm,
            "peft": worker_peft,
            "peft-fast": worker_peft_fast,
            "flops": worker_flops,
        }
        result = workers[args.worker](args)
        print(json.dumps(result))
        return

    data = Path(tempfile.mkdtemp(prefix="bench-data-")) / f"{args.workload}.jsonl"
    if args.workload == "text":
        from graftlm.models.load import load_tokenizer

        make_text_rows(
            data,
            load_tokenizer("smollm2-135m-instruct"),
            args.seq_len,
            rows=args.batch_size * (args.steps or 12),
        )
        args.steps = args.steps or 12
    else:
        data.write_text(TICKETS.read_text())
        args.seq_len = max(args.seq_len, 512)
    argv = (
        [
            "--method",
            args.method,
            "--rank",
            str(args.rank),
            "--targets",
            args.targets,
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--lr",
            str(args.lr),
            "--data",
            str(data),
            "--epochs",
            str(args.epochs),
        ]
        + (["--steps", str(args.steps)] if args.steps else [])
        + (["--low-memory"] if args.low_memory else [])
        + (["--no-activation-checkpointing"] if args.no_activation_checkpointing else [])
        + ["--profile", str(args.profile), "--threads", str(args.threads)]
        + (["--no-fused-kernels"] if args.no_fused_kernels else [])
        + ["--dtype", args.dtype]
        + (["--micro-batch-size", str(args.micro_batch_size)] if args.micro_batch_size else [])
    )
    sides = args.sides.split(",")
    if args.workload == "chat" and "peft-fast" in sides:
        sides.remove("peft-fast")  # chat rows are padded: no mask would be wrong
    if "graftlm-cli-before" in sides and not args.before:
        parser.error("the side graftlm-cli-before needs --before TREE")
    results = {}
    for kind in sides:
        if kind == "graftlm-cli":
            results[kind] = run_graftlm_cli(args, data)
        elif kind == "graftlm-cli-before":
            results[kind] = run_graftlm_cli(args, data, tree=args.before)
        else:
            results[kind] = run_worker(kind, argv)
    flops = None if args.no_flops else run_worker("flops", argv)
    print(
        f"workload {args.workload}, {args.method}: rank {args.rank}, targets {args.targets}, batch {args.batch_size}, seq-len {args.seq_len}"
    )
    for kind, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(
            f"  {kind:18s} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB"
            f"  loss first {r['losses'][0]:.4f} last {r['losses'][-1]:.4f}"
        )
    for kind, r in results.items():
        if "profile" in r:
            print_profile(kind, r["profile"])
    if flops is not None:
        print_flops(results, flops)
    pairs = [(g, p) for g in ("graftlm", "graftlm-cli") for p in ("peft", "peft-fast")]
    pairs += [(g, "graftlm-cli-before") for g in ("graftlm", "graftlm-cli")]
    pairs += [("graftlm-cli-before", p) for p in ("peft", "peft-fast")]
    for ours, kind in pairs:
        if ours not in results or kind not in results:
            continue
        g, p = results[ours], results[kind]
        print(
            f"  ratios {ours}/{kind}: speed {g['tokens_per_s'] / p['tokens_per_s']:.2f}x (time to finish "
            f"{p['seconds'] / g['seconds']:.2f}x faster), peak memory {g['peak_rss_mb'] / p['peak_rss_mb']:.2f}x"
        )
        steps = min(len(g["losses"]), len(p["losses"]))
        worst = max(abs(a - b) / b for a, b in zip(g["losses"][:steps], p["losses"][:steps]))
        print(f"  loss agreement over {steps} steps: max relative difference {worst:.3%}")


def print_profile(kind: str, profile: dict) -> None:
    print(
        f"  {kind} profile: {profile['total_s']:.1f} s of self CPU time recorded; matrix products "
        f"{profile['matmul']:.1%}, copies (copy_ + _to_copy) {profile['copies']:.1%}: dtype "
        f"casts {profile['casts']:.1%}, layout copies {profile['copies'] - profile['casts']:.1%}"
    )
    for name, share in profile["top"]:
        print(f"    {share:6.1%}  {name}")


def print_flops(results: dict, flops: dict) -> None:
    per_token = flops["flops_per_token"]
    print(
        f"  model FLOPs (forward + backward, no padding, torch's FlopCounterMode): "
        f"{per_token / 1e9:.3f} GFLOP/token; matmul peaks measured here ({flops['threads']} "
        f"threads): fp32 {flops['peak_fp32'] / 1e9:.1f} GFLOP/s (2048 x 2048), "
        f"bf16 {flops['peak_bf16'] / 1e9:.1f} GFLOP/s ({flops['bf16_size']} x {flops['bf16_size']})"
    )
    for kind, r in results.items():
        achieved = r["tokens_per_s"] * per_token
        print(
            f"  {kind:18s} achieves {achieved / 1e9:6.1f} GFLOP/s: "
            f"{achieved / flops['peak_fp32']:.2f} of the fp32 peak, "
            f"{achieved / flops['peak_bf16']:.2f} of the bf16 peak"
        )


if __name__ == "__main__":
    main()
