"""Each benchmark runs end to end in its --quick form and prints its verdict (no timing here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pg import why_no_cluster

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("script", "verdict"),
    [
        pytest.param("submit.py", "tasknotes/best httpx-API =", id="submit"),
        pytest.param("rate.py", "within 5%, bursts, <= C", id="rate"),
        pytest.param("sink.py", "durable/baseline =", id="sink"),
        pytest.param("slowloris.py", "with 100 slowloris: p99", id="slowloris"),
        pytest.param("validate.py", "tasknotes validate / pandas.read_csv =", id="validate"),
        pytest.param("memory.py", "validate: 10,000 rows / 2,000 rows =", id="memory"),
        pytest.param("reconcile.py", "reconcile / pandas.merge =", id="reconcile"),
        pytest.param("reconcile_profile.py", "reconcile (all)", id="reconcile_profile"),
        pytest.param("history.py", "night 3 / night 1:", id="history"),
        pytest.param("state.py", "whole run: PostgreSQL/SQLite =", id="state"),
        pytest.param("state_parts.py", "apply (one group commit)", id="state_parts"),
    ],
)
@pytest.mark.timeout(330)  # the subprocess's own bound (300 s), not the suite's 120 s
def test_the_benchmark_runs_and_prints_its_ratio(script: str, verdict: str) -> None:
    """`python bench/<script> --quick` exits 0 and prints the table and the ratio it is for."""
    if script.startswith("state") and (reason := why_no_cluster()) is not None:
        pytest.skip(reason)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert verdict in done.stdout
    assert "Traceback" not in done.stderr
