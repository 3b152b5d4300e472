"""torch.compile (Inductor's C++ backend) against graftlm's C kernels, on one bf16 training step.

    .venv/bin/python bench/compile_vs_kernels.py --threads 1 --steps 6

The setting of bench/train_vs_peft.py's text workload: the built-in model, LoRA r=8 on
q_proj,v_proj (fp32 adapter, bf16 base), batches of 8 rows of 256 tokens, every position
labelled, run as graftlm's loop runs them (micro-batches of 4 rows, bf16 autocast, graftlm's
fused loss, AdamW). Each side runs in its own process:

- `kernels`: graftlm's fused forwards (`fused_ops.fused_forwards`: the C kernels for RMSNorm,
  rotary, SwiGLU, causal attention and the loss, the fused LoRA update), as `graftlm train`;
- `compile`: transformers' code with every decoder layer compiled by `torch.compile` (Inductor,
  which generates vectorized C++ loops for the element-wise work around the matrix products);
- `compile+kernels`: the decoder layers compiled, over graftlm's fused forwards (Inductor
  fuses what the kernels leave: residual adds, casts);
- `plain`: transformers' code, neither.

Prints, per side: the first step's seconds (compilation included, from an empty Inductor
cache), the mean of the steady steps (from the third on), tokens/s over those, and the losses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("kernels", "compile", "compile+kernels", "plain")


def worker(args) -> dict:
    import torch

    import graftlm
    from graftlm.data.dataset import collate, load_dataset
    from graftlm.kernels.fused_ops import fused_forwards
    from graftlm.train.forward import autocast, loss_sum

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = graftlm.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    graftlm.inject(model, graftlm.LoraConfig(rank=8, alpha=16, targets="q_proj,v_proj"))
    model.train()
    examples, _ = load_dataset(args.data, tokenizer, 256)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    compiled = "compile" in args.worker
    if compiled:
        for layer in model.model.layers:
            layer.compile()  # in place: the module's forward goes through torch.compile
    kernels = fused_forwards(model) if "kernels" in args.worker else contextlib.nullcontext()
    seconds, losses, tokens = [], [], 0
    with kernels:
        for step in range(args.steps):
            rows = examples[step * 8 : (step + 1) * 8]
            start = time.perf_counter()
            total, count = 0.0, 0
            for micro in (rows[:4], rows[4:]):  # graftlm's passes of ~1024 tokens
                batch = collate(micro, tokenizer.pad_token_id)
                with autocast(torch.bfloat16):
                    loss, labelled = loss_sum(model, batch, torch.bfloat16, share_prefix=False)
                (loss / 8 / 255).backward()
                total, count = total + loss.item(), count + labelled
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
            losses.append(round(total / count, 5))
            tokens = sum(len(e) for e in rows)
    steady = seconds[2:]
    return {
        "first_s": seconds[0],
        "steady_s": sum(steady) / len(steady),
        "tokens_per_s": tokens / (sum(steady) / len(steady)),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from train_vs_peft import make_text_rows

    from graftlm.models.load import load_tokenizer

    data = Path(tempfile.mkdtemp(prefix="bench-compile-")) / "text.jsonl"
    make_text_rows(data, load_tokenizer("smollm2-135m-instruct"), 256, rows=8 * args.steps)
    print(f"bf16 step, LoRA r=8 q_proj,v_proj, 8 x 256, {args.threads} thread(s)")
    for side in args.sides.split(","):
        argv = ["--worker", side, "--data", str(data), "--steps", str(args.steps)]
        # a fresh Inductor cache per side: the first step pays the whole compilation, as the
        # first run on a machine does (later runs find the cache in the temp directory)
        cache = tempfile.mkdtemp(prefix="bench-inductor-")
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
        )
        if proc.returncode != 0:
            print(f"  {side:16s} failed: {proc.stderr.strip().splitlines()[-1][:300]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  {side:16s} first step {r['first_s']:6.1f} s  steady {r['steady_s']:5.2f} s/step "
            f"{r['tokens_per_s']:6.1f} tokens/s  losses {r['losses']}"
        )


if __name__ == "__main__":
    main()
