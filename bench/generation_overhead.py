"""What an adapter costs per generated token: base model vs unmerged vs merged LoRA.

    .venv/bin/python bench/generation_overhead.py                  # rank 16, all linear layers
    .venv/bin/python bench/generation_overhead.py --rank 8 --targets q_proj,v_proj

On the built-in model, greedy decoding of `--new-tokens` tokens (no early stop) from a short chat
prompt, at batch 1 and batch 8, for: the base model alone; the same weights with a LoRA adapter
left unmerged (the adapter's B is random, so its product is really computed); the adapter merged
into the weights (`graftlm.methods.lora.inject.merge`, the LoRA layers still in place). The three run
interleaved (the base is a copy of the model made before the adapter was added), `--repeats`
times each, in one process; the median of each is reported as
milliseconds per generated token (per row at batch 8: milliseconds per decoding step / 8) and
as a ratio to the base. Appends a JSON line to bench/results/generation_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from graftlm.kernels.small_batch_linear import use_small_batch_kernel
    from graftlm.methods.lora.config import LoraConfig
    from graftlm.methods.lora.inject import inject, lora_layers, merge, unmerge
    from graftlm.models.load import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--no-small-batch-kernel",
        action="store_true",
        help="decode with torch's F.linear instead of graftlm's small-batch C kernel",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct")
    model.eval()
    if not args.no_small_batch_kernel:  # as graftlm generate / serve load it
        use_small_batch_kernel(model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "My router will not turn on after the storm last night."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    targets = "all-linear" if args.targets == "all-linear" else tuple(args.targets.split(","))
    adapter = LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=targets)

    def decode(model, batch: int) -> float:
        ids = tokenizer([prompt] * batch, return_tensors="pt", add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return (time.perf_counter() - start) / args.new_tokens / batch * 1e3

    # "base": a copy of the plain model made before any adapter exists (no wrapper modules).
    # The adapted model is a copy too: the loaded weights are a private file mapping, and the
    # first merge writes them (copy-on-write into fresh pages), so comparing the loaded weights
    # with a heap copy measured memory placement as well as the adapter.
    base_model = copy.deepcopy(model)
    adapted = copy.deepcopy(model)
    del model
    inject(adapted, adapter)
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.02)
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for batch in batches:
        decode(base_model, batch)  # warm up
    for _ in range(args.repeats):
        for batch in batches:
            times.setdefault(("base", batch), []).append(decode(base_model, batch))
            times.setdefault(("unmerged", batch), []).append(decode(adapted, batch))
            merge(adapted)
            times.setdefault(("merged", batch), []).append(decode(adapted, batch))
            unmerge(adapted)

    print(
        f"SmolLM2-135M, LoRA rank {args.rank} on {args.targets}, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    result = {
        "rank": args.rank,
        "targets": args.targets,
        "new_tokens": args.new_tokens,
        "small_batch_kernel": not args.no_small_batch_kernel,
    }
    for batch in batches:
        base = statistics.median(times[("base", batch)])
        for kind in ("base", "unmerged", "merged"):
            ms = statistics.median(times[(kind, batch)])
            print(f"  batch {batch}  {kind:9s} {ms:7.2f} ms/token   {ms / base:5.2f}x base")
            result[f"b{batch}_{kind}_ms"] = round(ms, 3)
        result[f"b{batch}_unmerged_overhead"] = round(
            statistics.median(times[("unmerged", batch)]) / base - 1, 4
        )
    out = ROOT / "bench" / "results" / "generation_overhead.jsonl"
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
