"""The ledger on PostgreSQL (``state.url``), against a real server (tests/pg.py), a real
``tasknotes sink`` process and the Cobalt emulator: runs from directories with no local
state, the per-account run lock, a crash's in-flight rows, a lost database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    EmulatorThread,
    free_port,
    make_config,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline import jobs
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.postgres import connect

pytestmark = pytest.mark.slow


@pytest.fixture
def sink(pg_url: str, tmp_path: Path) -> Iterator[str]:
    """``tasknotes sink`` in its own process and directory, its events in ``pg_url``;
    yields the webhook URL."""
    home = tmp_path / "sink-host"
    home.mkdir()
    config = write_config(home, state={"url": "${TASKNOTES_STATE_URL}"})
    port = free_port()
    log = home / "sink.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=out, cwd=home,
            env={**os.environ, "TASKNOTES_STATE_URL": pg_url})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30, what="the sink to listen")
        yield f"{url}/webhooks/cobalt"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def worker(tmp_path: Path, name: str, pg_url: str, api: str, **sections: Any) -> RunConfig:
    """A worker's config in its own directory: state in ``pg_url``, no ledger or sink file."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    return make_config(home, api={"base_url": api}, state={"url": pg_url, "ledger": str(
        home / "state" / "ledger.sqlite")}, **sections)


def sink_count(pg_url: str) -> int:
    with connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM sink_events").fetchone()
    return int(row[0]) if row else 0


def test_a_fresh_worker_rerunning_the_input_sends_nothing(
        pg_url: str, sink: str, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "input.csv", notes(30))
    with EmulatorThread(webhook_url=sink) as api:
        first = worker(tmp_path, "worker-a", pg_url, api.url)
        outcome = run_pipeline(first, str(source))
        assert outcome.exit_code in (0, 1)
        assert api.emulator.requests == 30
        wait_until(lambda: sink_count(pg_url) == 30, timeout=30, what="30 webhooks stored")
        done = jobs.reconcile(first, outcome.run_id)
        assert done.exit_code == 0
        statuses = {r["final_status"] for r in read_results(first.report.dir / outcome.run_id)}
        assert statuses == {"confirmed"}

        second = worker(tmp_path, "worker-b", pg_url, api.url)
        again = run_pipeline(second, str(source))
        assert api.emulator.requests == 30  # nothing sent again
        rows = read_results(second.report.dir / again.run_id)
        assert {r["final_status"] for r in rows} == {"skipped_already_sent"}
        assert again.exit_code == 0
    for home in ("worker-a", "worker-b"):
        assert not (tmp_path / home / "state").exists()  # no local state at all
