"""How much of QLoRA's loss of quality comes from quantizing an already 4-bit base twice?

The built-in model is a Q4_1 GGUF file: its weights W1 are already rounded to 4 bits (blocks of
32, a scale and a minimum each). QLoRA rounds them again, to NF4 (blocks of 64, double-quantized
scales), so its base has two rounding errors stacked. The full-precision original is not on this
machine (no model hub), so this script rebuilds a plausible one:

    W0 = W1 + u,   u uniform within each Q4_1 step (the rounding error Q4_1 threw away)

Q4_1(W0) is then W1 again (up to the scales' fp16 rounding), so W0 is an original consistent with
the file. Against W0 it compares four bases:

    W0             the "original" (what a bf16 checkpoint would give)
    Q4_1(W0)       the shipped file's rounding
    NF4(W0)        QLoRA on a full-precision checkpoint: one rounding
    NF4(Q4_1(W0))  QLoRA on the built-in model: two roundings

and prints, for each, the relative weight error ||W - W0|| / ||W0|| over every linear weight, and
the teacher-forced answer loss (nats per answer token) of the base model on the test files of the
task zoo (`examples/data/zoo`). The difference between the last two rows is what the double
rounding costs; between NF4(W0) and W0, what NF4 costs on its own.

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


def plausible_original(w1: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """W1 plus noise uniform over each Q4_1 block's step: a full-precision weight whose Q4_1
    rounding is W1."""
    blocks = w1.reshape(-1, 32)
    step = (blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)) / 15
    noise = (torch.rand(blocks.shape, generator=generator) - 0.5) * step
    return (blocks + noise).reshape(w1.shape)


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
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_model(dtype=torch.float32)
    pad_id = pad_token_id(tokenizer)
    examples_by_task = {
        task.name: load_dataset(task / "test.jsonl", tokenizer, 1024)[0]
        for task in sorted(ZOO.iterdir())
        if (task / "test.jsonl").exists()
    }
    weights = linear_weights(model)
    w1 = {name: p.detach().clone() for name, p in weights.items()}
    w0 = {name: plausible_original(w, generator) for name, w in w1.items()}
    variants = {
        "W0 (original)": lambda name: w0[name],
        "Q4_1(W0)": lambda name: q4_1(w0[name]),
        "NF4(W0)": lambda name: nf4(w0[name]),
        "NF4(Q4_1(W0))": lambda name: nf4(q4_1(w0[name])),
        "NF4(W1) (QLoRA's base today)": lambda name: nf4(w1[name]),
    }
    print(f"torch {torch.__version__}, CPU bf16 units: {bf16_supported()}, "
          f"{platform.processor() or platform.machine()}; losses in float32")  # fmt: skip
    print(f"{len(weights)} linear weights; answer tokens per zoo test file: "
          + ", ".join(f"{t} {sum(sum(1 for x in e.labels if x != -100) for e in ex)}"
                      for t, ex in examples_by_task.items()))  # fmt: skip
    print(f"Q4_1(W0) vs W1 (should be ~0: W0 rounds back to the file): "
          f"{rel_error({n: q4_1(w0[n]) for n in w1}, w1):.5f}\n")  # fmt: skip
    header = f"{'base':30s} {'rel_err vs W0':>13s} " + " ".join(
        f"{t[:12]:>12s}" for t in examples_by_task
    )
    print(header + f" {'mean':>8s}")
    for label, make in variants.items():
        built = {name: make(name) for name in weights}
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(built[name])
        losses = answer_loss(model, examples_by_task, pad_id, torch.float32)
        mean = sum(losses.values()) / len(losses)
        print(f"{label:30s} {rel_error(built, w0):13.5f} "
              + " ".join(f"{v:12.4f}" for v in losses.values()) + f" {mean:8.4f}", flush=True)  # fmt: skip


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
