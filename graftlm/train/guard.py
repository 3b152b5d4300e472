"""What keeps a long run from being lost to its surroundings: `--out` claimed before any work
(writable, and held by one run at a time through a lock file), and a run stopped at the first
loss that is not a finite number, naming the step and the rows of its batch.

The lock is `fcntl.flock` on ``OUT/.graftlm-train.lock``: the kernel releases it when the
process exits, however it exits (a crash or SIGKILL included), so a stale lock file never blocks
the next run. A run that ends in Python (done, an error, Ctrl-C) deletes the file while it still
holds the lock, so a finished adapter folder holds only the adapter's files; one that was killed
leaves it, holding the pid of that run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from graftlm.errors import GraftError

LOCK_FILE = ".graftlm-train.lock"


@contextlib.contextmanager
def claim_out(out: str | os.PathLike, *, is_main: bool = True) -> Iterator[None]:
    """Hold `out` for one training run: create it, check that files can be written there, and
    take its lock for as long as the block runs (only the main rank of a distributed run).

    Raises:
        GraftError: `out` cannot be created or written (read-only, no permission, a file), or
            another run holds it.
    """
    if not is_main:
        yield
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # what every later write does (a temp file, then a rename): fail now, not after hours
        fd, probe = tempfile.mkstemp(dir=out, prefix=".graftlm-probe.")
        os.close(fd)
        os.unlink(probe)
        handle = _take_lock(out / LOCK_FILE)
    except OSError as exc:
        raise GraftError(f"--out {str(out)!r} is not writable: {exc}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        # deleted while still held: a run that opened the file before this unlink re-checks
        # in _take_lock that its lock is on the file at the path, and takes a new one if not
        with contextlib.suppress(OSError):
            os.unlink(out / LOCK_FILE)
        handle.close()  # releases the lock


def _take_lock(path: Path):
    """Open `path` and take its exclusive lock, on the file that is at `path` once it is held.

    Raises:
        GraftError: another run holds the lock.
    """
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open by the caller)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise GraftError(
                f"--out {str(path.parent)!r} is in use by another graftlm train (pid {holder}, "
                f"lock {LOCK_FILE}): wait for it to finish or pick another --out"
            ) from None
        # the run that held it may have deleted the file between our open and our lock
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def non_finite_loss(
    step: int, loss: float, sources: Sequence[str], checkpoint_step: int | None, out: Path
) -> GraftError:
    """The error that stops a run whose loss at `step` is NaN or infinite.

    Args:
        step: the optimizer step (1-based) whose loss it is.
        loss: the loss.
        sources: the batch's rows, as ``"file:line"``.
        checkpoint_step: the step of the last checkpoint written (None: none yet).
        out: the run's folder.
    """
    rows = ", ".join(sorted(set(sources), key=_line_order))
    kept = (
        f"the last good checkpoint (step {checkpoint_step}) is kept in {out / 'checkpoint'}"
        if checkpoint_step is not None
        else "no checkpoint was written yet"
    )
    return GraftError(
        f"step {step}: the loss is {loss} (not a finite number) on the batch of rows {rows}; "
        f"training stopped and {kept}: lower --lr, or check those rows"
    )


def _line_order(source: str) -> tuple[str, int]:
    name, _, line = source.rpartition(":")
    return (name, int(line)) if line.isdigit() else (source, 0)
