"""Activation checkpointing that keeps the shared prefix: the same loss and gradients as without."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from graftlm.data.dataset import Example
from graftlm.errors import GraftError
from graftlm.kernels import lora_update
from graftlm.kernels.fused_ops import fused_forwards
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject
from graftlm.quant.base_linears import quantize_model_linears
from graftlm.train import checkpointing
from graftlm.train.forward import loss_sum, prefix_sharing_is_exact


def shared_prefix_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(4, 200, (12,), generator=g)
    ids = torch.stack(
        [torch.cat([prefix, torch.randint(4, 200, (9,), generator=g)]) for _ in range(3)]
    )
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0  # one row right-padded
    labels = ids.clone()
    labels[:, :10] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, share_prefix: bool, dtype: torch.dtype = torch.float32):
    model.zero_grad()
    with fused_forwards(model):  # the replay runs inside it too, as in a training step
        loss, _ = loss_sum(model, batch, dtype, share_prefix=share_prefix)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_checkpointed_shared_prefix_gives_the_same_loss_and_gradients(
    kind, quantized, tiny_model_factory
):
    model = tiny_model_factory(kind)
    if quantized:
        quantize_model_linears(model)
    inject(model, LoraConfig(rank=4, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    batch = shared_prefix_batch()
    plain_loss, plain = loss_and_grads(model, batch, share_prefix=False)
    shared_loss, shared = loss_and_grads(model, batch, share_prefix=True)

    assert checkpointing.enable(model) and checkpointing.keeps_cache(model)
    row = batch["input_ids"][0].tolist()
    assert prefix_sharing_is_exact(model, Example(row, row, "x"), 2)
    assert model.training  # the probe put the model back as it was
    checkpointed_loss, checkpointed = loss_and_grads(model, batch, share_prefix=True)

    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(checkpointed_loss, shared_loss)  # the replay computes the same numbers
    for name, grad in shared.items():
        assert torch.equal(checkpointed[name], grad), name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5)


def test_without_a_cache_checkpointing_is_plain(tiny_model_factory):
    model = tiny_model_factory("llama")
    inject(model, LoraConfig(rank=4, targets="all-linear"))
    model.train()
    batch = shared_prefix_batch()
    loss, grads = loss_and_grads(model, batch, share_prefix=False)
    checkpointing.enable(model)
    checkpointed_loss, checkpointed = loss_and_grads(model, batch, share_prefix=False)
    assert torch.equal(loss, checkpointed_loss)
    for name, grad in grads.items():
        assert torch.equal(checkpointed[name], grad), name


def _checkpointed_lora(tiny_model_factory, quantized: bool):
    model = tiny_model_factory("llama")
    if quantized:
        quantize_model_linears(model)
    inject(model, LoraConfig(rank=4, targets="all-linear"))
    model.train()
    checkpointing.enable(model)
    return model


def _recorded_replays(monkeypatch) -> list:
    replays = []
    real = lora_update.replaying_layer

    @contextlib.contextmanager
    def recorded():
        with real() as replay:
            replays.append(replay)
            yield replay

    monkeypatch.setattr(lora_update, "replaying_layer", recorded)
    return replays


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_each_replay_leaves_out_the_layers_last_product(quantized, tiny_model_factory, monkeypatch):
    # the gradients stay bit for bit those of the first run: the tests above
    model = _checkpointed_lora(tiny_model_factory, quantized)
    replays = _recorded_replays(monkeypatch)
    loss_and_grads(model, shared_prefix_batch(), share_prefix=True)
    # each layer runs twice, over the shared prefix and then over the rows' own tokens
    assert len(replays) == 2 * model.config.num_hidden_layers
    assert all(replay.skipped for replay in replays)


def test_a_bf16_replay_leaves_it_out_with_the_same_gradients(tiny_model_factory, monkeypatch):
    model = tiny_model_factory("llama").to(torch.bfloat16)  # the base in bf16, as trained there
    inject(model, LoraConfig(rank=4, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 adapter under bf16 autocast
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    model.train()
    checkpointing.enable(model)
    batch = shared_prefix_batch()
    with monkeypatch.context() as patch:  # no layer marks its last product: nothing is left out
        patch.setattr(lora_update, "last_product_of_layer", contextlib.nullcontext)
        replays = _recorded_replays(patch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full_loss, full = loss_and_grads(model, batch, True, torch.bfloat16)
        assert replays and not any(replay.skipped for replay in replays)
    replays = _recorded_replays(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch, True, torch.bfloat16)
    assert replays and all(replay.skipped for replay in replays)
    assert torch.equal(loss, full_loss)
    for name, grad in full.items():
        assert torch.equal(grads[name], grad), name


def test_a_replay_that_runs_past_the_skipped_product_fails(tiny_model_factory):
    model = _checkpointed_lora(tiny_model_factory, quantized=False)
    with set_checkpoint_early_stop(False), pytest.raises(GraftError, match="went on past"):
        loss_and_grads(model, shared_prefix_batch(), share_prefix=True)
