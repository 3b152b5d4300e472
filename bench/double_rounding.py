"""How much of QLoRA's loss of quality comes from quantizing an already 4-bit base twice?

The built-in model is a Q4_1 GGUF file: its weights W1 are already rounded to 4 bits (blocks of
32, a scale and a minimum each). QLoRA rounds them again, to NF4 (blocks of 64, double-quantized
scales), so its base stacks two rounding errors, where QLoRA on a bf16 checkpoint has one. The
full-precision original is not on this machine (no model hub), and no W0 can be rebuilt from W1
(a random point of each Q4_1 cell is a worse model than W1 itself: a first version of this
script tried that). So the script moves the question one rounding down: it takes W1 as the
"original" and makes a second 4-bit file from it,

    W2 = Q4_1(W1) with its blocks shifted by 16 columns (gguf-py's reference quantizer; shifted
         so that the grid differs from W1's and the rounding is a real one)

and compares NF4 on the original with NF4 on the 4-bit file:

    one rounding    NF4(W1) against W1
    two roundings   NF4(W2) against W2

For each it prints the relative weight error ||NF4(W) - W|| / ||W|| over every linear weight,
and the teacher-forced answer loss (nats per answer token) of the base model on the test files of
the task zoo (`examples/data/zoo`). LoRA trains on W and QLoRA on NF4(W), so the loss increase
NF4 causes on W is the start-of-training gap between them; the difference between the two
increases is what the double rounding adds.

    .venv/bin/python bench/double_rounding.py [--out bench/results/double_rounding.txt]
"""

from __future__ import annotations

import argparse
import io
import platform
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from graftlm.data.dataset import load_dataset
from graftlm.models.load import load_model
from graftlm.quant.nf4 import dequantize_nf4, quantize_nf4
from graftlm.train.adaptive import pad_token_id
from graftlm.train.distributed import Runtime, bf16_supported
from graftlm.train.forward import evaluate

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples" / "data" / "zoo"
Q4_1 = GGMLQuantizationType.Q4_1
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """Round-trip through GGUF's Q4_1 (gguf-py's reference quantizer, blocks of 32 per row)."""
    packed = quantize(w.numpy().astype(np.float32), Q4_1)
    return torch.from_numpy(dequantize(packed, Q4_1).copy()).reshape(w.shape)


def shifted_q4_1(w: torch.Tensor, shift: int = 16) -> torch.Tensor:
    """A second Q4_1 rounding of `w` whose blocks of 32 start `shift` columns later."""
    return q4_1(w.roll(-shift, dims=1)).roll(shift, dims=1)


def nf4(w: torch.Tensor) -> torch.Tensor:
    """Round-trip through NF4 with double-quantized scales (QLoRA's base)."""
    return dequantize_nf4(quantize_nf4(w), torch.float32)


def linear_weights(model) -> dict[str, torch.nn.Parameter]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LINEARS
    }


def answer_loss(model, examples_by_task, pad_id, dtype) -> dict[str, float]:
    runtime = Runtime.single()
    return {
        task: evaluate(model, examples, pad_id, dtype, runtime)[0]
        for task, examples in examples_by_task.items()
    }


def run(seed: int) -> None:
    torch.manual_seed(seed)
    model, tokenizer = load_model(dtype=torch.float32)
    pad_id = pad_token_id(tokenizer)
    examples_by_task = {
        task.name: load_dataset(task / "test.jsonl", tokenizer, 1024)[0]
        for task in sorted(ZOO.iterdir())
        if (task / "test.jsonl").exists()
    }
    weights = linear_weights(model)
    w1 = {name: p.detach().clone() for name, p in weights.items()}
    w2 = {name: shifted_q4_1(w) for name, w in w1.items()}
    nf4_w1 = {name: nf4(w) for name, w in w1.items()}
    nf4_w2 = {name: nf4(w) for name, w in w2.items()}
    print(f"torch {torch.__version__}, CPU bf16 units: {bf16_supported()}, "
          f"{platform.processor() or platform.machine()}; losses in float32")  # fmt: skip
    print(f"{len(weights)} linear weights; answer tokens per zoo test file: "
          + ", ".join(f"{t} {sum(sum(1 for x in e.labels if x != -100) for e in ex)}"
                      for t, ex in examples_by_task.items()))  # fmt: skip
    print(f"W1 vs Q4_1(W1) on W1's own block grid (~0: W1 is a Q4_1 file): "
          f"{rel_error({n: q4_1(w) for n, w in w1.items()}, w1):.5f}")  # fmt: skip
    print(f"W2 (second Q4_1 rounding, shifted blocks) vs W1: {rel_error(w2, w1):.5f}\n")
    variants = [
        ("W1 (the file; 'original')", w1, w1),
        ("NF4(W1): one rounding", nf4_w1, w1),
        ("W2 = Q4_1'(W1)", w2, w1),
        ("NF4(W2): two roundings", nf4_w2, w2),
    ]
    header = f"{'base':28s} {'rel_err':>8s} {'vs':>3s} " + " ".join(
        f"{t[:12]:>12s}" for t in examples_by_task
    )
    print(header + f" {'mean':>8s}")
    means = {}
    for label, built, reference in variants:
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(built[name])
        losses = answer_loss(model, examples_by_task, pad_id, torch.float32)
        means[label] = sum(losses.values()) / len(losses)
        ref = "W1" if reference is w1 else "W2"
        print(f"{label:28s} {rel_error(built, reference):8.5f} {ref:>3s} "
              + " ".join(f"{v:12.4f}" for v in losses.values()) + f" {means[label]:8.4f}",
              flush=True)  # fmt: skip
    labels = [v[0] for v in variants]
    one = means[labels[1]] - means[labels[0]]
    two = means[labels[3]] - means[labels[2]]
    print(f"\nNF4's loss increase on the original: {one:+.4f} nats/token; on the 4-bit file: "
          f"{two:+.4f}; the double rounding adds {two - one:+.4f}")  # fmt: skip


def rel_error(built: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||built - reference|| / ||reference|| over all weights together (Frobenius)."""
    num = sum(float((built[n] - reference[n]).pow(2).sum()) for n in reference)
    den = sum(float(reference[n].pow(2).sum()) for n in reference)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        run(args.seed)
    print(buffer.getvalue(), end="")
    if args.out:
        Path(args.out).write_text(buffer.getvalue())


if __name__ == "__main__":
    main()
