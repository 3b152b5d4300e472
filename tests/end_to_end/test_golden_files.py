"""The files graftlm writes are the same bytes as those the code from before the "one house plan"
restructure writes, on the same machine.

`golden/produce.py` trains every method for three steps on a tiny Llama with a fixed seed, merges
and exports the LoRA adapter, and hashes each file (less times and peak memory). The test runs it
twice, on this checkout's graftlm and on the tree of BEFORE_RESTRUCTURE taken from git, and
compares the hashes. Both runs are on one machine because the bytes depend on the CPU: MKL and
ATen pick other kernels (AVX2, AVX-512) and round differently, so hashes written down on one CPU
do not hold on another.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
# the last commit before the restructure (it added golden/produce.py)
BEFORE_RESTRUCTURE = "7de0a3b"


def _tree_of(commit: str, target: Path) -> Path:
    """The package of `commit`, unpacked from git into `target`."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "graftlm"],
            check=True, capture_output=True, timeout=120,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"this test needs the git history of the checkout ({commit}): {exc}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def _produce(source: Path, work: Path) -> dict[str, str]:
    manifest = work / "manifest.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(source), str(ROOT / "tests")]),
        "MKL_CBWR": "AUTO,STRICT",
        "OMP_NUM_THREADS": "1",
        # float32 steps on the torch functions of fused_ops.py, as the old tree ran them: the
        # float32 C kernels (fused_cpu.py) give the same values only to fp32 rounding, and are
        # tested against them in tests/kernels
        "GRAFTLM_FUSED_CPU_KERNELS": "0",
    }
    result = subprocess.run(
        [sys.executable, str(GOLDEN / "produce.py"), str(work / "files"), str(manifest)],
        env=env, capture_output=True, text=True, timeout=600, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(manifest.read_text())


def test_adapter_folders_metrics_merged_and_gguf_files_are_unchanged(tmp_path):
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before = _produce(_tree_of(BEFORE_RESTRUCTURE, tmp_path / "old"), tmp_path / "before")
    after = _produce(ROOT, tmp_path / "after")
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"files whose bytes changed: {changed}"
