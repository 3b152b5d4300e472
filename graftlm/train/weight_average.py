"""An exponential moving average of the trainable tensors (`--ema-decay`): the adapter a run
validates, keeps and saves is the average of its recent steps, not the last step's.

Why: on the zoo's ticket_triage the seed alone moves LoRA's held-out exact match by 12.5
points (bench/results/zoo.md, "Seeds"): the last steps' noise decides which unseen phrasings
come out right. Averaging the iterates (Polyak averaging; SWA and the EMA of diffusion LoRA
trainers are its relatives) is the standard remedy for that noise, and costs one copy of the
adapter and one lerp per step.

The average starts at the initial tensors, and its decay warms up as ``min(decay, (1 + n) /
(10 + n))`` after n updates (diffusers' EMAModel without its power warmup), so that the first
steps' tensors, still near the initialisation, do not dominate a short run's average. Until
the cap is reached (0.9 after 80 updates, 0.95 after 170) the newest step weighs 9 / (10 + n):
the average spans about the last ninth of the run so far, whatever the run's length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class WeightAverage:
    """The moving average of `params` (name → trainable tensor), kept in float32."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay should be in (0, 1), got {decay!r}")
        self.params, self.decay, self.updates = params, decay, 0
        self.average = {n: p.detach().float().clone() for n, p in params.items()}
        self._live: dict[str, torch.Tensor] = {}  # the step's own tensors while swapped out

    def current_decay(self) -> float:
        """The decay of the next update (warmed up over the first updates)."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the tensors after an optimizer step."""
        weight = 1.0 - self.current_decay()
        for name, tensor in self.params.items():
            self.average[name].lerp_(tensor.detach().float(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in place of the trainable tensors inside the block (an evaluation, or
        the early stop's copy of the best adapter); the step's own tensors back after it."""
        with torch.no_grad():
            for name, tensor in self.params.items():
                if name not in self._live:
                    self._live[name] = torch.empty_like(tensor)
                self._live[name].copy_(tensor)
                tensor.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in self.params.items():
                    tensor.copy_(self._live[name])

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the trainable tensors for good (the end of a run)."""
        for name, tensor in self.params.items():
            tensor.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average and its update count, for a resumable checkpoint."""
        state = {f"average/{name}": t for name, t in self.average.items()}
        state["updates"] = torch.tensor([self.updates], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict()`'s output."""
        self.updates = int(state["updates"].item())
        for name in self.average:
            self.average[name].copy_(state[f"average/{name}"])


def weight_average_for(trainable: dict[str, torch.Tensor], decay: float) -> WeightAverage | None:
    """The run's weight average of the `trainable` tensors (by name) with `--ema-decay`, or
    None when it is off (decay 0)."""
    if not decay:
        return None
    return WeightAverage(trainable, decay)
