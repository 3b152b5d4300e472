"""Does llama.cpp answer like graftlm after `graftlm export`? Exact match on a task's test rows.

    .venv/bin/python bench/gguf_accuracy.py                       # tickets, first 100 test rows
    .venv/bin/python bench/gguf_accuracy.py --task intent_slots --adapter runs/intent

Trains an adapter with `graftlm train`'s defaults if `--adapter` does not exist yet, then scores
greedy exact match on the task's held-out test rows (unseen phrasings) four ways:

- graftlm (`graftlm.infer.generate`, fp32 on the dequantized built-in model) — the reference;
- llama.cpp on the built-in Q4_1 GGUF + the adapter exported with ``--format gguf`` (f32);
- llama.cpp on the merged model exported with ``--format gguf-merged`` (``--quant`` f16, q8_0, q4_1).

The prompt text is the same for both (the chat template applied by graftlm, tokenized by each
side with special tokens and no BOS; the token ids are checked equal). Prints a table and appends
one JSON line to `bench/results/gguf_accuracy.jsonl`. Needs llama-cpp-python (`make test`
builds it into .venv).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from graftlm.cli.parser import main as cli_main
    from graftlm.data.dataset import prompt_for_generation, read_rows, reference_answer
    from graftlm.export.gguf import export_adapter_gguf, export_merged_gguf
    from graftlm.export.llamacpp_run import LlamaCpp
    from graftlm.infer.generate import SamplingConfig, generate, load_for_inference
    from graftlm.models.load import builtin_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tickets", help="a folder under examples/data")
    parser.add_argument(
        "--adapter", default=None, help="default: runs/gguf_<task> (trained if missing)"
    )
    parser.add_argument("--rows", type=int, default=100, help="score the first N test rows")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--merged", nargs="*", default=["f16", "q8_0", "q4_1"], help="--quant values"
    )
    parser.add_argument(
        "--results", default=str(ROOT / "bench" / "results" / "gguf_accuracy.jsonl")
    )
    args = parser.parse_args()

    data = ROOT / "examples" / "data" / args.task
    adapter = Path(args.adapter or ROOT / "runs" / f"gguf_{args.task}")
    if not (adapter / "adapter_config.json").is_file():
        start = time.perf_counter()
        train = ["train", "--data", str(data / "train.jsonl"), "--out", str(adapter), "--quiet"]
        assert cli_main(train) == 0
        print(f"trained {adapter} with the defaults in {time.perf_counter() - start:.0f} s")

    rows, _ = read_rows(data / "test.jsonl")
    rows = rows[: args.rows]
    refs = [reference_answer(r).strip() for r in rows]
    model, tokenizer = load_for_inference(None, {"default": str(adapter)})
    prompts = [prompt_for_generation(r, tokenizer) for r in rows]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    def score(outputs: list[str]) -> float:
        return sum(o.strip() == r for o, r in zip(outputs, refs)) / len(refs)

    results: dict[str, dict] = {}
    start = time.perf_counter()
    reference = generate(model, tokenizer, prompts, sampling=sampling, batch_size=16)
    results["graftlm"] = {"exact_match": score(reference), "seconds": time.perf_counter() - start}
    del model

    work = adapter / "gguf"
    work.mkdir(exist_ok=True)
    runs = [
        (
            "llama.cpp Q4_1 base + adapter (f32)",
            builtin_gguf_path(),
            export_adapter_gguf(adapter, work / "adapter-f32.gguf"),
        )
    ]
    for quant in args.merged:
        path = export_merged_gguf(adapter, work / f"merged-{quant}.gguf", quant=quant)
        runs.append((f"llama.cpp merged {quant}", path, None))
    for name, model_path, lora_path in runs:
        with LlamaCpp(model_path, lora_path=lora_path) as llm:
            mismatched = sum(
                llm.tokenize(p) != tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts
            )
            start = time.perf_counter()
            outputs = llm.generate(prompts, max_new_tokens=args.max_new_tokens)
        results[name] = {
            "exact_match": score(outputs),
            "same_text_as_graftlm": sum(a == b for a, b in zip(outputs, reference)) / len(rows),
            "prompts_tokenized_differently": mismatched,
            "seconds": time.perf_counter() - start,
            "file_mb": round((lora_path or model_path).stat().st_size / 1e6, 1),
        }

    print(f"\n{args.task}: {len(rows)} test rows, adapter {adapter}")
    print(f"{'':40} {'exact match':>11} {'same text':>10} {'seconds':>8}")
    for name, r in results.items():
        same = r.get("same_text_as_graftlm")
        same_text = "" if same is None else f"{same:.2f}"
        print(f"{name:40} {r['exact_match']:11.2f} {same_text:>10} {r['seconds']:8.1f}")
    record = {
        "task": args.task,
        "rows": len(rows),
        "adapter": str(adapter),
        "results": results,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
