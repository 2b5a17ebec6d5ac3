"""Delivery guarantees: each retry class, asserted in the ledger and in the emulator's count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    make_config,
    notes,
    read_results,
    read_summary,
    run_pipeline,
    wait_until,
    write_csv,
)
from pipeline import jobs
from pipeline.config import RunConfig
from pipeline.emulator import Faults
from pipeline.events import SinkFile
from pipeline.sink import WebhookReceiver
from pipeline.state import Ledger, NewRow, row_key
from pipeline.state.store import existing_store


def ledger_rows(config: RunConfig, run_id: str) -> list[dict[str, Any]]:
    ledger = existing_store(config)
    assert ledger is not None
    try:
        return ledger.frame(run_id).to_dict("records")
    finally:
        ledger.close()


def setup(tmp_path: Path, server: EmulatorThread, rows: list[list[str]], **overrides: Any
          ) -> RunConfig:
    write_csv(tmp_path / "input.csv", rows)
    sections: dict[str, Any] = {"api": {"base_url": server.url}}
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return make_config(tmp_path, **sections)


def _or_none(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def last_answer(faults: Faults, status: str) -> int | None:
    """The status of the last answer, as the ledger must record it (None: none came back)."""
    if status == "accepted" or faults.garbage_after_store:
        return 200
    return {"failed": 429, "api_rejected": 400}.get(
        status, 500 if faults.rate_500_after_store else None)


@pytest.mark.parametrize(
    ("faults", "status", "stored", "attempts"),
    [
        pytest.param(Faults(rate_429=1, only_first=1, retry_after_s=0), "accepted", 1, 2,
                     id="429-then-ok"),
        pytest.param(Faults(rate_503=1, only_first=2, retry_after_s=0), "accepted", 1, 3,
                     id="503-twice-then-ok"),
        pytest.param(Faults(rate_429=1, retry_after_s=0), "failed", 0, 4, id="429-always"),
        pytest.param(Faults(drop_before_store=1, only_first=1), "ambiguous", 0, 1,
                     id="dropped-before-storing"),
        pytest.param(Faults(rate_500_after_store=1), "ambiguous", 1, 1, id="500-after-storing"),
        pytest.param(Faults(drop_after_store=1), "ambiguous", 1, 1, id="dropped-after-storing"),
        pytest.param(Faults(reset_after_store=1), "ambiguous", 1, 1, id="reset-after-storing"),
        pytest.param(Faults(slow_after_store=1, slow_s=3), "ambiguous", 1, 1,
                     id="slower-than-timeout"),
        pytest.param(Faults(garbage_after_store=1), "ambiguous", 1, 1, id="garbage-200"),
        pytest.param(Faults(rate_400=1), "api_rejected", 0, 1, id="400"),
    ],
)
def test_each_failure_class_ends_as_it_must(tmp_path: Path, faults: Faults, status: str,
                                            stored: int, attempts: int,
                                            state: dict[str, Any]) -> None:
    """Retried only when provably not applied; ambiguous never resent; 4xx final."""
    # Only the slow case is about the timeout; elsewhere a generous one keeps a slow answer
    # on a loaded machine from turning ok/429/400 into ambiguous.
    timeout_s = 0.5 if faults.slow_after_store else 30.0
    with EmulatorThread(faults=faults) as api:
        config = setup(tmp_path, api, [["T1", "a note"]], api={"timeout_s": timeout_s},
                       submit={"max_attempts": 4, "max_consecutive_failures": 5}, state=state)
        outcome = run_pipeline(config)
        (row,) = ledger_rows(config, outcome.run_id)
        assert (row["status"], row["attempts"]) == (status, attempts)
        assert _or_none(row["http_status"]) == last_answer(faults, status)
        assert api.stored("T1", "a note") == stored
        assert api.emulator.requests == attempts
        assert outcome.exit_code == (0 if status == "accepted" else 1)


def test_connect_errors_are_retried_then_failed(tmp_path: Path) -> None:
    """Nobody listening: every attempt provably not sent, so retried, then send_failed."""
    write_csv(tmp_path / "input.csv", [["T1", "a note"]])
    config = make_config(tmp_path, api={"base_url": "http://127.0.0.1:9"},
                         submit={"max_attempts": 3})
    outcome = run_pipeline(config)
    (row,) = ledger_rows(config, outcome.run_id)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert "not sent" in row["error"]
    assert [r["final_status"] for r in read_results(outcome.report.directory)] == [
        "send_failed"]


def test_ambiguous_rows_are_resent_only_when_configured(tmp_path: Path) -> None:
    """submit.on_ambiguous: resend sends again after a 500 (and the note may land twice)."""
    with EmulatorThread(faults=Faults(rate_500_after_store=1, only_first=1)) as api:
        config = setup(tmp_path, api, [["T1", "a note"]], submit={"on_ambiguous": "resend"})
        outcome = run_pipeline(config)
        (row,) = ledger_rows(config, outcome.run_id)
        assert (row["status"], row["attempts"]) == ("accepted", 2)
        assert api.stored("T1", "a note") == 2


def test_retry_after_as_a_date_is_honoured(tmp_path: Path) -> None:
    """A 429 whose Retry-After is an HTTP date holds the retry until that moment."""
    with EmulatorThread(faults=Faults(rate_429=1, only_first=1, retry_after_s=1,
                                      retry_after_as_date=True)) as api:
        config = setup(tmp_path, api, [["T1", "a note"]])
        run_pipeline(config)
        first, second = api.emulator.arrivals
    assert second - first >= 0.95
    assert api.stored("T1", "a note") == 1


def test_a_429_pauses_every_worker(tmp_path: Path) -> None:
    """After a 429 with Retry-After: 1, no worker starts a request until the second is over.

    Only requests already under way when the client read the 429 (about the other
    ``concurrency - 1`` workers' worth) may arrive inside the pause; the rest of the run
    arrives after it. Counts, not durations: a slow machine lengthens the run, it does not
    move a request into the pause. (With the pause a no-op, 37 of 41 arrive inside it.)
    """
    rows = notes(40)
    concurrency = 4
    faulty = Faults(rate_429=1, only_first=1, retry_after_s=1, only_tasks=frozenset({rows[0][0]}))
    with EmulatorThread(faults=faulty, latency_ms=(5.0, 5.0)) as api:
        config = setup(tmp_path, api, rows, submit={"concurrency": concurrency})
        outcome = run_pipeline(config)
        arrivals = sorted(api.emulator.arrivals)
        answers = list(api.emulator.answers)
    assert outcome.exit_code == 0
    refused = [t for t, status in answers if status == 429]
    assert len(refused) == 1  # the 429 happened, once
    assert len(arrivals) == len(rows) + 1  # and its row was sent again
    (row,) = [r for r in ledger_rows(config, outcome.run_id) if r["emr_task_id"] == rows[0][0]]
    assert (row["status"], row["attempts"]) == ("accepted", 2)
    # The client learns of the 429 after the emulator answers it, so its pause ends after
    # refused + 1 s: nothing it starts after reading the 429 can arrive before then.
    pause_end = refused[0] + 1.0
    during = [t for t in arrivals if refused[0] < t < pause_end]
    after = [t for t in arrivals if t >= pause_end]
    assert len(during) < 2 * concurrency  # slack for a response read late on a busy loop
    assert len(after) >= len(arrivals) - 3 * concurrency  # the rest waited, then went


def test_the_rate_limit_spaces_request_starts(tmp_path: Path) -> None:
    """submit.rate_per_second: 20 never starts requests faster than 20 a second, whatever the
    concurrency (the exact slot grid is tested on the Pacer with its own clock)."""
    n, rate = 12, 20
    with EmulatorThread() as api:
        config = setup(tmp_path, api, notes(n), submit={"rate_per_second": rate,
                                                         "concurrency": 8})
        run_pipeline(config)
        arrivals = sorted(api.emulator.arrivals)
    assert len(arrivals) == n
    # n starts span at least n - 1 intervals; one interval of slack for the first request
    # being delayed on its way (a loaded machine only ever makes the span longer).
    assert arrivals[-1] - arrivals[0] >= (n - 2) / rate


def test_a_401_stops_the_run_after_the_first_answer(tmp_path: Path) -> None:
    """Credentials refused: exit 3 with one message; nothing else is tried, rows stay pending."""
    with EmulatorThread(client_id="someone-else") as api:
        config = setup(tmp_path, api, notes(50), submit={"concurrency": 1})
        outcome = run_pipeline(config)
        assert api.emulator.requests == 1
    assert outcome.exit_code == 3
    assert "credentials refused by Cobalt" in (outcome.stop_reason or "")
    statuses = {r["status"] for r in ledger_rows(config, outcome.run_id)}
    assert statuses == {"pending"}


def test_a_401_with_requests_in_flight_sends_no_more(tmp_path: Path) -> None:
    """With 4 in flight, at most those 4 reach Cobalt after credentials are refused."""
    with EmulatorThread(client_id="someone-else", latency_ms=(20.0, 20.0)) as api:
        config = setup(tmp_path, api, notes(50), submit={"concurrency": 4})
        outcome = run_pipeline(config)
        assert api.emulator.requests <= 4
    assert outcome.exit_code == 3


def test_too_many_failures_in_a_row_stop_the_run(tmp_path: Path) -> None:
    """submit.max_consecutive_failures: stop, exit 3; the rest stay pending for the next run."""
    with EmulatorThread(faults=Faults(rate_400=1)) as api:
        config = setup(tmp_path, api, notes(30),
                       submit={"concurrency": 1, "max_consecutive_failures": 3})
        outcome = run_pipeline(config)
        assert api.emulator.requests == 3
    assert outcome.exit_code == 3
    assert "3 rows in a row" in (outcome.stop_reason or "")
    assert (outcome.stop_reason or "").endswith("; submit.max_consecutive_failures")
    finals = [r["final_status"] for r in read_results(outcome.report.directory)]
    assert finals.count("rejected_by_api") == 3
    assert finals.count("send_failed") == 27


def test_a_second_run_sends_only_what_the_first_did_not(tmp_path: Path) -> None:
    """--limit 4, then a full run: 4 already sent, 6 sent now; every note stored once."""
    rows = notes(10)
    with EmulatorThread() as api:
        config = setup(tmp_path, api, rows)
        first = run_pipeline(config, limit=4)
        second = run_pipeline(config)
        for task, note in rows:
            assert api.stored(task, note) == 1
    assert [r["final_status"] for r in read_results(first.report.directory)] == (
        ["awaiting_outcome"] * 4)
    results = read_results(second.report.directory)
    # The 4 skipped rows follow the first run's sends, whose outcomes are still pending:
    # awaiting, with that run's id and job id, not "ended well".
    assert [r["final_status"] for r in results] == ["awaiting_outcome"] * 10
    firsts = read_results(first.report.directory)
    for earlier, later in zip(firsts, results[:4], strict=False):
        assert later["detail"] == (f"sent in run {first.run_id} as job {earlier['job_id']}: "
                                   "no outcome yet")
        assert (later["job_id"], later["outcome"]) == (earlier["job_id"], "pending")
        assert later["submitted_at"] == earlier["submitted_at"]
    summary = read_summary(second.report.directory)
    assert (summary["ended_well"], summary["awaiting"], summary["verdict"]) == (0, 10, "waiting")


def test_force_sends_again(tmp_path: Path) -> None:
    """--force overrides the ledger: the note lands a second time (documented as dangerous)."""
    with EmulatorThread() as api:
        config = setup(tmp_path, api, [["T1", "n"]])
        run_pipeline(config)
        run_pipeline(config, force=True)
        assert api.stored("T1", "n") == 2


def test_an_ambiguous_row_is_held_in_the_next_run(tmp_path: Path) -> None:
    """A row that may have landed is not sent by the next run either; it is held."""
    with EmulatorThread(faults=Faults(rate_500_after_store=1, only_first=1)) as api:
        config = setup(tmp_path, api, [["T1", "n"]])
        run_pipeline(config)
        second = run_pipeline(config)
        assert api.stored("T1", "n") == 1
    (row,) = read_results(second.report.directory)
    assert row["final_status"] == "ambiguous"
    assert "held" in row["detail"]


def test_a_note_that_failed_in_the_emr_may_be_sent_again(tmp_path: Path) -> None:
    """The next run learns task_note.failed from the sink file and sends the row again."""
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            missing_tasks=frozenset({"T1"})) as api:
        config = setup(tmp_path, api, [["T1", "n"]])
        first = run_pipeline(config)
        wait_until(lambda: api.emulator.deliveries.get("success") == 1, what="the webhook")
        second = run_pipeline(config)
        assert api.stored("T1", "n") == 2
        # The second send's own outcome may come before or after its report is written:
        # wait for it, then the report (rewritten by reconcile) says what is true now.
        wait_until(lambda: api.emulator.deliveries.get("success") == 2, what="the webhook")
    sink.close()
    # Each run's own outcome may come before or after its report is written (exit 0 while
    # it awaits, 1 once failed): reconciled now, both say failed_in_emr.
    assert {first.exit_code, second.exit_code} <= {0, 1}
    for run in (first, second):
        reconciled = jobs.reconcile(config, run.run_id)
        assert [r.report.exit_code for r in reconciled.runs if r.report] == [1]
        rows = read_results(run.report.directory)
        assert [(r["final_status"], r["job_id"] != "") for r in rows] == [
            ("failed_in_emr", True)]


def test_a_dry_run_sends_nothing_and_leaves_the_ledger_alone(tmp_path: Path) -> None:
    """--dry-run: counts only; no request, no ledger file, or an existing one unchanged."""
    with EmulatorThread() as api:
        config = setup(tmp_path, api, notes(5))
        outcome = run_pipeline(config, dry_run=True)
        assert outcome.scan.to_send == 5
        assert not config.state.ledger.exists()
        run_pipeline(config, limit=2)
        before = config.state.ledger.read_bytes()
        again = run_pipeline(config, dry_run=True)
        assert (again.scan.to_send, again.scan.already_sent) == (3, 2)
        assert config.state.ledger.read_bytes() == before
        assert api.emulator.requests == 2


def test_a_second_run_waits_for_no_one(tmp_path: Path) -> None:
    """Two runs on one ledger at once: the second stops at once, naming the first."""
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    ledger.lock()
    try:
        write_csv(tmp_path / "input.csv", notes(1))
        config = make_config(tmp_path)
        with pytest.raises(Exception, match=r"another tasknotes run \(pid \d+\)"):
            run_pipeline(config)
    finally:
        ledger.close()


def test_rows_left_sending_by_a_dead_run_become_ambiguous(tmp_path: Path) -> None:
    """Recovery: a crash leaves 'sending'; the next run (holding the lock) makes it ambiguous."""
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    ledger.start_run("dead", "test_clinic", "fp", {})
    ledger.add_rows("dead", [NewRow(0, 2, "T1", row_key("test_clinic", "T1", "n"), "pending")])
    ledger.apply([1], [])
    ledger.close()
    with EmulatorThread() as api:
        config = setup(tmp_path, api, [["T1", "n"]])
        outcome = run_pipeline(config)
        assert api.emulator.requests == 0
    assert ledger_rows(config, "dead")[0]["status"] == "ambiguous"
    assert read_results(outcome.report.directory)[0]["final_status"] == "ambiguous"
