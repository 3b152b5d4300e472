"""Tiny models whose adapters move the logits visibly, shared by the LoRA core and PEFT tests.

Same seed -> same weights, so a fresh base is a rebuild. initializer_range is 0.1 instead of
HF's 0.02, so that adapters change the logits enough for comparisons to mean something.
"""

from __future__ import annotations

import helpers
import pytest
import torch


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """Llama with GQA and tied embeddings."""
    return helpers.tiny_llama(seed=seed, initializer_range=0.1)


def tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    """Qwen2 with q/k/v biases (random here, HF starts them at zero) and an untied lm_head."""
    model = helpers.tiny_qwen2(seed=seed, initializer_range=0.1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2: Conv1D layers (weight stored [in, out]), tied embeddings."""
    return helpers.tiny_gpt2(seed=seed, initializer_range=0.1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine an extra
    spinning thread per process makes the suite several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Simulate training: seeded normal noise on every trainable tensor (A, B, biases, copies)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
