"""DoRA's serving overhead against LoRA's: one decode step of 8 rows, each its own adapter.

The built-in model (SmolLM2-135M) holds 8 LoRA and 8 DoRA adapters (rank 16, every linear
layer, random weights). A batch of 8 rows runs a 16-token prompt, then decode steps, with the
rows' adapters given per row (`graftlm.row_adapters`, what the server and `generate --input`
do): 8 LoRA adapters, 8 DoRA adapters, 4 + 4 mixed, and no adapter. Settings alternate in
blocks of steps (the first of each block untimed); each one's time is the median over its
timed steps (wall, and this process's CPU seconds).

    python bench/dora_serve.py [--steps 4] [--rounds 3] [--threads 1]

Results: bench/results/dora_speed.txt (below the training numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

import graftlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = graftlm.load_model("smollm2-135m-instruct", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for kind in ("lora", "dora"):
        for i in range(8):
            config = graftlm.LoraConfig(rank=16, alpha=32, use_dora=kind == "dora")
            graftlm.inject(model, config, name=f"{kind}{i}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=generator))
    model.eval()
    settings = {
        "8 LoRA adapters": [f"lora{i}" for i in range(8)],
        "8 DoRA adapters": [f"dora{i}" for i in range(8)],
        "4 LoRA + 4 DoRA": [f"lora{i}" for i in range(4)] + [f"dora{i}" for i in range(4)],
        "base only": [None] * 8,
    }
    prompt = torch.randint(0, model.config.vocab_size, (8, 16), generator=generator)
    caches, last = {}, {}
    with torch.inference_mode():
        for label, names in settings.items():
            with graftlm.row_adapters(model, names):
                caches[label] = DynamicCache()
                out = model(input_ids=prompt, past_key_values=caches[label], use_cache=True)
                last[label] = out.logits[:, -1:].argmax(-1)
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in settings}
        for _ in range(args.rounds):
            for label, names in settings.items():
                # a block of steps per setting, its first untimed: a layer keeps the bank (and
                # DoRA's per-row scales) of one batch, as a server's running batch does
                for step in range(args.steps + 1):
                    wall, cpu = time.perf_counter(), time.process_time()
                    with graftlm.row_adapters(model, names):
                        out = model(input_ids=last[label], past_key_values=caches[label])
                    last[label] = out.logits[:, -1:].argmax(-1)
                    if step:
                        elapsed = (time.perf_counter() - wall, time.process_time() - cpu)
                        times[label].append(elapsed)
    print(
        f"SmolLM2-135M, decode step of 8 rows (16-token prompt), rank 16 all-linear, float32, "
        f"{args.threads} thread(s), median of {args.rounds} x {args.steps} steps"
    )
    lora = statistics.median(c for _, c in times["8 LoRA adapters"])
    for label, t in times.items():
        wall, cpu = statistics.median(w for w, _ in t), statistics.median(c for _, c in t)
        print(
            f"{label:<16} {wall * 1e3:7.1f} ms wall, {cpu * 1e3:7.1f} ms CPU "
            f"({cpu / lora:4.2f}x 8 LoRA adapters)"
        )


if __name__ == "__main__":
    main()
