"""The NF4 dequantization kernel: the same bits as the torch path, used only where it applies."""

from __future__ import annotations

import pytest
import torch

from graftlm.kernels import nf4_dequant
from graftlm.quant.nf4 import NF4_CODE, NF4Tensor, quantize_nf4

needs_kernel = pytest.mark.skipif(
    nf4_dequant.kernel() is None, reason="no C compiler or no AVX2/FMA on this machine"
)

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def assert_same_bits(q: NF4Tensor, dtype: torch.dtype) -> None:
    fast, reference = q.dequantize(dtype), q.dequantize(dtype, use_kernel=False)
    assert fast.dtype == reference.dtype == dtype and fast.shape == reference.shape == q.shape
    assert torch.equal(fast.view(BITS[dtype]), reference.view(BITS[dtype]))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", [(96, 64), (37, 61), (129, 64), (3, 5), (1, 1), (7,)])
def test_kernel_equals_the_torch_path(shape, blocksize, double_quant, dtype):
    """Odd sizes (a padding nibble), partial last blocks, blocks shorter than a vector step."""
    generator = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = torch.randn(shape, generator=generator) * 0.05
    q = quantize_nf4(w, blocksize, double_quant)
    assert_same_bits(q, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_ties_and_tiny_scales_match(dtype):
    """bf16 ties (to even, both ways), subnormal products, zero and negative scales: the cases
    where a rounding shortcut would differ from torch's cast."""
    generator = torch.Generator().manual_seed(0)
    scale_bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F817FFF, 0x00800000, 0x00012345, 0x0, 0xBF818000, 0x7F7FFFFF],
        dtype=torch.int64,
    ).to(torch.int32)
    scales = scale_bits.view(torch.float32)
    scales = torch.cat([scales, torch.rand(24, generator=generator) * 3]).repeat(4)
    n = scales.numel() * 64 - 13  # a partial last block and an odd count
    packed = torch.randint(0, 256, (-(-n // 2),), generator=generator, dtype=torch.uint8)
    q = NF4Tensor(packed, scales, None, None, torch.Size((n,)), torch.float32, 64)
    assert_same_bits(q, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_split_the_blocks_without_changing_a_bit(monkeypatch, dtype):
    monkeypatch.setattr(nf4_dequant, "MIN_VALUES_PER_THREAD", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        q = quantize_nf4(torch.randn(301, 97, generator=torch.Generator().manual_seed(1)))
        assert_same_bits(q, dtype)
    finally:
        torch.set_num_threads(threads)


def test_other_dtypes_and_devices_stay_on_torch():
    q = quantize_nf4(torch.randn(8, 64))
    assert (
        nf4_dequant.dequantize(q.packed, NF4_CODE, 512, 64, torch.float16, absmax=q.block_absmax())
        is None
    )
    out = q.dequantize(torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out, q.dequantize(torch.float16, use_kernel=False))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(nf4_dequant.DISABLE_VAR, "0")
    nf4_dequant.clear_cache()
    try:
        assert nf4_dequant.kernel() is None
        q = quantize_nf4(torch.randn(4, 64))
        assert (
            nf4_dequant.dequantize(
                q.packed, NF4_CODE, 256, 64, torch.float32, absmax=q.block_absmax()
            )
            is None
        )
        assert torch.equal(
            q.dequantize(torch.float32), q.dequantize(torch.float32, use_kernel=False)
        )
    finally:
        monkeypatch.delenv(nf4_dequant.DISABLE_VAR)
        nf4_dequant.clear_cache()
