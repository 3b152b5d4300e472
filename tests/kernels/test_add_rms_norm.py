"""The residual add fused into the RMSNorm after it (`fused_cpu.AddRMSNormFunction`, the
decoder-layer forward of `fused_ops.decoder_layer_forward`), and the AVX2 cap of the C kernels
(`GRAFTLM_KERNEL_ISA=avx2`)."""

from __future__ import annotations

import helpers
import pytest
import torch

from graftlm.errors import GraftError
from graftlm.kernels import build, fused_cpu, fused_ops
from graftlm.kernels.fused_ops import add_rms_norm, fused_forwards
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject
from graftlm.train import checkpointing, distributed

pytestmark = pytest.mark.skipif(
    fused_cpu.library() is None, reason="no C compiler or no AVX2 here: the torch path runs"
)

BF16 = torch.bfloat16
TOL = dict(rtol=2e-2, atol=2e-2)  # bf16: 8 significant bits, a few roundings


def _bf16(*shape, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(BF16)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _inputs(rows, n, dtype=BF16):
    residual, x = _bf16(rows, n, seed=1, scale=3.0), _bf16(rows, n, seed=2)
    weight = (1 + 0.1 * _bf16(n, seed=3).float()).to(BF16)
    grads = _bf16(rows, n, seed=4), _bf16(rows, n, seed=5)
    return [t.to(dtype) for t in (residual, x, weight, *grads)]


def _unfused(residual, x, weight, grad_h, grad_y, norm):
    """h = residual + x, y = norm(h, weight); backward of (h * grad_h + y * grad_y).sum()."""
    leaves = _leaves(residual, x, weight)
    h = leaves[0] + leaves[1]
    y = norm(h, leaves[2])
    torch.autograd.backward([h, y], [grad_h.to(h.dtype), grad_y.to(y.dtype)])
    return h.detach(), y.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("rows,n", [(1, 64), (5, 17), (3, 576), (64, 600)])
def test_add_rms_norm_matches_the_unfused_add_and_norm(rows, n, dtype):
    residual, x, weight, grad_h, grad_y = _inputs(rows, n, dtype)
    leaves = _leaves(residual, x, weight)
    h, y = fused_cpu.AddRMSNormFunction.apply(*leaves, 1e-5)
    torch.autograd.backward([h, y], [grad_h, grad_y])
    # the forward is the unfused one bit for bit: torch's add, the RMSNorm kernel
    ref_h, ref_y, ref_grads = _unfused(
        residual,
        x,
        weight,
        grad_h,
        grad_y,
        lambda a, w: fused_cpu.RMSNormFunction.apply(a, w, 1e-5),
    )
    assert torch.equal(h, ref_h) and torch.equal(y, ref_y)
    tol = TOL if dtype is BF16 else dict(rtol=2e-5, atol=2e-5)
    for got, want in zip([leaf.grad for leaf in leaves], ref_grads):
        assert got.dtype is dtype
        torch.testing.assert_close(got, want, **tol)
    # and against float64 (the fused backward rounds once where the unfused rounds twice)
    _, wide_y, wide_grads = _unfused(
        residual.double(), x.double(), weight.double(), grad_h, grad_y,
        lambda a, w: w * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)),
    )  # fmt: skip
    torch.testing.assert_close(y.double(), wide_y, **tol)
    for got, want in zip([leaf.grad for leaf in leaves[:2]], wide_grads):
        torch.testing.assert_close(got.double(), want, **tol)
    # dweight sums `rows` products: its error grows with the sum's size
    torch.testing.assert_close(
        leaves[2].grad.double(), wide_grads[2], rtol=tol["rtol"], atol=tol["atol"] * rows**0.5
    )
    assert torch.equal(leaves[0].grad, leaves[1].grad)  # d residual = d x


def test_add_rms_norm_with_only_one_output_used():
    residual, x, weight, grad_h, grad_y = _inputs(4, 96)
    for used in ("h", "y"):
        leaves = _leaves(residual, x, weight)
        h, y = fused_cpu.AddRMSNormFunction.apply(*leaves, 1e-6)
        (h if used == "h" else y).backward(grad_h if used == "h" else grad_y)
        zero = torch.zeros_like(grad_h)
        _, _, want = _unfused(
            residual, x, weight, grad_h if used == "h" else zero, grad_y if used == "y" else zero,
            lambda a, w: fused_cpu.RMSNormFunction.apply(a, w, 1e-6),
        )  # fmt: skip
        torch.testing.assert_close(leaves[0].grad, want[0], **TOL)
        if used == "h":
            assert torch.equal(leaves[0].grad, grad_h) and leaves[2].grad is None
        else:
            torch.testing.assert_close(leaves[2].grad, want[2], **TOL)


def test_float32_takes_the_kernel_and_falls_back_to_the_add_and_the_norm_exactly(monkeypatch):
    model = helpers.tiny_llama()
    norm = model.model.layers[0].post_attention_layernorm
    residual, x = torch.randn(2, 5, 64), torch.randn(2, 5, 64).requires_grad_(True)
    h, y = add_rms_norm(residual, x, norm)
    assert "AddRMSNorm" in type(y.grad_fn).__name__
    # the add is one fp32 addition either way; the norm's row sum runs in another order
    assert torch.equal(h, residual + x)
    torch.testing.assert_close(y, norm(residual + x), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(fused_cpu.DISABLE_VAR, "0")
    fused_cpu.clear_cache()
    try:
        h, y = add_rms_norm(residual, x, norm)
        assert "AddRMSNorm" not in type(y.grad_fn).__name__
        assert torch.equal(h, residual + x) and torch.equal(y, norm(residual + x))
    finally:
        monkeypatch.delenv(fused_cpu.DISABLE_VAR)
        fused_cpu.clear_cache()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
    )
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _counts_add_norm(out: torch.Tensor) -> int:
    nodes, seen, count = [out.grad_fn], set(), 0
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += getattr(node, "_forward_cls", None) is fused_cpu.AddRMSNormFunction
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return count


def _bf16_llama():
    torch.manual_seed(0)  # the adapter's initialization
    model = helpers.tiny_llama(seed=3).to(BF16)
    inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide the gradients of A
            torch.nn.init.normal_(param, std=0.1)
    return model


def test_bf16_llama_with_the_fused_adds_matches_the_adds_apart(monkeypatch):
    model = _bf16_llama()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    plain_logits, plain = _loss_and_grads(model, ids)  # transformers' code
    with fused_forwards(model):
        logits, grads = _loss_and_grads(model, ids)
        # two adds per layer: after the attention, and after the MLP into the next norm
        assert _counts_add_norm(model(input_ids=ids).logits) == 2 * 2
    with monkeypatch.context() as patch:
        patch.setattr(fused_ops, "_is_llama_layer", lambda module: False)
        with fused_forwards(model):
            apart_logits, apart = _loss_and_grads(model, ids)  # every other kernel, adds apart
            assert _counts_add_norm(model(input_ids=ids).logits) == 0
    assert torch.equal(logits, apart_logits)  # the same roundings in the forward
    torch.testing.assert_close(logits.float(), plain_logits.float(), **TOL)
    assert grads.keys() == apart.keys() == plain.keys() and len(grads) > 0
    for name, grad in grads.items():
        scale = apart[name].abs().max().item()
        torch.testing.assert_close(grad, apart[name], rtol=0, atol=3e-2 * scale, msg=name)
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=5e-2 * scale, msg=name)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_checkpointed_layers_are_still_checkpointed_and_run_their_own_forward():
    """transformers 5 checkpoints a layer inside its class's forward: a layer checkpointed while
    the fused forwards are on must still recompute in backward (it once ran the fused body
    unchecked, and QLoRA's low-memory runs kept every activation), with the same logits."""
    model = _bf16_llama()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    with fused_forwards(model):
        logits, grads = _loss_and_grads(model, ids)
    checkpointing.enable(model)
    model.train()
    calls = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        for layer in model.model.layers
    ]
    with fused_forwards(model):
        logits_ckpt, grads_ckpt = _loss_and_grads(model, ids)
        layers = len(model.model.layers)
        assert len(calls) == 2 * layers  # the forward, and the recomputation in backward
        out = model(input_ids=ids).logits
        assert _counts_add_norm(out) == 0  # transformers' forward: adds apart, none across layers
    for hook in hooks:
        hook.remove()
    assert torch.equal(logits, logits_ckpt)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=3e-2 * scale, msg=name)


def test_kernel_isa_cap_builds_the_avx2_loops_with_the_same_numbers(monkeypatch):
    residual, x, weight, grad_h, grad_y = _inputs(16, 576)
    gate, up = _bf16(4096, seed=6), _bf16(4096, seed=7)
    results = {}
    for cap in ("native", "avx2"):
        monkeypatch.setenv(build.ISA_VAR, cap)
        fused_cpu.clear_cache()
        flags = fused_cpu.compile_flags()
        assert flags is not None
        # an AVX2-only CPU builds the AVX2 loops either way
        avx512 = cap == "native" and build.missing_requirement(fused_cpu.AVX512_CPU) is None
        assert avx512 == any(f.startswith("-mavx512") for f in flags)
        leaves = _leaves(residual, x, weight)
        h, y = fused_cpu.AddRMSNormFunction.apply(*leaves, 1e-5)
        torch.autograd.backward([h, y], [grad_h, grad_y])
        swiglu = fused_cpu.SwiGLUFunction.apply(gate, up)
        results[cap] = [h, y, swiglu, *(leaf.grad for leaf in leaves)]
    fused_cpu.clear_cache()
    monkeypatch.delenv(build.ISA_VAR)
    for native, avx2 in zip(results["native"], results["avx2"]):
        # the row sums add in another order: at most one bf16 rounding step apart
        torch.testing.assert_close(avx2, native, rtol=2**-7, atol=1e-6)


def test_kernel_isa_cap_hides_avx512_and_bf16_from_dtype_auto(monkeypatch):
    monkeypatch.setenv(build.ISA_VAR, "avx2")
    distributed.bf16_supported.cache_clear()
    try:
        assert not any(f.startswith(("avx512", "amx")) for f in build.cpu_flags() or ())
        assert distributed.bf16_supported() is False
        monkeypatch.setenv(build.ISA_VAR, "native")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
        distributed.bf16_supported.cache_clear()
        assert distributed.bf16_supported() is False
        monkeypatch.setenv(build.ISA_VAR, "avx-9000")
        with pytest.raises(GraftError, match="GRAFTLM_KERNEL_ISA='avx-9000'"):
            build.cpu_flags()
    finally:
        monkeypatch.undo()
        distributed.bf16_supported.cache_clear()
