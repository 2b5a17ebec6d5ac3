"""Real processes: kill -9 at random moments, faults in bulk, signals. Nothing lost or doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    EmulatorThread,
    make_config,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.emulator import Faults
from pipeline.state import Ledger

pytestmark = pytest.mark.slow


def start_run(config: Path, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                             "--no-progress"], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_kill_9_at_random_moments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Runs killed mid-flight, then one run to the end: every valid row stored exactly once,
    except rows reported ambiguous (stored at most once); no row missing from the results."""
    # A fixed seed (override with TASKNOTES_TEST_SEED to explore): a failure is reproducible.
    seed = int(os.environ.get("TASKNOTES_TEST_SEED", "424242"))
    rng = random.Random(seed)
    rows = notes(2500)
    rows[7][1] = ""  # one invalid row, which must be reported, never sent
    write_csv(tmp_path / "input.csv", rows)
    with EmulatorThread(latency_ms=(2.0, 12.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              submit={"concurrency": 8, "rate_per_second": None})
        ledger_file = tmp_path / "state" / "ledger.sqlite"
        for attempt in range(5):
            before = api.emulator.requests
            proc = start_run(config, tmp_path)
            if attempt == 0:  # killed while reading the input, before anything is sent
                wait_until(ledger_file.exists, timeout=60, what="the ledger")
            else:
                target = before + rng.randrange(50, 500)
                wait_until(lambda t=target, p=proc: api.emulator.requests >= t
                           or p.poll() is not None,
                           timeout=60, what=f"requests to reach {target} (seed {seed})")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        final = subprocess.run([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                                "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=180, check=False)
        stored = {(t, n): api.stored(t, n) for t, n in rows}
    assert final.returncode == 1, final.stderr  # the invalid row
    report = tmp_path / final.stdout.split("report: ")[1].split("/ (")[0]
    results = read_results(report)
    assert [r["emr_task_id"] for r in results] == [t for t, _ in rows]
    for (task, note), result in zip(rows, results, strict=True):
        status = result["final_status"]
        count = stored[(task, note)]
        if status == "ambiguous":
            assert count <= 1, (seed, task)
        elif status == "rejected_invalid":
            assert count == 0
        else:
            assert status in ("awaiting_outcome", "skipped_already_sent"), (seed, task, status)
            assert count == 1, (seed, task, status, count)
    assert max(stored.values()) == 1


def test_a_fault_soak_ends_every_row_once(tmp_path: Path, state: dict[str, Any]) -> None:
    """10% 429, 5% 503, 2% slow, 2% dropped: one final status per row, nothing stored twice;
    with the ledger in SQLite and with state.url on PostgreSQL."""
    rows = notes(400)
    faults = Faults(rate_429=0.10, rate_503=0.05, slow_after_store=0.02, drop_after_store=0.02,
                    retry_after_s=0, slow_s=1.0)
    write_csv(tmp_path / "input.csv", rows)
    with EmulatorThread(faults=faults, seed=5) as api:
        config = make_config(tmp_path, api={"base_url": api.url, "timeout_s": 0.4},
                             submit={"concurrency": 8, "max_attempts": 8,
                                     "max_consecutive_failures": 400}, state=state)
        outcome = run_pipeline(config)
        stored = [api.stored(t, n) for t, n in rows]
    results = read_results(outcome.report.directory)
    assert len(results) == len(rows)
    finals = [r["final_status"] for r in results]
    assert set(finals) <= {"awaiting_outcome", "ambiguous", "send_failed"}
    assert finals.count("ambiguous") >= 4  # the slow and the dropped ones
    for final, count in zip(finals, stored, strict=True):
        assert count == {"awaiting_outcome": 1, "send_failed": 0}.get(final, count)
        assert count <= 1
    assert outcome.exit_code == 1


def test_first_sigint_drains_and_reports_second_exits_at_once(tmp_path: Path) -> None:
    """SIGINT: in-flight requests finish, the report is written, exit 3; rows not started stay
    pending. A second SIGINT during a long drain exits at once with the ledger consistent."""
    write_csv(tmp_path / "input.csv", notes(300))
    with EmulatorThread(latency_ms=(150.0, 150.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              submit={"concurrency": 2, "rate_per_second": None})
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                                 "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until(lambda: api.emulator.requests >= 6, timeout=30, what="sending to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err
        assert "stopped: interrupted by SIGINT" in out
        assert "Traceback" not in err
        ledger = Ledger(tmp_path / "state" / "ledger.sqlite", readonly=True)
        frame = ledger.frame()
        ledger.close()
        assert set(frame["status"]) == {"accepted", "pending"}
        accepted = frame[frame["status"] == "accepted"]["emr_task_id"]
        assert len(accepted) == api.emulator.requests  # every request that left was recorded
        report = tmp_path / out.split("report: ")[1].split("/ (")[0]
        results = read_results(report)
        assert results[-1]["final_status"] == "send_failed"
        assert "interrupted by SIGINT" in results[-1]["error"] + results[-1]["detail"]

    # Answers that never come within the test (10 min): the order below cannot be met by a
    # slow machine letting the emulator answer first.
    with EmulatorThread(latency_ms=(600_000.0, 600_000.0)) as slow:
        config = write_config(tmp_path, "slow.yaml", api={"base_url": slow.url},
                              submit={"concurrency": 2, "drain_timeout_s": 60},
                              state={"ledger": str(tmp_path / "state" / "slow.sqlite")})
        log = tmp_path / "slow.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                                     "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                    stderr=stderr)
        wait_until(lambda: slow.emulator.requests >= 2, timeout=30, what="requests in flight")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: b"stopping: interrupted" in log.read_bytes(), timeout=10,
                   what="the first signal to be handled")
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        assert proc.returncode == 3
        # "At once" by order, not by a stopwatch: it left (within proc.wait's 10 s, the drain
        # allows 60) before the emulator answered any of the requests in flight.
        assert slow.emulator.answers == []
    ledger = Ledger(tmp_path / "state" / "slow.sqlite", readonly=True)
    statuses = set(ledger.frame()["status"])
    ledger.close()
    assert statuses <= {"sending", "pending"}
