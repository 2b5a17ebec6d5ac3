"""Truth across runs, with real processes: an interrupted run, the run that finishes its
work, reconcile and status after and during runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    notes,
    read_results,
    read_summary,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.emulator import Faults
from pipeline.events import SinkFile
from pipeline.sink import WebhookReceiver

pytestmark = pytest.mark.slow


def tasknotes(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "-q", *args, "--no-progress"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_dir(stdout: str, cwd: Path) -> Path:
    return cwd / stdout.split("report: ")[1].split("/ (", maxsplit=1)[0]


def test_interrupt_rerun_reconcile_offers_no_accepted_row(tmp_path: Path) -> None:
    """Run A is interrupted (exit 3, and its summary.json and report.html say 3) with rows
    unsent and offered in its redrive.csv; run B sends and confirms them; reconcile then
    rewrites A: those rows say "sent in run B as job J: confirmed", none is send_failed
    or open, and no redrive.csv anywhere offers them."""
    rows = notes(40)
    write_csv(tmp_path / "input.csv", rows)
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt", latency_ms=(100.0, 100.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              submit={"concurrency": 1, "rate_per_second": None})
        proc = start("run", str(config), cwd=tmp_path)
        wait_until(lambda: api.emulator.requests >= 3, timeout=30, what="sending to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err
        first = report_dir(out, tmp_path)
        assert read_summary(first)["exit_code"] == 3
        assert "<dt>Exit code</dt><dd>3 (the run's process)" in (
            first / "report.html").read_text()
        unsent = [r["emr_task_id"] for r in read_results(first)
                  if r["final_status"] == "send_failed"]
        assert unsent
        assert (first / "redrive.csv").exists()  # offers the unsent rows, for now

        again = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert again.returncode in (0, 1), again.stderr
        second = report_dir(again.stdout, tmp_path)
        assert not (first / "redrive.csv").exists()  # B rewrote A's report as it ended
        wait_until(lambda: api.emulator.deliveries.get("success", 0) == len(rows),
                   timeout=60, what="every outcome")
        done = tasknotes("reconcile", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        for task, note in rows:
            assert api.stored(task, note) == 1
    sink.close()
    results = read_results(first)
    assert "send_failed" not in {r["final_status"] for r in results}
    by_task = {r["emr_task_id"]: r for r in results}
    later = {r["emr_task_id"]: r for r in read_results(second)}
    for task in unsent:
        row = by_task[task]
        assert row["final_status"] == "skipped_already_sent"
        assert row["detail"] == (f"sent in run {second.name} as job {later[task]['job_id']}: "
                                 "confirmed")
    summary = read_summary(first)
    assert (summary["exit_code"], summary["exit_code_now"], summary["needs_attention"]) == (
        3, 0, 0)
    assert list((tmp_path / "reports").glob("*/redrive.csv")) == []
    status = tasknotes("status", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stdout
    assert json.loads(status.stdout)["open_total"] == 0


def test_lost_webhooks_status_poll_status(tmp_path: Path) -> None:
    """Every webhook lost: status exits 1 and says how many await an outcome; poll brings
    them back; status exits 0."""
    write_csv(tmp_path / "input.csv", notes(5))
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url})
        run = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        wait_until(lambda: len(api.emulator.events) == 5, what="the outcomes")
        before = tasknotes("status", str(config), cwd=tmp_path)
        assert before.returncode == 1, before.stderr
        assert "awaiting an outcome: 5" in before.stdout
        assert f"settle: tasknotes poll {config}" in before.stdout
        polled = tasknotes("poll", str(config), cwd=tmp_path)
        assert polled.returncode == 0, polled.stdout + polled.stderr
        after = tasknotes("status", str(config), cwd=tmp_path)
    assert after.returncode == 0, after.stdout
    assert "nothing open" in after.stdout


def test_reconcile_and_status_during_a_run_see_it_in_progress(tmp_path: Path) -> None:
    """While a run sends, reconcile leaves it alone (no report calling its unsent rows
    send_failed, no redrive.csv) and status counts them in progress, not send_failed."""
    # 3,000 rows two at a time at 150 ms: a run of ~4 min, far longer than the two CLI calls
    # it must outlive on a loaded machine (it is interrupted once they are done).
    write_csv(tmp_path / "input.csv", notes(3000))
    with EmulatorThread(latency_ms=(150.0, 150.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              submit={"concurrency": 2, "rate_per_second": None})
        proc = start("run", str(config), cwd=tmp_path)
        try:
            wait_until(lambda: api.emulator.requests >= 4, timeout=30, what="sending")
            done = tasknotes("reconcile", str(config), cwd=tmp_path)
            status = tasknotes("status", str(config), "--json", cwd=tmp_path)
            assert proc.poll() is None, "the run ended before the checks: make it longer"
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in progress" in done.stdout
    assert list((tmp_path / "reports").glob("*/results.csv")) == [
        report_dir(out, tmp_path) / "results.csv"]  # only the run's own, written at its end
    assert list((tmp_path / "reports").glob("*/redrive.csv")) == [
        report_dir(out, tmp_path) / "redrive.csv"]  # interrupted: its own, at its end
    kinds = json.loads(status.stdout)["kinds"]
    assert status.returncode == 1
    assert kinds["send_failed"]["count"] == 0
    assert kinds["in_progress"]["count"] > 0
    assert kinds["in_progress"]["run_ids"] == [report_dir(out, tmp_path).name]
