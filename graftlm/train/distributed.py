"""Process facts the training loop needs: rank, world size, and what the CPU can do.

One process is `Runtime.single()`. Under torchrun, `Runtime.from_env()` joins the process
group and the same loop runs with a `Runtime` whose `shard`, `reduce_gradients` and
`all_reduce_sum` talk to it; the loop itself never looks at environment variables, so there
is no hidden global state.

How a distributed step stays equal to the one-process step::

    step's micro-batches ──shard──► rank 0: [m0, m2]   rank 1: [m1]      (the union is exact)
    each rank: backward of (its micro-batches' summed loss / the step's labelled tokens)
    reduce_gradients: all-reduce SUM of the adapter gradients only  ─► every rank holds the
    one-process gradient, takes the same AdamW step, and stays bit-identical to the others

With `--fsdp` the frozen base of each decoder layer is sharded with FSDP2 (`fully_shard`);
the adapter parameters stay whole on every rank (FSDP ignores them) and are summed as above.
FSDP gathers a layer's weights inside its forward and backward, a collective, so there every
rank runs the same number of micro-batches: ranks short of one run a `Padding` copy of a
short micro-batch whose loss counts zero.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from graftlm.errors import GraftError
from graftlm.kernels import build
from graftlm.methods.lora.nf4_layer import LoraNF4Linear
from graftlm.quant.nf4_linear import NF4Linear
from graftlm.train.launch import launched_by_torchrun

logger = logging.getLogger("graftlm")

# What torchrun (torch.distributed.run) sets for every worker.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# oneDNN's instruction-set caps below AVX-512 BF16: under them its bf16 products are emulated
_ONEDNN_CAPS_WITHOUT_BF16 = {
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True where bf16 matrix products are fast on this CPU (AVX-512 BF16 or AMX), unless
    `GRAFTLM_KERNEL_ISA=avx2` or oneDNN's `ONEDNN_MAX_CPU_ISA` caps the instructions below
    them (an emulated AVX2 CPU picks float32, as a real one does)."""
    flags = build.cpu_flags()
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA", "")
    if flags is None or onednn_cap.strip().upper() in _ONEDNN_CAPS_WITHOUT_BF16:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Padding(list):
    """A micro-batch a rank runs only to keep FSDP's collectives in step; its loss counts zero."""


@dataclass
class Runtime:
    """Rank and world size of this process; collectives are no-ops for one process.

    Use it as a context manager around a distributed run: leaving the block without an error
    waits for every rank (so rank 0 finishes writing before the others exit) and then destroys
    the process group; leaving it with an error only destroys the group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (one process)
    fsdp: bool = False  # set by `prepare`: decoder layers sharded, micro-batches in lockstep
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def single(cls) -> Runtime:
        """One process, no process group."""
        return cls()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Runtime:
        """The runtime torchrun describes in the environment, with its process group joined.

        Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (all set by
        `torchrun`). The backend is gloo, plus NCCL for CUDA tensors when CUDA is available
        (`"cpu:gloo,cuda:nccl"`), so collectives on CPU tensors work either way. Without any
        of the rank variables this is `Runtime.single()`; a world of one process needs no group.
        `environ` (default `os.environ`) is what is checked; the group itself is joined the
        way torchrun expects, through `env://`, which reads `os.environ`.

        Raises:
            GraftError: the launch environment is half-set (e.g. RANK without WORLD_SIZE) or
                holds values that are not ranks; the process group cannot be joined.
        """
        environ = os.environ if environ is None else environ
        if not launched_by_torchrun(environ):
            return cls.single()
        missing = [name for name in _LAUNCH_VARS if not environ.get(name)]
        if missing:
            present = [name for name in _LAUNCH_VARS if environ.get(name)]
            raise GraftError(
                f"incomplete distributed launch environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing; start the run with `torchrun --nproc-per-node N "
                "-m graftlm train ...` (or `graftlm train --nproc N ...`), or unset "
                + ", ".join(present)
            )
        values = {}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            try:
                values[name] = int(environ[name])
            except ValueError:
                raise GraftError(f"{name} should be an integer, got {environ[name]!r}") from None
        rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise GraftError(
                f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
                f"WORLD_SIZE={world}, LOCAL_RANK={local}"
            )
        if world == 1:
            return cls.single()

        if torch.cuda.is_available() and local < torch.cuda.device_count():
            # one GPU per local rank; CPU tensors (the adapter, the loss) still go through gloo
            torch.cuda.set_device(local)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        owns = not dist.is_initialized()
        if owns:
            try:
                dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
            except (RuntimeError, ValueError) as exc:
                raise GraftError(
                    f"rank {rank}: could not join the process group at "
                    f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']} ({exc})"
                ) from None
        return cls(rank=rank, world_size=world, local_rank=local, backend=backend, _owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- the model ----------------------------------------------------------------------------

    def prepare(self, model: nn.Module, params: list[torch.Tensor], *, fsdp: bool = False) -> None:
        """Ready `model` for this runtime before the optimizer is built.

        Every rank starts from rank 0's adapter weights (they agree already when the seed does;
        the broadcast makes it a guarantee). With `fsdp`, each decoder layer's frozen weights
        are sharded across ranks with FSDP2; the trainable `params` are left whole.

        Args:
            model: the model with adapters injected.
            params: its trainable parameters (what the optimizer will step).
            fsdp: shard the frozen decoder layers (no effect in one process).

        Raises:
            GraftError: FSDP asked for on a model it cannot shard (a 4-bit base, no decoder
                layers found).
        """
        if not self.distributed:
            if fsdp:
                logger.info("--fsdp: one process, nothing to shard")
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().float().reshape(-1) for p in params] or [torch.zeros(0)])
            dist.broadcast(flat, src=0)
            for p, value in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(value.view_as(p))
        if fsdp:
            layers = shard_decoder_layers(model, params, self.world_size)
            self.fsdp = True
            held = sum(_local_numel(p) for p in model.parameters() if not p.requires_grad)
            total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            self.log(
                f"FSDP: {layers} decoder layers sharded over {self.world_size} processes; "
                f"this process holds {held:,} of the {total:,} frozen parameters"
            )

    # -- the data -----------------------------------------------------------------------------

    def shard(self, items: Sequence) -> list:
        """This rank's share of a step's micro-batches (all of them for one process).

        Rank r gets `items[r::world_size]`: the shares are disjoint and their union is exactly
        `items`, so nothing counts twice. Under FSDP, ranks with fewer items get `Padding`
        entries (one sequence of the last, shortest micro-batch) so every rank runs the same
        number of forward/backward passes; see `is_padding`.
        """
        items = list(items)
        mine = items[self.rank :: self.world_size]
        if self.fsdp and items:
            per_rank = -(-len(items) // self.world_size)
            mine += [Padding(items[-1][-1:]) for _ in range(per_rank - len(mine))]
        return mine

    @staticmethod
    def is_padding(item) -> bool:
        """True for a micro-batch run only to keep ranks in lockstep: count its loss as zero."""
        return isinstance(item, Padding)

    # -- collectives --------------------------------------------------------------------------

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum adapter gradients across ranks; nothing to do in one process.

        One all-reduce over a flat fp32 buffer of all the gradients. A rank that had no
        micro-batch this step contributes zeros; a parameter no rank produced a gradient for
        keeps `grad = None`, as in one process (so AdamW skips it there too).
        """
        if not self.distributed or not params:
            return
        device = params[0].device
        parts = [
            (p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=device)).reshape(
                -1
            )
            for p in params
        ]
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat([*parts, present])
        dist.all_reduce(flat)
        sizes = [p.numel() for p in params]
        grads = flat.split([*sizes, len(params)])
        for p, grad, seen in zip(params, grads[:-1], grads[-1].tolist()):
            p.grad = grad.view_as(p).to(p.dtype) if seen else None

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum scalars across ranks (in float64); identity in one process."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here; no-op in one process."""
        if self.distributed:
            dist.barrier()

    def close(self, *, wait: bool = True) -> None:
        """Leave the process group (after a barrier when `wait`); no-op in one process."""
        if not self._owns_group:
            return
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # after an error the other ranks may never reach a barrier: do not wait for them
        self.close(wait=exc_type is None)

    def log(self, message: str) -> None:
        if self.is_main:
            logger.info("%s", message)


# -- FSDP2 --------------------------------------------------------------------------------------


def _local_numel(param: torch.Tensor) -> int:
    local = getattr(param, "to_local", None)  # a DTensor: count this rank's shard
    return local().numel() if local is not None else param.numel()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the classes transformers lists in
    `_no_split_modules`, else the children of the ModuleList holding the most parameters."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def shard_decoder_layers(model: nn.Module, trainable: list[torch.Tensor], world_size: int) -> int:
    """Shard the frozen weights of every decoder layer across the ranks with FSDP2.

    Each layer is its own `fully_shard` unit (its weights are gathered just for its forward
    and backward, then freed). The adapter parameters are FSDP's `ignored_params`: they stay
    plain, whole tensors on every rank, summed by `Runtime.reduce_gradients`, so checkpoints
    and the saved adapter need no gathering. Everything outside the layers (embeddings, final
    norm, a tied head) stays whole: the fused loss reads the head's weight outside any layer.

    Returns:
        The number of layers sharded.

    Raises:
        GraftError: a 4-bit (NF4) base, or no decoder layers found.
    """
    # FSDP adds ~1 s to every import of this module; only --fsdp runs need it
    from torch.distributed.fsdp import fully_shard

    if any(isinstance(m, (NF4Linear, LoraNF4Linear)) for m in model.modules()):
        raise GraftError(
            "--fsdp does not shard a 4-bit (qlora) base; drop --fsdp (QLoRA's base is already "
            "small) or train with --method lora"
        )
    layers = decoder_layers(model)
    if not layers:
        raise GraftError(
            f"--fsdp: found no decoder layers to shard in {type(model).__name__} "
            "(no _no_split_modules and no ModuleList of blocks); train without --fsdp"
        )
    ignored = {id(p) for p in trainable}
    mesh = init_device_mesh(next(model.parameters()).device.type, (world_size,))
    for layer in layers:
        keep = {p for p in layer.parameters() if id(p) in ignored}
        fully_shard(layer, mesh=mesh, ignored_params=keep)
    return len(layers)
