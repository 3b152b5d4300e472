"""Which instruction set torch, MKL, oneDNN and graftlm's C kernels run at, and what `--dtype
auto` picks: the check that an emulated AVX2 CPU (ISA caps on an AVX-512 machine) is one.

    .venv/bin/python bench/isa_caps.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        GRAFTLM_KERNEL_ISA=avx2 MKL_VERBOSE=1 ONEDNN_VERBOSE=1 .venv/bin/python bench/isa_caps.py

Prints torch's CPU capability, graftlm's compile flags for `fused_cpu.c` and `bf16_supported()`,
one-thread fp32 and bf16 matrix-product rates (an fp32 rate that drops shows MKL's cap), and runs
one oneDNN convolution, so that `MKL_VERBOSE=1` / `ONEDNN_VERBOSE=1` print each library's ISA
line (MKL: "... Intel(R) AVX2 ... enabled processors"; oneDNN: "isa:Intel AVX2", "jit:avx2").
"""

from __future__ import annotations

import os
import time

import torch

from graftlm.kernels import fused_cpu
from graftlm.train.distributed import bf16_supported

CAP_VARS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "GRAFTLM_KERNEL_ISA",
)


def matmul_rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n product in `dtype` (one warm-up call first)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    torch.set_num_threads(1)
    print("caps:", {name: os.environ.get(name) for name in CAP_VARS})
    print("torch cpu capability:", torch.backends.cpu.get_cpu_capability())
    print("graftlm fused_cpu.c flags:", " ".join(fused_cpu.compile_flags() or ("(not built)",)))
    print("graftlm bf16_supported() (--dtype auto picks bf16):", bf16_supported())
    print(f"fp32 2048 x 2048 product: {matmul_rate(torch.float32, 2048, 5):.1f} GFLOP/s")
    print(f"bf16 1024 x 1024 product: {matmul_rate(torch.bfloat16, 1024, 2):.1f} GFLOP/s")
    # a oneDNN primitive, for ONEDNN_VERBOSE's "isa:" and "jit:" lines
    image, kernel = torch.randn(1, 16, 32, 32), torch.randn(16, 16, 3, 3)
    torch.ops.aten.mkldnn_convolution(image, kernel, None, [0, 0], [1, 1], [1, 1], 1)


if __name__ == "__main__":
    main()
