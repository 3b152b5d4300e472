"""DoRA's training overhead against LoRA's, in graftlm and in PEFT: time per optimizer step.

The same loop for every variant (forward with labels, backward, AdamW step) on the built-in
model (SmolLM2-135M), the same random token batch, rank 16 on every linear layer, alpha 32.
Variants alternate step by step, so a machine whose load drifts slows them alike; each
variant's step time is the median of its timed steps, wall and CPU (this process's user +
system seconds, which other jobs' load on the machine barely moves at `--threads 1`).

    python bench/dora_speed.py [--steps 4] [--batch 2] [--seq 128] [--dtype float32] [--no-peft]

The issue's aim: graftlm's DoRA within 1.3x graftlm's LoRA (PEFT's DoRA is 1.2-2x its LoRA).
Results: bench/results/dora_speed.txt.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import graftlm


def graftlm_variant(base, dtype, use_dora: bool):
    model = copy.deepcopy(base)
    graftlm.inject(model, graftlm.LoraConfig(rank=16, alpha=32, use_dora=use_dora))
    return model


def peft_variant(base, dtype, use_dora: bool):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=use_dora)
    return peft.get_peft_model(copy.deepcopy(base), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="graftlm's two variants only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base, _ = graftlm.load_model("smollm2-135m-instruct", dtype=dtype)
    base.train()
    builders = {
        "graftlm LoRA": lambda: graftlm_variant(base, dtype, False),
        "graftlm DoRA": lambda: graftlm_variant(base, dtype, True),
    }
    if not args.no_peft:
        builders["PEFT LoRA"] = lambda: peft_variant(base, dtype, False)
        builders["PEFT DoRA"] = lambda: peft_variant(base, dtype, True)
    models = {name: build() for name, build in builders.items()}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for step in range(args.steps + 1):  # step 0 warms up (allocations, first-call costs)
        for name, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(
        f"SmolLM2-135M, rank 16 all-linear, batch {args.batch} x {args.seq} tokens, "
        f"{args.dtype}, {args.threads} thread(s), median of {args.steps} steps"
    )
    medians = {
        name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
        for name, t in times.items()
    }
    for name, (wall, cpu) in medians.items():
        family = name.split()[0]
        lora_wall, lora_cpu = medians[f"{family} LoRA"]
        print(
            f"{name:<14} step {wall:6.2f} s wall ({wall / lora_wall:4.2f}x its LoRA), "
            f"{cpu:6.2f} s CPU ({cpu / lora_cpu:4.2f}x)"
        )


if __name__ == "__main__":
    main()
