"""Choose prompt/prefix tuning's defaults: train one setting, score the held-out test rows.

    .venv/bin/python bench/prompt_prefix_recipe.py --task tickets --method prefix \\
        --set num_virtual_tokens=20 prompt_init=vocab lr=3e-2 epochs=3

Prints and appends to `bench/results/prompt_prefix.jsonl`: the settings, optimizer steps,
training seconds, final train/eval loss, and on the task's test file (unseen phrasings) greedy
exact match and field accuracy (`graftlm.infer.answer_fields`). Seconds depend on machine load;
accuracies do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tickets", help="a folder under examples/data")
    parser.add_argument("--method", default="prompt", choices=("prompt", "prefix"))
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE TrainConfig settings")
    parser.add_argument("--out", default=None, help="adapter folder (default: a temp folder)")
    parser.add_argument(
        "--results", default=str(ROOT / "bench" / "results" / "prompt_prefix.jsonl")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from graftlm.data.dataset import prompt_for_generation, read_rows, reference_answer
    from graftlm.infer.answer_fields import field_accuracy
    from graftlm.infer.generate import SamplingConfig, generate, load_for_inference
    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train

    settings = dict(item.split("=", 1) for item in args.set)
    settings = {k: parse_value(v) for k, v in settings.items()}
    out = Path(args.out or tempfile.mkdtemp(prefix=f"{args.method}-{args.task}-"))
    task = DATA / args.task
    started = time.perf_counter()
    cfg = TrainConfig(data=str(task / "train.jsonl"), out=str(out), method=args.method, **settings)
    result = train(cfg, progress=False)
    train_s = time.perf_counter() - started

    model, tokenizer = load_for_inference(None, {"default": str(out)})
    rows, _ = read_rows(task / "test.jsonl")
    refs = [reference_answer(r).strip() for r in rows]
    prompts = [prompt_for_generation(r, tokenizer) for r in rows]
    outputs = generate(
        model, tokenizer, prompts, sampling=SamplingConfig(max_new_tokens=48), batch_size=16
    )
    record = {
        "task": args.task,
        "method": args.method,
        "settings": settings,
        "steps": result.total_steps,
        "train_s": round(train_s),
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "exact_match": sum(o.strip() == r for o, r in zip(outputs, refs)) / len(refs),
        "field_accuracy": sum(field_accuracy(o, r) for o, r in zip(outputs, refs)) / len(refs),
        "trainable_parameters": result.trainable_parameters,
        "test_rows": len(refs),
        "examples": [[o, r] for o, r in zip(outputs[:3], refs[:3])],
    }
    print(json.dumps(record))
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
