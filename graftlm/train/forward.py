"""The forward pass and the loss: the decoder (sharing a common prompt prefix), the summed
next-token loss over labelled tokens, and teacher-forced evaluation.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from torch import nn

from graftlm.data.dataset import Example, collate, length_grouped_batches
from graftlm.kernels.small_batch_linear import is_plain_linear
from graftlm.train import checkpointing
from graftlm.train.distributed import Runtime
from graftlm.train.loss import fused_lm_loss_sum, head_lm_loss_sum

logger = logging.getLogger("graftlm")

EVAL_BATCH_TOKENS = 4096  # evaluation keeps no activations for a backward: bigger passes are fine
# a --low-memory run's evaluations: no bigger than its checkpointed training passes, which they
# otherwise outgrew (the run's peak was its last evaluation; bench/results/qlora_speed.txt)
LOW_MEMORY_EVAL_TOKENS = 2048


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading tokens every row of the batch has in common (at most shortest row - 1)."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    prefix = int(same.long().cumprod(0).sum())
    return max(0, min(prefix, int(attention_mask.sum(dim=1).min()) - 1))


def decoder_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor], *, share_prefix: bool = True
) -> torch.Tensor:
    """Final hidden states `(batch, seq, d)` of the decoder (the model without its head).

    Chat rows share a long prefix (the system prompt, the template's header), a large share of
    their tokens (docs/measurements.md). With `share_prefix`, that prefix runs once for the whole
    micro-batch and its key/value cache is repeated for every row; gradients flow through it
    exactly as through the full forward, so only the cost changes.
    """
    inner = model.base_model  # the decoder without the head (model.model, transformer, ...)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    # No padding in the micro-batch (length grouping makes that common): let attention take
    # its plain causal path instead of building a 4-D mask.
    attention_mask = None if bool(mask.all()) else mask
    rows = input_ids.shape[0]
    prefix = shared_prefix_length(input_ids, mask) if share_prefix and rows > 1 else 0
    if prefix < MIN_SHARED_PREFIX:
        return inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    head = inner(input_ids=input_ids[:1, :prefix], use_cache=True)
    cache = head.past_key_values
    cache.batch_repeat_interleave(rows)  # [1, heads, prefix, dim] -> [rows, ...], differentiable
    positions = torch.arange(prefix, input_ids.shape[1], device=input_ids.device).expand(rows, -1)
    tail = inner(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(inner): cache},
    )
    return torch.cat([head[0].expand(rows, -1, -1), tail[0]], dim=1)


@torch.no_grad()
def prefix_sharing_is_exact(model: nn.Module, example: Example, pad_id: int) -> bool:
    """Check once per run that the shared-prefix forward equals the plain one on this model.

    Most decoder implementations take a repeated key/value cache as is; a few handle
    positions or masks with a cache differently (GPT-2 in transformers 5), and those run
    without sharing. The probe is two rows made from one example: a shared prefix, one row
    two tokens shorter (so right padding is exercised too). With activation checkpointing on
    (`train/checkpointing.py`), the probe runs through the checkpointed layers.
    """
    ids = example.input_ids[:64]
    if len(ids) < MIN_SHARED_PREFIX + 3:
        return False
    other = ids[:-3] + [ids[-1]]
    batch = collate([Example(ids, ids, "probe"), Example(other[:-1], other[:-1], "probe")], pad_id)
    batch = on_device(batch, next(model.parameters()).device)
    try:
        with checkpointing.probing(model):  # through the checkpointed layers, if they are
            plain = decoder_hidden(model, batch, share_prefix=False).detach().float()
            shared = decoder_hidden(model, batch, share_prefix=True).detach().float()
    except Exception as exc:  # a decoder that refuses a cache here: no sharing
        logger.debug("shared-prefix forward failed (%s); using the plain forward", exc)
        return False
    mask = batch["attention_mask"].bool()
    error = (plain - shared)[mask].abs().max() / plain[mask].abs().max().clamp_min(1e-6)
    return bool(error < 1e-2)


def _cache_kwarg(inner: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def loss_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    compute_dtype: torch.dtype,
    *,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a micro-batch over its labelled tokens, and their count."""
    hidden = decoder_hidden(model, batch, share_prefix=share_prefix)
    return hidden_loss_sum(model, hidden, batch["labels"], compute_dtype)


def hidden_loss_sum(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """`loss_sum` from the decoder's final hidden states: the head's loss over `labels`."""
    head = model.get_output_embeddings()
    if is_plain_linear(head) and head.bias is None:
        return fused_lm_loss_sum(hidden, head.weight, labels, compute_dtype=compute_dtype)
    return head_lm_loss_sum(hidden, head, labels)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    compute_dtype: torch.dtype,
    runtime: Runtime,
    *,
    share_prefix: bool = True,
    max_tokens: int = EVAL_BATCH_TOKENS,
    per_batch: Callable[[torch.Tensor, list[int]], None] | None = None,
) -> tuple[float, int]:
    """Mean loss over the labelled tokens of `examples` (teacher-forced), and the token count;
    passes of at most `max_tokens` padded tokens.

    `per_batch(hidden, indices)` sees each pass's final hidden states `(rows, seq, d)` (the
    rows of `examples[indices]`, right-padded) before they are dropped: whatever else is read
    off the same teacher-forced pass (`validation.GreedyAnswers`) costs no second forward.
    Under several processes each sees its own share of the passes."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    lengths = [len(e) for e in examples]
    # large batches: one shared-prefix pass serves many rows (no backward, so memory is small)
    batches = length_grouped_batches(lengths, 32, shuffle=False, max_tokens=max_tokens)
    for indices in runtime.shard(batches):
        device = next(model.parameters()).device
        batch = on_device(collate([examples[i] for i in indices], pad_id), device)
        with autocast(compute_dtype, device):
            hidden = decoder_hidden(model, batch, share_prefix=share_prefix)
            loss, count = hidden_loss_sum(model, hidden, batch["labels"], compute_dtype)
            if runtime.is_padding(indices):  # run only to keep FSDP ranks in step
                continue
            if per_batch is not None:
                per_batch(hidden, indices)
        total += loss.item()
        tokens += count
    total, tokens = runtime.all_reduce_sum([total, float(tokens)])
    model.train(was_training)
    return total / max(tokens, 1.0), int(tokens)


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """bf16 autocast on `device` when the compute dtype is bfloat16, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def training_device() -> torch.device:
    """The accelerator this process owns (torchrun's LOCAL_RANK was set as current), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` moved to `device` (left as is on the CPU)."""
    return (
        batch
        if device.type == "cpu"
        else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    )
