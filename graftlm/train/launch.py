"""`graftlm train --nproc N`: run torchrun for one machine, so nobody has to spell it out.

It is exactly::

    python -m torch.distributed.run --standalone --nproc-per-node N -m graftlm train <settings>

with the settings already merged and checked here (flags over the YAML file), so a bad setting
fails once, before N processes start. torchrun starts each worker in a session of its own,
so a Ctrl-C at the terminal reaches torchrun only, which passes it on to every worker once:
the workers finish the step, rank 0 writes a checkpoint, and they stop. This process does the
same (one SIGINT or SIGTERM handed to torchrun); a second one kills torchrun and every worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

logger = logging.getLogger("graftlm")


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when any of torchrun's rank variables is set (a half-set one included)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def train_flags(cfg) -> list[str]:
    """Command-line flags that rebuild `cfg` (a `TrainConfig`) in another process."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None or value is False:
            continue
        # --flag=value: a value starting with '-' (a regex, a negative number) stays a value
        flags.append(flag if value is True else f"{flag}={value}")
    return flags


def torchrun_command(cfg, nproc: int, *, quiet: bool = False, debug: bool = False) -> list[str]:
    """The torchrun command line `launch_local` runs."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port: no MASTER_ADDR/PORT to pick
        f"--nproc-per-node={nproc}",
        "-m",
        "graftlm",
        *(["--debug"] if debug else []),
        "train",
        *train_flags(cfg),
        *(["--quiet"] if quiet else []),
    ]


def launch_local(cfg, nproc: int, *, quiet: bool = False, debug: bool = False) -> int:
    """Train `cfg` with `nproc` processes on this machine; returns the exit code.

    Each process gets `cores // nproc` threads unless OMP_NUM_THREADS says otherwise (torchrun
    alone would give each one thread).
    """
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // nproc)))
    command = torchrun_command(cfg, nproc, quiet=quiet, debug=debug)
    logger.info("starting %d processes: %s", nproc, " ".join(command[1:]))
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    signals_seen = 0

    def forward(signum, frame) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            proc.send_signal(signum)  # torchrun passes it to every worker once
        else:
            kill_tree(proc.pid)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if code == 0:
        return 0
    if signals_seen:
        return 130
    return code if code > 0 else 1


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of `pid` (Linux /proc; [] elsewhere).

    torchrun's workers run in sessions of their own, so killing torchrun's process group does
    not reach them: they have to be found through their parent.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # the command name in parentheses may hold spaces: the parent id follows the last ')'
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants (found first, so none is orphaned unseen)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
