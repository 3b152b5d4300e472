"""Process facts the training loop needs: rank, world size, and what the CPU can do.

One process is `Runtime.single()`. Under torchrun the same loop runs with a `Runtime` whose
`shard`, `reduce_gradients` and `all_reduce_sum` talk to the process group; the loop itself
never looks at environment variables, so there is no hidden global state.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("graftlm")


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True where bf16 matrix products are fast on this CPU (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Runtime:
    """Rank and world size of this process; collectives are no-ops for one process."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def single(cls) -> Runtime:
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's share of a step's micro-batches (all of them for one process)."""
        from graftlm.data import shard

        return shard(items, self.rank, self.world_size)

    def wrap_gradients(self, params: list[torch.Tensor]) -> None:
        """Hook for distributed gradient handling; nothing to do in one process."""

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum adapter gradients across ranks; nothing to do in one process."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum scalars across ranks; identity in one process."""
        return list(values)

    def log(self, message: str) -> None:
        if self.is_main:
            logger.info("%s", message)
