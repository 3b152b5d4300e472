"""Compiling a kernel's C file on first use and loading it with ctypes (what the C kernels share).

A kernel's C file is compiled with the system's C compiler (`$CC`, else cc, gcc or clang) into
graftlm's cache, under a name that hashes the source, the compiler and the flags, so an edited
source or another compiler builds a new library and never loads a stale one. It is compiled
beside its final name and renamed, so no process loads a half-written file. Every failure (no
compiler, a CPU without the instructions, a failed compile or load) is a reason string or None
for the caller, which falls back to torch and logs why once.

`GRAFTLM_KERNEL_ISA=avx2` caps the kernels at AVX2 + FMA on any CPU: the CPU's AVX-512 and AMX
flags are ignored (`cpu_flags`), so `fused_cpu.c` builds its generic loops as on an AVX2-only
CPU, and `--dtype auto` picks float32 (`train/distributed.bf16_supported`). With torch's, oneDNN's
and MKL's own caps (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`,
`MKL_ENABLE_INSTRUCTIONS=AVX2`) it emulates an AVX2-only CPU on an AVX-512 one (README, "Training speed").
Unset or `native`: the CPU's own flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")

# what every kernel here is written for: AVX2 + FMA, as on the project's AMD EPYC
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")

ISA_VAR = "GRAFTLM_KERNEL_ISA"
ISA_CAPS = ("native", "avx2")

_build_lock = threading.Lock()


def isa_cap() -> str:
    """The instruction set the kernels are capped at: `$GRAFTLM_KERNEL_ISA`, `native` if unset.

    Raises:
        GraftError: the variable names no known cap.
    """
    cap = os.environ.get(ISA_VAR, "").strip().lower() or "native"
    if cap not in ISA_CAPS:
        raise GraftError(f"{ISA_VAR}={cap!r} is not one of {', '.join(ISA_CAPS)}")
    return cap


def cpu_flags() -> set[str] | None:
    """The CPU's flags as /proc/cpuinfo spells them, without AVX-512 and AMX under
    `GRAFTLM_KERNEL_ISA=avx2`; None without /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = set(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        return None
    if isa_cap() == "avx2":
        flags = {f for f in flags if not f.startswith(("avx512", "amx", "avx10"))}
    return flags


def missing_requirement(cpu_flags_needed: set[str]) -> str | None:
    """Why a kernel needing `cpu_flags_needed` (as /proc/cpuinfo spells them) cannot be built
    and run here, or None when it can."""
    flags = cpu_flags()
    if flags is None:
        return f"no /proc/cpuinfo to check the CPU for {', '.join(sorted(cpu_flags_needed))}"
    if not cpu_flags_needed <= flags:
        missing = " + ".join(sorted(cpu_flags_needed - flags))
        capped = f" ({ISA_VAR}={isa_cap()})" if isa_cap() != "native" else ""
        return f"this CPU has no {missing}{capped}"
    if compiler() is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    return None


def compiler() -> str | None:
    """The C compiler to use: `$CC` if set, else the first of cc, gcc, clang on PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for c in candidates if (path := shutil.which(c))), None)


def load_library(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """`source` compiled with `flags` (once, into the cache) and loaded; None if that failed
    (the failure is logged as a warning)."""
    with _build_lock:
        target = _compiled(source, flags)
    if target is None:
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        logger.warning("loading %s failed: %s", target, exc)
        return None


def bind(library: ctypes.CDLL | None, name: str, argtypes: list, restype):
    """The C function `name` of `library` with its argument and result types; None with no
    library."""
    if library is None:
        return None
    function = getattr(library, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


def _compiled(source: Path, flags: tuple[str, ...]) -> Path | None:
    # cache_root's module imports transformers (~1 s): only a kernel's first load needs it
    from graftlm.models.gguf_cache import cache_root

    # the headers a source includes are named after it (fused_cpu.c: fused_cpu_kernels.h), and
    # a change to one must build the library again
    headers = sorted(source.parent.glob(f"{source.stem}_*.h"))
    code = b"".join(path.read_bytes() for path in (source, *headers))
    cc = compiler()
    if cc is None:
        logger.warning("cannot compile %s: no C compiler on PATH", source)
        return None
    key = hashlib.sha256(code + " ".join((cc, *flags)).encode()).hexdigest()
    target = cache_root() / "kernels" / f"{source.stem}-{key[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
    except OSError as exc:
        logger.warning("cannot write the compiled kernel to %s: %s", target.parent, exc)
        return None
    try:
        result = subprocess.run(
            [cc, *flags, str(source), "-o", partial], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            logger.warning("compiling %s failed:\n%s", source, result.stderr.strip())
            return None
        os.replace(partial, target)
        return target
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("compiling %s failed: %s", source, exc)
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
