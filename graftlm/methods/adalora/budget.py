"""AdaLoRA's rank allocation during training: importance, the budget schedule, masks, and the
orthogonality penalty, with PEFT 0.21's formulas (`RankAllocator` in peft/tuners/adalora/layer.py).

After every optimizer step (gradients still in place):

1. importance of every adapter weight w: I = |w · ∂L/∂w|, smoothed Ī ← β1 Ī + (1 − β1) I and
   its uncertainty Ū ← β2 Ū + (1 − β2) |I − Ī|; a weight's score is Ī · Ū;
2. a triplet's score is its λ's score plus the mean score of its row of Q and its column of P;
3. the budget (triplets kept, over all matrices) stays at n·init_r for `tinit` steps, falls on a
   cubic to n·target_r at step total − tfinal, then stays;
4. while it falls (every `delta_t` steps) and once more at total − tfinal, the λ of every
   triplet scoring at or below the k-th lowest score (k = initial − current budget) is zeroed;
   in the last `tfinal` steps the final mask is re-applied after each step, so pruned triplets
   stay at zero while the kept ones train on.

The loss gets orth_reg_weight · mean over matrices of ||QQᵀ − I||_F and ||PᵀP − I||_F.
"""

from __future__ import annotations

import torch
from torch import nn

from graftlm.methods.adalora.layer import adapter_config, set_adapter_config, svd_layers

# The schedule as fractions of the run (runs of ~50-100 steps): a tenth to gather importance
# before pruning, the last fifth to train the final ranks.
TINIT_FRACTION = 0.1
TFINAL_FRACTION = 0.2
KINDS = ("lora_A", "lora_E", "lora_B")


def default_schedule(total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of `total_steps`, leaving at least one step of falling budget.

    With tfinal >= 1 (any run of 2+ steps) the final allocation happens at step total − tfinal,
    so the budget reaches target_r within the run.
    """
    tfinal = max(1, round(TFINAL_FRACTION * total_steps)) if total_steps >= 2 else 0
    tinit = min(round(TINIT_FRACTION * total_steps), max(0, total_steps - tfinal - 1))
    return tinit, tfinal


def budget_at(
    step: int,
    *,
    init_budget: int,
    target_budget: int,
    tinit: int,
    tfinal: int,
    total_step: int,
    delta_t: int,
) -> tuple[int, bool]:
    """(triplets to keep, whether to re-allocate now) at 0-based `step`: PEFT's budget_schedule."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % delta_t == 0


def orthogonal_penalty(layers: list[nn.Module], name: str) -> torch.Tensor:
    """Mean over the matrices Q (lora_A) and P (lora_B) of ||QQᵀ − I||_F and ||PᵀP − I||_F."""
    total = None
    count = 0
    for layer in layers:
        for kind in ("lora_A", "lora_B"):
            weight = getattr(layer, kind)[name]
            gram = weight @ weight.T if kind == "lora_A" else weight.T @ weight  # [r, r]
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = torch.norm(gram - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None:
        return torch.zeros(())
    return total / count


class TrainingHooks:
    """The training loop's callbacks for AdaLoRA (see the module docstring).

    Args:
        model: a model holding AdaLoRA adapter `name` (from `adalora.attach` / `inject`).
        cfg: the run's TrainConfig (unused: the adapter's config holds everything).
        total_steps: optimizer steps of the run; with the adapter's `total_step` unset, the
            schedule is `default_schedule(total_steps)`, written into the adapter's config.
        name: the adapter to train.
    """

    def __init__(self, model: nn.Module, cfg=None, total_steps: int = 1, name: str = "default"):
        config = adapter_config(model, name)
        if config.total_step is None:
            tinit, tfinal = default_schedule(total_steps)
            config = config.replace(total_step=total_steps, tinit=tinit, tfinal=tfinal)
            set_adapter_config(model, name, config)
        self.model, self.name, self.config = model, name, config
        self.layers = list(svd_layers(model, name))
        self.init_budget = sum(layer.ranks[name] for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.avg_ipt: dict[str, torch.Tensor] = {}
        self.avg_unc: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}  # module name -> bool [r], once allocated

    # -- the contract -----------------------------------------------------------------------------

    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg_weight × the orthogonality penalty (None when the weight is 0)."""
        if not self.config.orth_reg_weight:
            return None
        penalty = orthogonal_penalty([layer for _, layer in self.layers], self.name)
        return self.config.orth_reg_weight * penalty

    def after_step(self, step: int) -> None:
        """Update importance and re-allocate the budget (PEFT's update_and_allocate)."""
        config = self.config
        final = config.total_step - config.tfinal
        if step < final:
            self._update_importance()
            budget, now = self.budget(step)
            if now:
                self._mask_to_budget(budget)
        elif step == final:
            self._mask_to_budget(self.budget(step)[0])
            self.avg_ipt.clear()
            self.avg_unc.clear()
        else:
            self._apply_masks()

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets kept over all matrices, whether masking happens) at `step`."""
        config = self.config
        return budget_at(
            step,
            init_budget=self.init_budget,
            target_budget=self.target_budget,
            tinit=config.tinit,
            tfinal=config.tfinal,
            total_step=config.total_step,
            delta_t=config.delta_t,
        )

    # -- importance and masks ---------------------------------------------------------------------

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for module_name, layer in self.layers:
            for kind in KINDS:
                param = getattr(layer, kind)[self.name]
                key = f"{module_name}.{kind}"
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                ipt = (param * grad).abs()
                avg = self.avg_ipt.get(key, torch.zeros_like(param))
                unc = self.avg_unc.get(key, torch.zeros_like(param))
                avg = beta1 * avg + (1 - beta1) * ipt
                self.avg_ipt[key] = avg
                self.avg_unc[key] = beta2 * unc + (1 - beta2) * (ipt - avg).abs()

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.avg_ipt:  # nothing gathered yet (a resumed run without its state)
            return torch.zeros_like(like)
        return self.avg_ipt[key] * self.avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module, one score per triplet `[r]`: λ's score + mean over Q's row + P's column."""
        scores = {}
        for module_name, layer in self.layers:
            q, e, p = (getattr(layer, kind)[self.name] for kind in KINDS)
            score_q = self._score(f"{module_name}.lora_A", q).mean(dim=1)  # [r]
            score_p = self._score(f"{module_name}.lora_B", p).mean(dim=0)  # [r]
            score_e = self._score(f"{module_name}.lora_E", e).view(-1)
            scores[module_name] = score_e + (score_q + score_p)
        return scores

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        drop = self.init_budget - budget
        if drop > 0 and scores:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
        else:
            threshold = float("-inf")
        self.kept = {m: ~(s <= threshold) for m, s in scores.items()}
        self._apply_masks()
        self._publish()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for module_name, layer in self.layers:
            keep = self.kept.get(module_name)
            if keep is not None:
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def _publish(self) -> None:
        """Write the current allocation into the adapter's config (saved as rank_pattern)."""
        pattern = {f"{m}.lora_E": tuple(k.tolist()) for m, k in self.kept.items()}
        self.config = self.config.replace(rank_pattern=pattern)
        set_adapter_config(self.model, self.name, self.config)

    def ranks(self) -> dict[str, int]:
        """Triplets each module keeps under the current allocation (init rank before any)."""
        return {
            m: int(self.kept[m].sum()) if m in self.kept else layer.ranks[self.name]
            for m, layer in self.layers
        }

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The importance averages and the current allocation, for a resumable checkpoint."""
        state = {f"avg_ipt/{k}": v for k, v in self.avg_ipt.items()}
        state.update({f"avg_unc/{k}": v for k, v in self.avg_unc.items()})
        state.update({f"kept/{m}": k.to(torch.uint8) for m, k in self.kept.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (tensors go to the adapter's device)."""
        device = next((layer.weight.device for _, layer in self.layers), torch.device("cpu"))
        self.avg_ipt, self.avg_unc, self.kept = {}, {}, {}
        for key, value in state.items():
            table, _, name = key.partition("/")
            if table == "avg_ipt":
                self.avg_ipt[name] = value.to(device)
            elif table == "avg_unc":
                self.avg_unc[name] = value.to(device)
            elif table == "kept":
                self.kept[name] = value.to(device).bool()
        if self.kept:
            self._publish()
