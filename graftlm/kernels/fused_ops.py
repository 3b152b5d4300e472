"""Fused training kernels for Llama-family decoder layers: RMSNorm, rotary embedding, SwiGLU.

Transformers writes these three as chains of small tensor ops (`pow`, `mean`, `rsqrt`, `mul`;
`cat((-x2, x1))`; `silu(gate) * up`). Autograd then saves every intermediate and, in the backward,
runs one kernel per op, including zero-fills and copies for the slices inside `rotate_half`.
On a CPU those element-wise passes over `tokens x hidden` tensors can cost as much time as the
matrix products of the frozen layers (docs/measurements.md), so each gets one
`torch.autograd.Function` here with a hand-written backward that saves only what it needs
(the input and one value per row for RMSNorm, `cos`/`sin` for the rotation, `gate` and `up` for
SwiGLU).

The forward values are the transformers formulas evaluated in the same order, so logits are
unchanged; gradients agree to float rounding (tested against the transformers modules in
`tests/kernels/test_fused_ops.py`). `fused_forwards(model)` switches them on for the modules it
recognises and leaves everything else (other architectures) on transformers' code.

On a CPU, in bf16 or float32, the three run on the C kernels of `fused_cpu.py` instead (one pass
over memory each way, fp32 in registers; `fused_cpu.applies`), RMSNorm included, whose bf16
form here is otherwise transformers' own (its casts to fp32 and back); each residual add of a
decoder layer runs inside the kernel of the RMSNorm that reads its sum
(`decoder_layer_forward`). The torch functions below remain for everything else (CUDA, no C
compiler, `GRAFTLM_FUSED_CPU_KERNELS=0`). In bf16, transformers' "sdpa" attention also becomes
`causal_attention.attention_forward`, which differentiates causal bf16 attention on the matrix
units where SDPA's flash kernel is slow, and calls transformers' sdpa for everything else.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from graftlm.kernels import causal_attention, fused_cpu, lora_update

# classes whose forward is exactly transformers' Llama formula (checked by name: transformers
# generates these classes from Llama's code, so they are copies, not subclasses)
RMS_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
# decoder layers whose forward is Llama's (pre-norm, residual adds around attention and MLP)
DECODER_LAYER_CLASSES = {
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
}
# the attribute of a residual-stream tensor that carries its norm, computed by the fused add
# that made the tensor: (the RMSNorm module it is for, the normed tensor)
NORMED_ATTR = "_graftlm_normed"
ROPE_MODULES = {
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
}


class RMSNormFunction(torch.autograd.Function):
    """`weight * (x * rsqrt(mean(x^2) + eps))`; saves `x` and one `rsqrt` value per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            reduce_dims = tuple(range(grad.dim() - 1))
            grad_weight = (grad * normed).sum(reduce_dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of x*rstd: rstd * (g - xhat * mean(g * xhat))
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x, grad_weight, None


class RotaryFunction(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin`, where `rotate_half(x) = cat(-x2, x1)` on the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        # the transpose of rotate_half: (y1, y2) -> (y2, -y1)
        grad_sin = grad * sin
        grad_x[..., :half] += grad_sin[..., half:]
        grad_x[..., half:] -= grad_sin[..., :half]
        return grad_x, None, None


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up`; saves `gate` and `up`, recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        grad_up = grad * silu if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))) = sigmoid + silu * (1 - sigmoid)
            derivative = silu.mul_(1 - sigmoid).add_(sigmoid)
            grad_gate = (grad * up).mul_(derivative)
        return grad_gate, grad_up


def rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    normed = getattr(hidden_states, NORMED_ATTR, None)
    if normed is not None and normed[0] is self:
        delattr(hidden_states, NORMED_ATTR)  # used once: the tensor does not keep it alive
        return normed[1]
    if fused_cpu.applies(hidden_states, self.weight):
        return fused_cpu.RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, hidden_states)  # transformers' casts for low precision
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h = residual + x` and `norm(h)`: one C kernel each way for CPU tensors, bf16 or float32
    (`fused_cpu.AddRMSNormFunction`), else the add and the norm's forward, as transformers."""
    if _add_norm_fuses(residual, x, norm):
        return fused_cpu.AddRMSNormFunction.apply(residual, x, norm.weight, norm.variance_epsilon)
    hidden_states = residual + x
    return hidden_states, norm(hidden_states)


def _add_norm_fuses(residual: torch.Tensor, x: torch.Tensor, norm: nn.Module) -> bool:
    return residual.shape == x.shape and fused_cpu.applies(residual, x, norm.weight)


def decoder_layer_forward(next_norm: nn.Module | None):
    """transformers' Llama decoder layer forward with each residual add fused into the RMSNorm
    that reads its sum (vLLM's `fused_add_rms_norm`): the add after the attention with
    `post_attention_layernorm`, and the add after the MLP with `next_norm`, the next layer's
    `input_layernorm` (or the model's final norm). That norm's result travels on the layer's
    output tensor (`NORMED_ATTR`) and `rms_norm_forward` returns it when `next_norm` is called
    on that tensor; the layer's output itself is the residual stream as before, so hidden-state
    outputs and every other caller see transformers' values.

    A checkpointed layer (training with `gradient_checkpointing`, autograd on) runs its class's
    own forward instead: transformers 5 checkpoints a layer inside the class's `forward`, which
    this function replaces on the instance, so running the fused body there would silently train
    without checkpointing (QLoRA's low-memory runs peaked 0.6 GB higher: docs/measurements.md,
    "Checkpointing and the fused decoder layer"). Its replay must save what its first run saved
    anyway, so nothing is carried across it."""

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        checkpointed = getattr(self, "gradient_checkpointing", False)
        if checkpointed and self.training and torch.is_grad_enabled():
            return type(self).forward(
                self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                **kwargs,
            )  # fmt: skip
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        residual, hidden_states = add_rms_norm(
            residual, hidden_states, self.post_attention_layernorm
        )
        hidden_states = self.mlp(hidden_states)
        if next_norm is None or not _add_norm_fuses(residual, hidden_states, next_norm):
            return residual + hidden_states
        out, normed = add_rms_norm(residual, hidden_states, next_norm)
        setattr(out, NORMED_ATTR, (next_norm, normed))
        return out

    return forward


def swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_swiglu(self, x))


def swiglu_mlp_forward_ending_layer(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`swiglu_mlp_forward` for the MLP of a Llama decoder layer, whose `down_proj` is the
    layer's last product: a checkpointed layer's replay may skip it (`lora_update`)."""
    hidden = _swiglu(self, x)
    with lora_update.last_product_of_layer():
        return self.down_proj(hidden)


def _swiglu(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.shape == up.shape and fused_cpu.applies(gate, up):
        return fused_cpu.SwiGLUFunction.apply(gate, up)
    return SwiGLUFunction.apply(gate, up)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for transformers' `apply_rotary_pos_emb` (same signature and result)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    if (
        fused_cpu.applies(q, k, cos, sin)
        and fused_cpu.rotary_applies(q, cos, sin)
        and fused_cpu.rotary_applies(k, cos, sin)
    ):
        rotary = fused_cpu.RotaryFunction
    else:
        rotary = RotaryFunction
    return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)


def _is_rms_norm(module: nn.Module | None) -> bool:
    return type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon")


def _is_llama_layer(module: nn.Module) -> bool:
    return (
        type(module).__name__ in DECODER_LAYER_CLASSES
        and _is_rms_norm(getattr(module, "input_layernorm", None))
        and _is_rms_norm(getattr(module, "post_attention_layernorm", None))
    )


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    # transformers' ACT2FN["silu"] is its own SiLUActivation (F.silu), older versions nn.SiLU
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return type(module).__name__ in MLP_CLASSES and silu


@contextlib.contextmanager
def fused_forwards(model: nn.Module) -> Iterator[int]:
    """Run the model's RMSNorms, SiLU MLPs and rotary embeddings on the fused kernels, with
    each residual add of its Llama decoder layers fused into the RMSNorm after it (on a CPU;
    `decoder_layer_forward`), and, in a CPU training step, its LoRA layers as one function each
    (`lora_update.py`).

    Yields how many modules were switched (0: nothing recognised, the model runs unchanged).
    On exit every module and the transformers modeling module are as they were.
    """
    switched: list[nn.Module] = []
    ending_layers: set[int] = set()  # MLPs whose down_proj is their decoder layer's last product
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and all(map(_is_llama_layer, layers)):
            ending_layers.update(id(getattr(layer, "mlp", None)) for layer in layers)
            final_norm = getattr(module, "norm", None)
            next_norms = [layer.input_layernorm for layer in layers[1:]]
            next_norms.append(final_norm if _is_rms_norm(final_norm) else None)
            for layer, next_norm in zip(layers, next_norms):
                layer.forward = types.MethodType(decoder_layer_forward(next_norm), layer)
                switched.append(layer)
        elif _is_rms_norm(module):
            module.forward = types.MethodType(rms_norm_forward, module)
            switched.append(module)
        elif _is_silu_mlp(module):
            # model.modules() visits the layers' container before the MLPs inside them
            ending = id(module) in ending_layers
            forward = swiglu_mlp_forward_ending_layer if ending else swiglu_mlp_forward
            module.forward = types.MethodType(forward, module)
            switched.append(module)
    rope_modules = []
    if switched:
        for module_name in {type(m).__module__ for m in model.modules()} & ROPE_MODULES:
            modeling = sys.modules[module_name]
            rope_modules.append((modeling, modeling.apply_rotary_pos_emb))
            modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    # transformers' attention registry: an entry set here shadows the library-wide "sdpa" one
    sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if switched:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = causal_attention.attention_forward
    try:
        with lora_update.enabled():  # LoRA layers: the update inside the base's product
            yield len(switched)
    finally:
        if switched:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
            if ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_before:  # it was set here before us
                ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_before
        for modeling, original in rope_modules:
            modeling.apply_rotary_pos_emb = original
        for module in switched:
            module.__dict__.pop("forward", None)
