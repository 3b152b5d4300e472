"""The process setting the CLI makes before torch starts (graftlm/cli/__init__.py): OpenMP's
passive wait, unless the user chose a policy."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = "import os, graftlm.cli, torch\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"


def wait_policy_seen(**environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(environment)
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_cli_makes_openmp_wait_passively_before_torch_starts():
    assert wait_policy_seen() == "PASSIVE"


def test_a_users_own_policy_is_kept():
    assert wait_policy_seen(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    # a spin count is a policy too: no wait policy is added beside it
    assert wait_policy_seen(GOMP_SPINCOUNT="1000") == "None"
