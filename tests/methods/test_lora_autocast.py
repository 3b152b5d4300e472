"""LoRA under bf16 autocast: x goes to the adapter's linears without a cast to fp32 and back."""

from __future__ import annotations

import helpers
import torch

from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject
from graftlm.methods.lora.layer import LoraLinear


def _with_fp32_cast(self, name, x):  # the formula before: x cast to the adapter's dtype
    lora_a = self.lora_A[name]
    x = x.to(lora_a.weight.dtype)
    return self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_autocast_lora_without_the_fp32_cast_gives_the_same_bits(monkeypatch):
    model = helpers.tiny_llama().to(torch.bfloat16)  # the base in bf16, as graftlm trains it
    inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 adapter, as graftlm trains it
            if "lora_B" in name:  # B = 0 at init would hide A's gradients
                torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    logits, grads = _logits_and_grads(model, ids)
    monkeypatch.setattr(LoraLinear, "_lora", _with_fp32_cast)
    expected_logits, expected = _logits_and_grads(model, ids)
    assert torch.equal(logits, expected_logits)
    assert grads.keys() == expected.keys() and any("lora_A" in n for n in grads)
    assert all(torch.equal(grads[n], expected[n]) for n in grads)
