"""A short soak of `graftlm serve` (bench/soak.py): a real server process, 16 clients mixing
valid, streamed, malformed, unknown-model, oversize, bad-key and aborted requests for a few
seconds; no 5xx, every valid answer its solo text, the server idle afterwards.

Marked slow: starting a server process and computing the solo answers take most of its
~45 s on a busy 2-core machine (`pytest -m "not slow"` skips it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak  # noqa: E402


@pytest.mark.slow
def test_a_short_soak_has_no_5xx_and_no_wrong_answer():
    report = soak.run_soak(5.0, 16, seed=1)
    assert report["server_errors_5xx"] == 0, report["examples_5xx"]
    assert report["wrong_answers"] == 0, report["examples_wrong"]
    assert report["valid_served"] > 0 and len(report["by_kind"]) >= 5
    assert report["health_after"]["running"] == 0 and report["health_after"]["waiting"] == 0
