"""What an adaptive run's validation costs: greedy generation against exact match read off the
teacher-forced loss pass (`graftlm.train.validation.GreedyAnswers`), and whether the two agree.

    .venv/bin/python bench/validation_speed.py --tasks ticket_triage,date_time --steps 12

For each zoo task: train a LoRA adapter for `--steps` steps with the defaults (so that some
answers are right and some are not), load it, and score the first `--rows` rows of the task's
test file (phrasings training never saw) three ways, in one process: the loss pass alone (what
every evaluation runs anyway), the loss pass with the greedy answers counted in it, and greedy
generation (the scorer adaptive runs used before). Prints the seconds of each, the ratios, and
the rows on which the two exact matches disagree; appends a row per task to
`bench/results/validation_speed.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples" / "data" / "zoo"


def measure(task: str, steps: int, rows: int, work: Path, dtype_name: str) -> dict:
    """Train `task` for `steps` steps, then time and compare the three scorers in `dtype_name`
    ("auto": bf16 where the CPU has it, as training does)."""
    import torch

    from graftlm.data.dataset import tokenize_rows
    from graftlm.data.readers import read_rows
    from graftlm.infer.generate import load_for_inference
    from graftlm.train.adaptive import pad_token_id
    from graftlm.train.config import TrainConfig
    from graftlm.train.distributed import Runtime, bf16_supported
    from graftlm.train.forward import evaluate
    from graftlm.train.loop import train
    from graftlm.train.validation import GreedyAnswers, answer_stop_ids, greedy_rows_right

    out = work / task
    if dtype_name == "auto":
        dtype_name = "bfloat16" if bf16_supported() else "float32"
    dtype = getattr(torch, dtype_name)
    cfg = TrainConfig(data=str(ZOO / task / "train.jsonl"), out=str(out), steps=steps,
                      dtype=dtype_name)  # fmt: skip
    train(cfg, progress=False)
    model, tokenizer = load_for_inference(None, {"a": str(out)}, dtype=dtype_name)
    data, fmt = read_rows(ZOO / task / "test.jsonl")
    examples, _ = tokenize_rows(data[:rows], fmt, tokenizer, 1024)
    pad, single = pad_token_id(tokenizer), Runtime.single()

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    _, loss_s = timed(lambda: evaluate(model, examples, pad, dtype, single))
    answers = GreedyAnswers(model, examples, answer_stop_ids(model, tokenizer, examples))
    _, counted_s = timed(lambda: evaluate(model, examples, pad, dtype, single, per_batch=answers))
    generated, greedy_s = timed(lambda: greedy_rows_right(model, tokenizer, examples, pad, dtype))
    forced = [answers.right[i] for i in range(len(examples))]
    differing = [i for i, (g, f) in enumerate(zip(generated, forced)) if g != f]
    return {
        "task": task,
        "steps": steps,
        "rows": len(examples),
        "dtype": str(dtype).removeprefix("torch."),
        "exact_generated": round(sum(generated) / len(examples), 4),
        "exact_from_loss_pass": round(sum(forced) / len(examples), 4),
        "rows_disagreeing": differing,
        "disagreements": [
            explain(model, tokenizer, examples[i], dtype, generated[i]) for i in differing
        ],
        "loss_pass_s": round(loss_s, 2),
        "loss_pass_with_answers_s": round(counted_s, 2),
        "generation_s": round(greedy_s, 2),
        "validation_before_s": round(loss_s + greedy_s, 2),
        "validation_now_s": round(counted_s, 2),
        "speedup": round((loss_s + greedy_s) / counted_s, 2),
    }


def explain(model, tokenizer, example, dtype, generated_right: bool) -> dict:
    """One row the two scorers judge differently: its reference, the greedy answer generated for
    the row alone (no batch, no padding), and the argmax of each answer token in a one-row
    teacher-forced pass,
    with the margin between the two best logits where they differ from the reference."""
    import torch

    from graftlm.train.forward import autocast
    from graftlm.train.validation import answer_span

    start, end = answer_span(example)
    ids = torch.tensor([example.input_ids[:end]])
    with torch.no_grad(), autocast(dtype):
        logits = model(input_ids=ids).logits[0, start - 1 : end - 1].float()
        alone = model.generate(input_ids=ids[:, :start], do_sample=False,
                               max_new_tokens=end - start + 2)[0, start:]  # fmt: skip
    top2 = logits.topk(2, dim=-1)
    reference = example.input_ids[start:end]
    misses = [
        {"position": k, "reference": tokenizer.decode([reference[k]]),
         "argmax": tokenizer.decode([int(top2.indices[k, 0])]),
         "margin": round(float(top2.values[k, 0] - top2.values[k, 1]), 4)}
        for k in range(end - start) if int(top2.indices[k, 0]) != reference[k]
    ]  # fmt: skip
    return {
        "generated_right": generated_right,
        "reference": tokenizer.decode(reference),
        "generated_alone": tokenizer.decode(alone),
        "forced_misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="ticket_triage,date_time,quantities,bank_intent")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--results", default=str(ROOT / "bench/results/validation_speed.jsonl"))
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("graftlm").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks.split(","):
            row = measure(task, args.steps, args.rows, Path(work), args.dtype)
            row.update(threads=torch.get_num_threads(), machine=platform.machine())
            print(
                f"{task:15s} exact {row['exact_generated']:.3f} generated / "
                f"{row['exact_from_loss_pass']:.3f} from the loss pass "
                f"({len(row['rows_disagreeing'])} of {row['rows']} rows differ); "
                f"validation {row['validation_before_s']:.1f} s -> {row['validation_now_s']:.1f} s "
                f"({row['speedup']:.2f}x; loss pass {row['loss_pass_s']:.1f} s, "
                f"generation {row['generation_s']:.1f} s)",
                flush=True,
            )
            with open(args.results, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
