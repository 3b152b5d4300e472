"""The files graftlm writes are the same bytes as before the "one house plan" restructure.

`golden/produce.py` trains every method for three steps on a tiny Llama with a fixed seed, merges
and exports the LoRA adapter, and hashes each file (less times and peak memory). `expected.json`
holds the hashes the code from before the restructure produced on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_adapter_folders_metrics_merged_and_gguf_files_are_unchanged(tmp_path):
    manifest = tmp_path / "manifest.json"
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(GOLDEN / "produce.py"), str(tmp_path / "work"), str(manifest)],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    got = json.loads(manifest.read_text())
    want = json.loads((GOLDEN / "expected.json").read_text())
    assert sorted(got) == sorted(want)
    changed = [name for name in want if got[name] != want[name]]
    assert not changed, f"files whose bytes changed: {changed}"
