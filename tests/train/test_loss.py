"""The fused, labelled-only cross-entropy equals the plain full-logits computation."""

import pytest
import torch
import torch.nn.functional as F

from graftlm.train.loss import IGNORE_INDEX, fused_lm_loss_sum, head_lm_loss_sum


def _reference(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )


def _case(seed=0, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=weight_grad)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 2048])
def test_fused_loss_and_grads_match_reference(chunk_size):
    hidden, weight, labels = _case(weight_grad=True)
    ref = _reference(hidden, weight, labels)
    ref.backward()
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, count = fused_lm_loss_sum(hidden, weight, labels, chunk_size=chunk_size)
    (loss * 2.0).backward()  # a non-unit upstream gradient must scale both grads
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, 2 * ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, 2 * ref_gw, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_grad_and_bf16_is_close():
    hidden, weight, labels = _case()
    ref = _reference(hidden, weight, labels)
    loss, _ = fused_lm_loss_sum(hidden, weight, labels, compute_dtype=torch.bfloat16)
    loss.backward()
    assert weight.grad is None
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02


def test_no_labels_gives_zero_with_graph():
    hidden, weight, labels = _case()
    labels[:] = IGNORE_INDEX
    loss, count = fused_lm_loss_sum(hidden, weight, labels)
    assert count == 0 and loss.item() == 0.0
    loss.backward()


def test_head_module_variant_matches():
    hidden, weight, labels = _case()
    head = torch.nn.Linear(16, 50, bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
    logits = head(hidden).float()
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum"
    )
    loss, _ = head_lm_loss_sum(hidden, head, labels, chunk_size=3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_logits_buffer_is_kept_inside_a_scope_only():
    """A training run reuses one logits buffer across passes; other callers keep nothing."""
    from graftlm.train import loss as loss_module

    hidden, weight, labels = _case()
    fused_lm_loss_sum(hidden, weight, labels, chunk_size=4)
    assert getattr(loss_module._workspace, "logits", None) is None
    with loss_module.logits_buffer_scope():
        first, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=4)
        held = loss_module._workspace.logits
        assert held is not None and held.numel() == 4 * weight.shape[0]
        second, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=4)
        assert loss_module._workspace.logits is held  # the same memory, not a new tensor
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(second, _reference(hidden, weight, labels), rtol=1e-5, atol=1e-5)
    assert loss_module._workspace.logits is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scope_with_max_rows_projects_fewer_rows_at_once_and_keeps_the_result(dtype):
    """--low-memory's scope: at most `max_rows` rows per projection, so a smaller buffer (bf16 on
    the C kernel: half the bytes of fp32 again), and the same loss and gradient."""
    from graftlm.kernels import fused_cpu
    from graftlm.train import loss as loss_module

    hidden, weight, labels = _case()
    hidden, weight = hidden.detach().to(dtype).requires_grad_(), weight.to(dtype)
    with loss_module.logits_buffer_scope():
        loss, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=2048, compute_dtype=dtype)
        loss.backward()
        wide = loss_module._workspace.logits.numel()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    with loss_module.logits_buffer_scope(max_rows=4):
        capped, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=2048, compute_dtype=dtype)
        capped.backward()
        held = loss_module._workspace.logits.numel()
    assert getattr(loss_module._workspace, "max_rows", None) is None  # the cap ends with its scope
    bytes_per_value = 2 if dtype == torch.bfloat16 and fused_cpu.library() is not None else 4
    assert held * 4 == 4 * weight.shape[0] * bytes_per_value
    assert wide > held  # all 23 labelled rows at once
    torch.testing.assert_close(capped, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)  # fp32 blocking


def test_without_grad_mode_the_loss_is_the_same_and_no_backward_is_prepared():
    """An evaluation (no_grad) computes the loss alone: the same value, no gradient products,
    even where the hidden states and the head's weight require grad."""
    hidden, weight, labels = _case(weight_grad=True)
    with_grads, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=4)
    with torch.no_grad():
        alone, _ = fused_lm_loss_sum(hidden, weight, labels, chunk_size=4)
    assert not alone.requires_grad and alone.grad_fn is None
    torch.testing.assert_close(alone, with_grads.detach(), rtol=0, atol=0)
    with_grads.backward()  # the graph built with grad mode on still gives both gradients
    assert hidden.grad is not None and weight.grad is not None
