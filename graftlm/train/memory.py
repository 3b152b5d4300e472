"""Where the memory of a fine-tuning run goes: base weights, adapter, optimizer state, peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

import torch
from torch import nn


def tensor_bytes(tensors) -> int:
    """Bytes held by the distinct tensors in `tensors` (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (what the OS measured).

    On Linux this is `VmHWM` of /proc/self/status, the high-water mark of this program's own
    memory. `getrusage`'s `ru_maxrss` is not: Linux carries it across `exec`, so a run started
    from a large process (a test runner, a notebook) would report that process's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# glibc's mallopt parameters: requests at least this large are served by mmap and unmapped on
# free; free memory at the top of the heap beyond this much is handed back to the OS at once
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
# the top of the heap kept when the mmap threshold is fixed (release_free_heap trims every step)
HEAP_TOP_KEPT = 64 << 20


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc hand every freed block of `threshold_bytes` or more straight back to the OS.

    By default glibc raises its mmap threshold (up to 32 MB) each time a large block is freed,
    so the per-layer temporaries of a training step (dequantized NF4 weights, activations of a
    few MB) end up on the heap, where fragmentation keeps freed memory resident and a QLoRA run
    peaks near twice as high (docs/measurements.md, "--low-memory"). The price is a page fault
    per page of every new large temporary, so graftlm does this in `--low-memory` mode only, at
    a threshold `train/step.py` picks for the way the run bounds its activations. Process-wide
    and not undone.

    Fixing the mmap threshold also fixes glibc's trim threshold at its 128 KiB default, so the
    top of the heap was handed back to the OS and faulted in again many times a step; it is
    raised to `HEAP_TOP_KEPT` (the per-step `release_free_heap` returns that memory).

    Returns:
        True if the setting was applied (Linux with glibc), False elsewhere.
    """
    libc = _glibc()
    try:
        return (
            libc is not None
            and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TOP_KEPT))
        )
    except AttributeError:  # musl and other C libraries have no mallopt
        return False


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`).

    Quantizing a base for QLoRA frees its full-precision linear weights into the heap, where
    they would stay resident beside the 4-bit copies for the whole run, and each training step
    leaves small freed blocks behind, fragmented; `--low-memory` runs trim after the
    quantization and after every step (docs/architecture.md, "Memory of a load").

    Returns:
        True if memory was released (Linux with glibc), False elsewhere.
    """
    libc = _glibc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # musl and other C libraries have no malloc_trim
        return False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, looked up once (the lookup runs `ldconfig`; the trim runs every step)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def memory_accounting(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of the frozen base (weights + buffers, 4-bit codes as stored), the trainable adapter,
    and the optimizer state (AdamW: two moments per trainable value), plus the peak RSS.
    """
    params = list(model.parameters())
    state = []
    if optimizer is not None:
        for entry in optimizer.state.values():
            state.extend(v for v in entry.values() if isinstance(v, torch.Tensor))
    return {
        "base_weight_bytes": tensor_bytes(
            [p for p in params if not p.requires_grad] + list(model.buffers())
        ),
        "adapter_bytes": tensor_bytes([p for p in params if p.requires_grad]),
        "optimizer_state_bytes": tensor_bytes(state),
        "peak_rss_bytes": peak_rss_bytes(),
    }
