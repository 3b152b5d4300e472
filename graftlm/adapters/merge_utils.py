"""Task-vector merging of tensors: task arithmetic, TIES, DARE, magnitude pruning, and the SVD
that turns a merged update back into a low-rank pair.

The rules are those of Hugging Face PEFT 0.21 (`peft/utils/merge_utils.py` and
`LoraModel._svd_generalized_task_arithmetic_weighted_adapter`), written op for op in the same
order, so that `graftlm combine` gives PEFT's `add_weighted_adapter` numbers bit for bit on the
same machine, DARE's random masks included (one `torch.bernoulli` per tensor, from the global
generator, in the order the caller passes the tensors).

Every function takes the task tensors of one module (one per adapter, equal shapes) and their
weights as a float32 tensor `(n_adapters,)`, and returns the merged tensor of the same shape.
"""

from __future__ import annotations

import torch

MAJORITY_SIGN_METHODS = ("total", "frequency")


def _weighted(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # weights (n,) broadcast over the stacked (n, ...) task tensors
    return task_tensors * weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_mask_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability `density` (one Bernoulli draw
    per entry from the global generator), and divide the kept ones by `density`."""
    if density >= 1:
        return tensor  # PEFT draws no mask then either
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each adapter's entry has the elected sign: that of the sum of the entries
    ("total") or of the sum of their signs ("frequency"); zero counts as positive."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(
            f"majority sign method should be one of {MAJORITY_SIGN_METHODS}, got {method!r}"
        )
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # the mean over the adapters that agree with the elected sign (at least one counted)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * t_i."""
    return _weighted(torch.stack(task_tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """Task arithmetic over each tensor's top-`density` entries by magnitude."""
    pruned = [magnitude_mask_prune(t, density) for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def ties(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, method: str = "total"
) -> torch.Tensor:
    """TIES (Yadav et al., 2023): trim to the top-`density` entries, elect a sign per entry,
    average the weighted entries that agree with it."""
    stacked = torch.stack([magnitude_mask_prune(t, density) for t in task_tensors], dim=0)
    mask = majority_sign_mask(stacked, method)
    return _disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """DARE (Yu et al., 2023) then task arithmetic."""
    stacked = torch.stack([random_prune(t, density) for t in task_tensors], dim=0)
    return _weighted(stacked, weights).sum(dim=0)


def dare_ties(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, method: str = "total"
) -> torch.Tensor:
    """DARE's random drop-and-rescale, then TIES' sign election and disjoint mean."""
    stacked = torch.stack([random_prune(t, density) for t in task_tensors], dim=0)
    mask = majority_sign_mask(stacked, method)
    return _disjoint_merge(_weighted(stacked, weights), mask)


def merge_tensors(
    how: str,
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign: str = "total",
) -> torch.Tensor:
    """One merge rule by name: "linear" (and "svd", "cat" never come here), "ties",
    "dare_linear", "dare_ties", "magnitude_prune"; the `_svd` suffix is the caller's."""
    rule = how.removesuffix("_svd")
    if rule in ("linear", "svd"):
        return task_arithmetic(task_tensors, weights)
    if rule == "ties":
        return ties(task_tensors, weights, density, majority_sign)
    if rule == "dare_linear":
        return dare_linear(task_tensors, weights, density)
    if rule == "dare_ties":
        return dare_ties(task_tensors, weights, density, majority_sign)
    if rule == "magnitude_prune":
        return magnitude_prune(task_tensors, weights, density)
    raise ValueError(f"unknown merge rule {how!r}")


def low_rank_factors(
    delta: torch.Tensor, rank: int, *, clamp: float | None = None, full_matrices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` pair for an update `delta (out, in)`: its truncated SVD, the singular
    values folded into B, optionally clamped at the `clamp` quantile of |entries| (kohya-ss'
    svd_merge_lora, as PEFT does).

    Returns:
        (A `(rank, in)`, B `(out, rank)`), with B @ A ≈ delta.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u = u.clamp(-high, high)
        vh = vh.clamp(-high, high)
    return vh, u
