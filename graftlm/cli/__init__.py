"""The `graftlm` command line: one module per command group, `main` the entry point."""

import os

# torch's CPU wheel runs its parallel regions on GNU OpenMP, whose idle workers spin before they
# sleep. When other processes keep the cores busy, a spinning worker burns the time slice its
# partner needs: on a 2-core machine with two busy background processes a training step took
# 119 s instead of 1.8 s, and 5.3 s with passive waiting; on the quiet machine passive waiting
# cost ~9% (bench/results/busy_machine.txt). A fine-tune often shares its machine, so the CLI
# waits passively unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT). Set here,
# before anything imports torch, because libgomp reads it once when it starts.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from graftlm.cli.parser import main  # noqa: E402  (after the OpenMP setting)

__all__ = ["main"]
