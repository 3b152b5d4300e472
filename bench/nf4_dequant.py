"""NF4 dequantization: torch's gather + multiply against the C kernel (`kernels/nf4_dequant.py`).

Times `NF4Tensor.dequantize` for one weight of the built-in model's largest shape (1536 x 576,
the MLP projections), double-quantized, into fp32 and bf16, with the kernel and without, next to
a matrix product of that weight with a pass of tokens (what the dequantization feeds). Median of
`--repeats` calls, per thread count. Results: bench/results/qlora_speed.txt.

    python bench/nf4_dequant.py [--threads 1,2] [--tokens 2048] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from graftlm.kernels import nf4_dequant
from graftlm.quant.nf4 import quantize_nf4


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up (and compile the kernel on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shape", default="1536,576")
    args = parser.parse_args()
    out_features, in_features = map(int, args.shape.split(","))
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(out_features, in_features) * 0.02)
    print(
        f"weight {out_features}x{in_features}, double-quantized; kernel: {nf4_dequant.kernel() is not None}"
    )
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            torch_ms = median_ms(partial(q.dequantize, dtype, use_kernel=False), args.repeats)
            kernel_ms = median_ms(partial(q.dequantize, dtype), args.repeats)
            w = q.dequantize(dtype)
            x = torch.randn(args.tokens, in_features, dtype=dtype)
            matmul = partial(torch.nn.functional.linear, x, w)
            matmul_ms = median_ms(matmul, max(5, args.repeats // 5))
            print(
                f"threads={threads} {name:8s} dequantize: torch {torch_ms:6.2f} ms, "
                f"kernel {kernel_ms:5.2f} ms ({torch_ms / kernel_ms:4.1f}x); "
                f"matmul of {args.tokens} tokens {matmul_ms:6.2f} ms"
            )


if __name__ == "__main__":
    main()
