"""The report a reviewer reads: complete, self-contained, stable, and free of note text."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from cdp import CHROMIUM, render

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    read_results,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.config import RunConfig, load_config
from pipeline.emulator import Faults
from pipeline.events import SinkFile
from pipeline.reconciliation import FINAL_STATUS_LABELS, FINAL_STATUSES, GOOD_STATUSES
from pipeline.report import ENDED_WELL, PAGE_SCRIPT_HASH, STATUS_COLOURS
from pipeline.sink import WebhookReceiver
from pipeline.state import Attempt, Ledger, NewRow, row_key

ROOT = Path(__file__).parent.parent
CANARY = "CANARY-7f3e9c-PHI"


def sandbox_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    return tmp_path


@pytest.mark.slow
async def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """report.html loads with no request beyond itself, no script error, the headline counts
    right; a screenshot is kept in the test's directory."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    cwd = sandbox_copy(tmp_path)
    done = await anyio.run_process([sys.executable, "-m", "pipeline", "-q", "run",
                                    "configs/sandbox.yaml", "--no-progress"], cwd=cwd, check=False)
    assert done.returncode == 1, done.stderr
    report = next((cwd / "reports").iterdir())
    page = await render((report / "report.html").as_uri(), tmp_path / "profile",
                        tmp_path / "report.png", {
                            "headline": "document.getElementById('headline').textContent",
                            "attention": "document.querySelectorAll('#attention tbody tr').length",
                            "bars": "document.querySelectorAll('#status-chart rect').length",
                            "csp": "document.querySelector("
                                   "'meta[http-equiv=\"Content-Security-Policy\"]').content",
                            # the page's script sorts on a header click: it ran under its CSP
                            "sorted": "(function () { var th = document.querySelector("
                                      "'#attention thead th'); th.click();"
                                      " return th.getAttribute('aria-sort'); })()",
                        })
    assert page.requests == [(report / "report.html").as_uri()]
    assert page.failures == []
    assert page.errors == []
    assert page.values["headline"].strip() == "31 of 37 notes confirmed"
    assert page.values["attention"] == 5
    assert page.values["bars"] == 9
    script_src = next(d for d in page.values["csp"].split(";") if "script-src" in d).split()
    assert script_src == ["script-src", f"'{PAGE_SCRIPT_HASH}'"]
    assert page.values["sorted"] == "ascending"
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_no_note_text_reaches_reports_logs_or_the_console(tmp_path: Path) -> None:
    """A canary in notes (sent, failed in the EMR, duplicate, rejected) appears only in
    rejects.csv and redrive.csv (copies of input rows, 0600), nowhere else we write."""
    rows = [["T1", f"sent {CANARY}"], ["T2", f"fails in the EMR {CANARY}"],
            ["T1", f"sent {CANARY}"], ["bad id", f"rejected {CANARY}"]]
    write_csv(tmp_path / "input.csv", rows)
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            missing_tasks=frozenset({"T2"}), faults=Faults()) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            report={"retryable_failures": ["not found"]})
        done = subprocess.run([sys.executable, "-m", "pipeline", "-vv", "run", str(path),
                               "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
        wait_until(lambda: api.emulator.deliveries.get("success") == 2, what="outcomes")
        again = subprocess.run([sys.executable, "-m", "pipeline", "-vv", "reconcile", str(path)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60,
                               check=False)
    sink.close()
    assert done.returncode == 1, done.stderr
    for output in (done.stdout, done.stderr, again.stdout, again.stderr):
        assert CANARY not in output
    report = next((tmp_path / "reports").iterdir())
    holders = set()
    for file in report.iterdir():
        if CANARY.encode() in file.read_bytes():
            holders.add(file.name)
            assert file.stat().st_mode & 0o777 == 0o600
    assert holders == {"rejects.csv", "redrive.csv"}
    assert CANARY.encode() not in (tmp_path / "state" / "ledger.sqlite").read_bytes()
    assert {r["final_status"] for r in read_results(report)} == {
        "confirmed", "failed_in_emr", "skipped_duplicate", "rejected_invalid"}


def test_reconciling_twice_gives_the_same_files(tmp_path: Path) -> None:
    """results.csv and summary.json are byte-identical across reconciles (the report's own
    timestamp aside); report.html differs only in that timestamp."""
    cwd = sandbox_copy(tmp_path)
    path = cwd / "configs" / "sandbox.yaml"
    run_pipeline(load_config(path, needs=("api",)))
    report = next((cwd / "reports").iterdir())
    snapshots = []
    for _ in range(2):
        assert main(["-q", "reconcile", str(path)]) == 1
        summary = json.loads((report / "summary.json").read_text())
        generated = summary["report"]["generated_at"]
        del summary["report"]
        html = (report / "report.html").read_text(encoding="utf-8")
        assert html.count(f"Generated {generated} by") == 1
        snapshots.append(((report / "results.csv").read_bytes(), summary,
                          html.replace(f"Generated {generated} by", "Generated … by")))
    assert snapshots[0] == snapshots[1]


def test_redrive_holds_the_rows_worth_sending_again_in_input_format(tmp_path: Path) -> None:
    """Send failures and retryable EMR failures, as they were in the input; fed back, they send."""
    write_csv(tmp_path / "input.csv", [["T1", "ok", "c1"], ["T2", "emr says no", "c2"],
                                       ["T3", "gone", "c3"]], header=("emr_task_id", "note", "x"))
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            missing_tasks=frozenset({"T2"}), faults=Faults(rate_503=1, retry_after_s=0,
                                                            only_tasks=frozenset({"T3"}))) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            submit={"max_attempts": 2},
                            report={"retryable_failures": ["task_not_found"]})
        config = load_config(path, needs=("api",))
        first = run_pipeline(config)
        wait_until(lambda: api.emulator.deliveries.get("success") == 2, what="outcomes")
        assert main(["-q", "reconcile", str(path)]) == 1
        redrive = first.report.directory / "redrive.csv"
        with redrive.open(newline="") as fh:
            assert list(csv.reader(fh)) == [["emr_task_id", "note", "x"],
                                             ["T2", "emr says no", "c2"], ["T3", "gone", "c3"]]
        assert oct(redrive.stat().st_mode & 0o777) == "0o600"
    sink.close()


def test_stale_rows_are_counted_and_shown_with_their_age(tmp_path: Path) -> None:
    """An accepted row without an outcome past report.stale_after is stale, with its age;
    stale rows need attention: reconcile exits 1 and the headline is not green. Awaiting rows
    that are not stale leave exit code 0, but the headline is not green either."""
    write_csv(tmp_path / "input.csv", [["T1", "n"]])
    with EmulatorThread() as api:  # no webhook_url: no outcome arrives
        path = write_config(tmp_path, api={"base_url": api.url}, report={"stale_after": 1})
        config = load_config(path, needs=("api",))
        outcome = run_pipeline(config)
    assert outcome.exit_code == 0
    summary = json.loads((outcome.report.directory / "summary.json").read_text())
    assert (summary["verdict"], summary["ended_well"], summary["awaiting"]) == ("waiting", 0, 1)
    html = (outcome.report.directory / "report.html").read_text()
    assert 'data-verdict="waiting"' in html
    assert "every row ended well" not in html
    # A run that sent its note on New Year's Day and exited 0, no outcome since.
    old = _sent_at(config, "run-old", {"T9": datetime(2026, 1, 1, tzinfo=UTC)})
    assert main(["-q", "reconcile", str(path)]) == 1
    summary = json.loads((old / "summary.json").read_text())
    assert summary["report"]["stale"] == 1
    assert (summary["needs_attention"], summary["verdict"]) == (1, "attention")
    assert (summary["exit_code"], summary["exit_code_now"]) == (0, 1)  # the run exited 0
    html = (old / "report.html").read_text()
    assert "1 stale" in html
    assert "days (stale)" in html
    assert 'data-verdict="attention"' in html


@pytest.mark.parametrize("allowed", [pytest.param(True, id="preview-on"),
                                     pytest.param(False, id="preview-off")])
def test_note_previews_appear_only_when_allowed(tmp_path: Path, allowed: bool) -> None:
    """report.show_note_preview puts the first characters of each flagged row's note in
    report.html (read back from the unchanged input); off by default, none appear."""
    write_csv(tmp_path / "input.csv", [["T1", f"Patient asked about {CANARY} and more"],
                                       ["bad id", "not a valid task id"]])
    with EmulatorThread() as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            report={"show_note_preview": allowed, "preview_chars": 12})
        outcome = run_pipeline(load_config(path, needs=("api",)))
    html = (outcome.report.directory / "report.html").read_text()
    assert ("not a valid…" in html) is allowed
    assert CANARY not in html  # the first row ended well: not flagged, never previewed


def test_stale_is_measured_in_seconds_of_report_stale_after(tmp_path: Path) -> None:
    """The boundary, not only an age of months: with stale_after 3600 s, a row sent two
    hours ago is stale and one sent half an hour ago is not (an hour of margin each side,
    so a slow machine cannot move either across)."""
    write_csv(tmp_path / "input.csv", [["T1", "n"], ["T2", "n"]])
    path = write_config(tmp_path, api={"base_url": "http://127.0.0.1:9"},
                        report={"stale_after": 3600})
    config = load_config(path, needs=("api",))
    now = datetime.now(UTC)
    report = _sent_at(config, "run-1", {"T1": now - timedelta(hours=2),
                                        "T2": now - timedelta(minutes=30)})
    assert main(["-q", "reconcile", str(path)]) == 1
    summary = json.loads((report / "summary.json").read_text())
    assert (summary["report"]["stale"], summary["awaiting"]) == (1, 2)


def _sent_at(config: RunConfig, run_id: str, sent: dict[str, datetime]) -> Path:
    """Record in the config's ledger a finished run (exit 0) that sent each task's note
    ``n`` (input.csv) at the given time and was accepted, no outcome since, through the
    ledger's own operations, its clock set to each time; returns its report directory."""
    clock = [min(sent.values())]
    ledger = Ledger(config.state.ledger, clock=lambda: clock[0].strftime(
        "%Y-%m-%dT%H:%M:%S.000Z"))
    config.webhooks.sink.touch()
    account = config.api.account_id()
    try:
        ledger.start_run(run_id, account, "fp", {})
        ledger.add_file(run_id, 0, str(config.report.dir.parent / "input.csv"),
                        ["emr_task_id", "note"])
        ledger.add_rows(run_id, [NewRow(0, line, task, row_key(account, task, "n"), "pending")
                                 for line, task in enumerate(sent, start=2)])
        for row_id, _, _, task, _ in list(ledger.rows_to_send(run_id)):
            clock[0] = sent[task]
            ledger.apply([row_id], [])
            ledger.apply([], [Attempt(row_id, "accepted", 202, f"tn-{task}", f"job-{task}")])
        ledger.finish_run(run_id, "finished", {"exit_code": 0})
    finally:
        ledger.close()
    return config.report.dir / run_id


def test_every_final_status_has_its_label_colour_and_verdict() -> None:
    """A new final status has one room (reconciliation.py) and its tables elsewhere: each must
    name every status, or a row of it would print without a label or break report.html."""
    assert set(FINAL_STATUS_LABELS) == set(FINAL_STATUSES)
    assert set(STATUS_COLOURS) == set(FINAL_STATUSES)
    assert set(GOOD_STATUSES) <= set(FINAL_STATUSES)
    assert ENDED_WELL <= GOOD_STATUSES
