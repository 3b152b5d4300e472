"""AdamW with bfloat16 moments: half the optimizer state, for full fine-tuning.

Plain AdamW keeps two float32 moments per trainable value: for a full fine-tune that is twice
the model again (135M parameters: 1.08 GB), the largest share of a step's memory. Here both
moments are stored in bfloat16 (0.54 GB) and widened to float32 a slice at a time for the
update, so the arithmetic is AdamW's, in float32, and the temporaries are a few MB whatever the
tensor's size. bfloat16 keeps float32's exponent range (tiny second moments do not underflow)
but only 8 bits of mantissa: each step rounds the moments, so a run drifts from plain AdamW's
by about that rounding (tests/train/test_lean_adamw.py bounds it).
"""

from __future__ import annotations

import math

import torch

SLICE = 1 << 20  # values widened to float32 at once (4 MB per temporary)


class LeanAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW`'s update (decoupled weight decay, bias correction) with the moments
    `exp_avg`, `exp_avg_sq` held in bfloat16; the state keys are AdamW's, so checkpoints
    (train/checkpoint.py) save and restore it the same way.

    Args:
        params: the trainable tensors (float32).
        lr, betas, eps, weight_decay: as for `torch.optim.AdamW`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"bad LeanAdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, decay = group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                correction1 = 1 - beta1**step
                root_correction2 = math.sqrt(1 - beta2**step)
                if decay:
                    param.mul_(1 - lr * decay)
                flat, grad = param.view(-1), param.grad.reshape(-1)
                avg, avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for start in range(0, flat.numel(), SLICE):
                    end = start + SLICE
                    g = grad[start:end].float()
                    m = avg[start:end].float().lerp_(g, 1 - beta1)
                    v = avg_sq[start:end].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    avg[start:end].copy_(m)
                    avg_sq[start:end].copy_(v)
                    denom = v.sqrt_().div_(root_correction2).add_(eps)
                    flat[start:end].addcdiv_(m, denom, value=-lr / correction1)
        return loss
