"""Every report, redrive.csv, status count and exit code says what is true now, whichever
command learnt it: reports another command settled are rewritten, a redrive.csv never
offers a delivered note, status counts each note once, staleness runs from a note's
latest send, a scan that stopped never looks green, and a full report disk is exit 3."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_reconcile import ACCOUNT, Book
from test_shared_files import (  # noqa: F401 - small_disk: a fixture
    FakeCobalt,
    append_events,
    fill,
    run_cli,
    small_disk,
)

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    make_config,
    notes,
    read_results,
    read_summary,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.errors import StateError
from pipeline.events import SinkFile
from pipeline.open_items import ledger_status
from pipeline.report import write_report
from pipeline.sink import WebhookReceiver
from pipeline.state import Ledger, NewRow, row_key
from pipeline.state.postgres import connect

NOW = datetime(2026, 6, 16, 12, 0, tzinfo=UTC)
OLD = "2026-06-15T12:00:00.000Z"  # a day before NOW: stale at the default 900 s
RECENT = "2026-06-16T11:59:00.000Z"  # a minute before NOW


def tasknotes(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, check=False,
                          env=None if env is None else {**os.environ, **env})


def book_config(book: Book, tmp_path: Path) -> Path:
    return write_config(tmp_path, state={"ledger": str(book.ledger.path)},
                        webhooks={"sink": str(book.sink)})


# -- status: one note, one kind ----------------------------------------------------------------


def test_status_counts_each_note_once_under_the_first_kind_that_holds_it(
        tmp_path: Path) -> None:
    """Two notes failed in the EMR (retryable) in run A, then 503 in run B: 2 send_failed,
    not also 2 failed_retryable (open_total 2, run A listed nowhere). A crashed run's
    unsent notes that a live run is sending are in_progress only."""
    book = Book(tmp_path / "b")
    book.row("accepted", task="R1", job_id="1")
    book.row("accepted", task="R2", job_id="2")
    book.event("task_note.failed", "1", n=1, reason="EMR session expired")
    book.event("task_note.failed", "2", n=2, reason="EMR session expired")
    book.ledger.finish_run("run-1", "finished", {})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("failed", task="R1", run_id="run-2")
    book.row("failed", task="R2", run_id="run-2")
    book.ledger.finish_run("run-2", "finished", {})
    book.ledger.start_run("run-3", ACCOUNT, "fp", {})  # crashed with two notes unsent
    book.row("pending", task="P1", run_id="run-3")
    book.row("pending", task="P2", run_id="run-3")
    book.ledger.lock()  # run-4 is live: the lock is held, and run-3 recovered as crashed
    assert book.ledger.recover() == 0  # run-3 had nothing in flight
    book.ledger.start_run("run-4", ACCOUNT, "fp", {})
    book.row("pending", task="P1", run_id="run-4")
    book.row("pending", task="P2", run_id="run-4")

    config = make_config(tmp_path, state={"ledger": str(book.ledger.path)},
                         webhooks={"sink": str(book.sink)})
    shape = ledger_status(config, now=NOW).to_dict()
    got = {k: (v["count"], v["run_ids"]) for k, v in shape["kinds"].items()}
    assert got == {
        "awaiting_outcome": (0, []), "ambiguous": (0, []),
        "send_failed": (2, ["run-2"]), "failed_retryable": (0, []),
        "in_progress": (2, ["run-4"]), "not_read": (0, []),
    }
    assert shape["open_total"] == 4


# -- staleness from the latest send --------------------------------------------------------------


def test_a_resent_note_is_stale_from_its_latest_send_in_every_report_and_status(
        tmp_path: Path) -> None:
    """A note failed in the EMR a day ago (run 1) and was sent again a minute ago (run 2):
    both reports say awaiting, 0 stale, exit_code_now 0; status: awaiting 1, 0 stale."""
    book = Book(tmp_path / "b")
    book.row("accepted", task="A1", job_id="1", submitted_at=OLD)
    book.event("task_note.failed", "1", n=1, reason="EMR session expired")
    book.ledger.finish_run("run-1", "finished", {})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="A1", job_id="2", run_id="run-2", submitted_at=RECENT)
    book.ledger.finish_run("run-2", "finished", {})
    config = make_config(tmp_path, state={"ledger": str(book.ledger.path)},
                         webhooks={"sink": str(book.sink)})
    for run_id in ("run-1", "run-2"):
        written = write_report(book.result(run_id), config.report,
                               input_settings=config.input, now=NOW)
        summary = read_summary(written.directory)
        assert (summary["final_status"]["awaiting_outcome"], summary["report"]["stale"],
                summary["exit_code_now"], summary["verdict"]) == (1, 0, 0, "waiting"), run_id
    awaiting = ledger_status(config, now=NOW).kind("awaiting_outcome")
    assert (awaiting.count, awaiting.stale) == (1, 0)


# -- reports rewritten whoever learnt the truth ----------------------------------------------------


def test_reconcile_rewrites_a_run_that_another_command_settled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run 1's report says "awaiting"; its outcome arrives and `status` (not reconcile)
    mirrors it into the ledger, so run 1 is settled before reconcile looks: reconcile still
    rewrites run 1 (confirmed, verdict ok); once its report is final it is left alone."""
    book = Book(tmp_path / "b")
    book.row("accepted", task="A1", job_id="1")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 0})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="B1", job_id="2", run_id="run-2")
    book.ledger.finish_run("run-2", "finished", {"exit_code": 0})
    book.ledger.close()
    config = book_config(book, tmp_path)
    first = tmp_path / "reports" / "run-1"
    assert main(["reconcile", str(config)]) == 0
    assert read_summary(first)["verdict"] == "waiting"
    book.event("task_note.created", "1", n=1, task="A1")
    assert main(["status", str(config)]) == 1  # run 2 still awaits; this refreshed the ledger
    capsys.readouterr()
    assert main(["reconcile", str(config)]) == 0
    assert "run run-1:" in capsys.readouterr().out
    summary = read_summary(first)
    assert (summary["final_status"]["confirmed"], summary["awaiting"], summary["verdict"]) == (
        1, 0, "ok")
    assert main(["reconcile", str(config)]) == 0
    assert "run run-1:" not in capsys.readouterr().out  # final: nothing can change it


def test_reconcile_rewrites_a_run_that_skipped_a_note_sent_under_another_key(
        book: Book, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run 2 skipped T1 as already sent by run 1 under the account's former name
    (``formerly``), or in the form a version before NFC gave it: its row refers to run 1's
    (``ref_id``) under another ledger key. When run 1's send then fails in the EMR,
    reconcile rewrites run 2's report too: it no longer says the note was sent (attacker
    HIGH: it was left saying so, as only runs sharing the changed row's key were bumped)."""
    sent = book.row("accepted", task="T1", job_id="1", account="north")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 0})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.ledger.add_rows("run-2", [NewRow(0, 2, "T1", row_key("Northside", "T1", "a note"),
                                          "already_sent", "already sent in run run-1", sent)])
    book.ledger.finish_run("run-2", "finished", {"exit_code": 0})
    config = (book_config(book, tmp_path) if book.pg_url is None
              else write_config(tmp_path, state={"url": book.pg_url}))
    second = tmp_path / "reports" / "run-2"
    assert main(["reconcile", str(config)]) == 0
    assert read_summary(second)["final_status"]["skipped_already_sent"] == 1
    capsys.readouterr()
    book.event("task_note.failed", "1", n=1, task="T1")
    assert main(["reconcile", str(config)]) == 1  # run 1's note failed in the EMR
    assert "run run-2:" in capsys.readouterr().out
    finals = read_summary(second)["final_status"]
    assert (finals["skipped_already_sent"], finals["failed_in_emr"]) == (0, 1)


@pytest.mark.slow
def test_reconcile_rewrites_a_run_the_next_run_settled(tmp_path: Path) -> None:
    """Run A's 20 notes await outcomes when it ends; the outcomes arrive; run B (other
    notes) mirrors them into the ledger as it starts; reconcile then rewrites A too:
    20 confirmed, verdict ok, as the ledger and status say."""
    write_csv(tmp_path / "a.csv", notes(20, "a"))
    write_csv(tmp_path / "b.csv", notes(5, "b"))
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            outcome_delay_ms=(1500.0, 1500.0)) as api:
        config = write_config(tmp_path, api={"base_url": api.url})
        a = tasknotes("run", str(config), "--no-progress", "--input", "a.csv", cwd=tmp_path)
        assert a.returncode == 0, a.stdout + a.stderr
        first = next((tmp_path / "reports").iterdir())
        assert read_summary(first)["verdict"] == "waiting"
        wait_until(lambda: api.emulator.deliveries.get("success", 0) == 20, timeout=60,
                   what="run A's outcomes")
        b = tasknotes("run", str(config), "--no-progress", "--input", "b.csv", cwd=tmp_path)
        assert b.returncode == 0, b.stdout + b.stderr
        wait_until(lambda: api.emulator.deliveries.get("success", 0) == 25, timeout=60,
                   what="run B's outcomes")
        done = tasknotes("reconcile", str(config), cwd=tmp_path)
    sink.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {first.name}:" in done.stdout
    summary = read_summary(first)
    assert (summary["final_status"]["confirmed"], summary["awaiting"], summary["verdict"]) == (
        20, 0, "ok")
    status = tasknotes("status", str(config), "--json", cwd=tmp_path)
    assert (status.returncode, json.loads(status.stdout)["open_total"]) == (0, 0)


def offered(report: Path) -> list[str]:
    """The task ids a report's redrive.csv offers, in order."""
    with (report / "redrive.csv").open(encoding="utf-8", newline="") as fh:
        return [r["emr_task_id"] for r in csv.DictReader(fh)]


def test_a_note_another_run_may_have_sent_is_ambiguous_and_offered_by_no_redrive(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """Run A leaves X and W unsent (503) and offers both in redrive.csv; run B sends them:
    Cobalt answers X with a 500 (the request may have reached it) and W with a 503 again.
    When B ends, A's report follows B's attempt: X ``ambiguous`` ("may have reached
    Cobalt"), W still send_failed; A's redrive.csv offers W only, as status counts X once,
    as ambiguous (newcomer HIGH: A's report said "not sent" and its redrive.csv offered X,
    contradicting status). B took no note of A's, so only its ambiguous row makes B's end
    rewrite A's report."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"], ["W", "note w"]])
    busy = (503, {"message": "busy"})
    fake = FakeCobalt(answers=dict.fromkeys(("X", "W"), busy))
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, input={"path": str(source)}, state=state,
                              api={"base_url": api.url}, submit={"max_attempts": 1})
        a = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert a.returncode == 1, a.stdout + a.stderr
        first = next((tmp_path / "reports").iterdir())
        assert offered(first) == ["X", "W"]
        fake.answers = {"X": (500, {"message": "internal error"}), "W": busy}
        b = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert b.returncode == 1, b.stdout + b.stderr
    rows = {r["emr_task_id"]: r for r in read_results(first)}
    assert rows["X"]["final_status"] == "ambiguous"
    assert rows["X"]["detail"].startswith("not sent by this run; sent in run ")
    assert "may have reached Cobalt" in rows["X"]["detail"]
    assert rows["W"]["final_status"] == "send_failed"
    assert offered(first) == ["W"]
    assert read_summary(first)["final_status"]["ambiguous"] == 1
    status = json.loads(tasknotes("status", str(config), "--json", cwd=tmp_path).stdout)
    assert (status["kinds"]["ambiguous"]["count"], status["kinds"]["send_failed"]["count"]) == (
        1, 1)


def renamed_configs(tmp_path: Path, source: Path, state: dict[str, Any], url: str
                    ) -> tuple[Path, Path]:
    """A clinic's config before a rename (clinicA, one attempt a row) and after it
    (clinicB, formerly [clinicA]), both reading ``source`` and sending to ``url``."""
    old = write_config(tmp_path, "old.yaml", input={"path": str(source)}, state=state,
                       api={"base_url": url, "account": "clinicA"}, submit={"max_attempts": 1})
    new = write_config(tmp_path, "new.yaml", input={"path": str(source)}, state=state,
                       api={"base_url": url, "account": "clinicB", "formerly": ["clinicA"]})
    return old, new


def test_notes_left_unsent_under_a_former_name_follow_the_renamed_configs_send(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """Run A (account clinicA) leaves five notes unsent (503) and offers them in
    redrive.csv; the clinic is renamed (clinicB, formerly [clinicA]) and run B sends them.
    A's rows then follow B's send, as a row of the same account's would: A's report says
    awaiting ("sent in run B"), its redrive.csv offers nothing, status counts each note
    once (attacker HIGH: A stayed "not sent" with a five-row redrive.csv, status counted
    send_failed 5 and awaiting 5 for five notes, and only a false write-off closed them)."""
    source = write_csv(tmp_path / "in.csv", notes(5))
    fake = FakeCobalt(answers={t: (503, {"message": "busy"}) for t, _ in notes(5)})
    with ThreadedServer(fake.app()) as api:
        old, new = renamed_configs(tmp_path, source, state, api.url)
        a = tasknotes("run", str(old), "--no-progress", cwd=tmp_path)
        assert a.returncode == 1, a.stdout + a.stderr
        first = next((tmp_path / "reports").iterdir())
        assert len(offered(first)) == 5
        fake.answers.clear()
        b = tasknotes("run", str(new), "--no-progress", cwd=tmp_path)
        assert b.returncode == 0, b.stdout + b.stderr
    assert sum(fake.stored.values()) == 5
    finals = read_summary(first)["final_status"]
    assert (finals["awaiting_outcome"], finals["send_failed"]) == (5, 0)
    assert all(r["detail"].startswith("sent in run ") for r in read_results(first))
    assert not (first / "redrive.csv").exists() or offered(first) == []
    status = json.loads(tasknotes("status", str(new), "--json", cwd=tmp_path).stdout)
    assert status["open_total"] == 5
    assert (status["kinds"]["awaiting_outcome"]["count"],
            status["kinds"]["send_failed"]["count"]) == (5, 0)


def store_event(tmp_path: Path, state: dict[str, Any], envelope: dict[str, Any]) -> None:
    """A webhook as the sink stores it: a line of the sink file, or a row of sink_events."""
    body = json.dumps(envelope, separators=(",", ":"))
    if not state:
        append_events(tmp_path / "state" / "webhooks.jsonl", [envelope])
        return
    with connect(state["url"]) as conn:
        conn.execute("INSERT INTO sink_events (event_id, body_sha256, body, verdict,"
                     " received_at) VALUES (%s, %s, %s, 'signature-verified', now())",
                     (envelope["id"], hashlib.sha256(body.encode()).digest(), body.encode()))


def x_landed(tmp_path: Path, state: dict[str, Any], reference: str) -> None:
    """Cobalt's task_note.created event for task X, note "note x", from the connection
    ``reference``, stored as the sink stores it."""
    store_event(tmp_path, state, {
        "id": "evt_x", "access_token_reference_id": reference, "object": "event",
        "created": "2026-06-15T12:02:40Z", "type": "task_note.created", "job_id": "77",
        "data": {"task_note_id": "tn-77", "emr_note_id": "emr-77", "emr_task_id": "X",
                 "note": "note x"}})


def test_a_note_in_doubt_under_a_former_name_is_settled_by_the_renamed_configs_events(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """Run A (clinicA) gets no answer for X (a 500: it may have reached Cobalt); Cobalt's
    task_note.created event carrying X's note arrives; the clinic is renamed (clinicB,
    formerly [clinicA]) and run B holds X. The event, read by B's config, is keyed under
    clinicB; A's row in doubt takes clinicB's key when B records its rows, so the event
    settles it by evidence: A's X confirmed, B's X follows it, nothing open, X stored once
    (attacker MEDIUM: A's row stayed ambiguous forever, status exit 1)."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"]])
    fake = FakeCobalt(answers={"X": (500, {"message": "internal error"})})
    with ThreadedServer(fake.app()) as api:
        old, new = renamed_configs(tmp_path, source, state, api.url)
        a = tasknotes("run", str(old), "--no-progress", cwd=tmp_path)
        assert a.returncode == 1, a.stdout + a.stderr
        first = next((tmp_path / "reports").iterdir())
        assert read_summary(first)["final_status"]["ambiguous"] == 1
        x_landed(tmp_path, state, "user_1")
        fake.answers.clear()
        b = tasknotes("run", str(new), "--no-progress", cwd=tmp_path)
        assert b.returncode in (0, 1), b.stdout + b.stderr
        done = tasknotes("reconcile", str(new), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert fake.requests == 1  # A's attempt only: B held X
    (row,) = read_results(first)
    assert (row["final_status"], row["outcome"]) == ("confirmed", "created")
    assert "settled by evidence" in row["detail"]
    status = tasknotes("status", str(new), "--json", cwd=tmp_path)
    assert (status.returncode, json.loads(status.stdout)["open_total"]) == (0, 0)


def test_an_event_settles_only_its_own_clinics_row_whichever_config_reads_it(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """Two clinics, a config each (north: reference_id ref-north; south: ref-south), one
    state. Both send task X with the same note and get no answer (ambiguous). North's
    note landed: its task_note.created event (ref-north) is first read by south's run.
    It settles north's row by evidence, not south's: the state records each config's
    connection, so whichever config mirrors an event keys it under its own clinic
    (attacker MEDIUM: it was keyed under the reading config's account, so north's row
    stayed ambiguous and south's was taken as delivered)."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"]])
    fake = FakeCobalt(answers={"X": (500, {"message": "internal error"})})
    with ThreadedServer(fake.app()) as api:
        configs = {clinic: write_config(
            tmp_path, f"{clinic}.yaml", input={"path": str(source)}, state=state,
            api={"base_url": api.url, "account": clinic, "reference_id": f"ref-{clinic}"},
            report={"dir": str(tmp_path / clinic)}, submit={"max_attempts": 1})
            for clinic in ("north", "south")}
        north = tasknotes("run", str(configs["north"]), "--no-progress", cwd=tmp_path)
        assert north.returncode == 1, north.stdout + north.stderr
        x_landed(tmp_path, state, "ref-north")
        south = tasknotes("run", str(configs["south"]), "--no-progress", cwd=tmp_path)
        assert south.returncode == 1, south.stdout + south.stderr
        for clinic in ("north", "south"):
            tasknotes("reconcile", str(configs[clinic]), cwd=tmp_path)
    reports = {read_summary(d)["account"]: d for d in (tmp_path / "north").iterdir()}
    (north_row,), (south_row,) = read_results(reports["north"]), read_results(reports["south"])
    assert (north_row["final_status"], north_row["event_id"]) == ("confirmed", "evt_x")
    assert "settled by evidence" in north_row["detail"]
    assert (south_row["final_status"], south_row["event_id"]) == ("ambiguous", "")


def clinic_configs(tmp_path: Path, source: Path, state: dict[str, Any], url: str,
                   references: dict[str, str | None]) -> dict[str, Path]:
    """A config per clinic (single form) on one state, each listing the others in
    state.other_accounts, its reports in a directory of its own; ``references``: clinic
    -> its api.reference_id (None: not given)."""
    made = {}
    for clinic, reference in references.items():
        api: dict[str, Any] = {"base_url": url, "account": clinic}
        if reference is not None:
            api["reference_id"] = reference
        made[clinic] = write_config(
            tmp_path, f"{clinic}.yaml", input={"path": str(source)}, api=api,
            state={**state, "other_accounts": [c for c in references if c != clinic]},
            report={"dir": str(tmp_path / clinic)}, submit={"max_attempts": 1})
    return made


def test_an_event_of_an_unnamed_connection_settles_no_row_of_a_config_that_names_its_own(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """North names its connection (ref-north), south does not. Both send X with the same
    note, no answer; south's note landed, and its event (ref-south, which no config
    names) is first read by north's status. North knows the event is not its own, so it
    settles no row by evidence: north's X stays ambiguous (refcheck HIGH: it was keyed
    under the latest run's account and north's X was taken as delivered, although
    Cobalt never stored it). And a config naming a reference id the state records for
    another clinic is refused before it sends (refcheck HIGH: the record was taken over
    silently, and an event then settled the wrong clinic's row)."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"]])
    fake = FakeCobalt(answers={"X": (500, {"message": "internal error"})})
    with ThreadedServer(fake.app()) as api:
        configs = clinic_configs(tmp_path, source, state, api.url,
                                 {"north": "ref-north", "south": None})
        for clinic in ("south", "north"):
            done = tasknotes("run", str(configs[clinic]), "--no-progress", cwd=tmp_path)
            assert done.returncode == 1, done.stdout + done.stderr
        x_landed(tmp_path, state, "ref-south")
        assert tasknotes("status", str(configs["north"]), cwd=tmp_path).returncode == 1
        assert tasknotes("reconcile", str(configs["north"]), cwd=tmp_path).returncode == 1
        wrong = clinic_configs(tmp_path, source, state, api.url,
                               {"west": "ref-north"})["west"]
        refused = tasknotes("run", str(wrong), "--no-progress", cwd=tmp_path)
    reports = {read_summary(d)["account"]: d for d in (tmp_path / "north").iterdir()}
    (north_row,) = read_results(reports["north"])
    assert (north_row["final_status"], north_row["event_id"]) == ("ambiguous", "")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("api.reference_id: 'ref-north' is recorded in the state for account 'north'"
            in refused.stderr)
    assert fake.requests == 2  # the refused config sent nothing


def test_a_config_that_cannot_tell_its_own_account_keys_no_event_under_another_clinic(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """South's config has no api.account (its label is its token's fingerprint) and no
    reference_id; its reconcile runs without the token (it needs none), so it cannot tell
    its own label. South's note landed (no answer came back), north's did not, same task
    and note; south's event is first read by that reconcile. It must not be keyed under
    the latest run's account, north's (refcheck2 HIGH: north's row was taken as delivered):
    with runs of several accounts in the state it is keyed under none, and north's row
    stays ambiguous."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"]])
    fake = FakeCobalt(answers={"X": (500, {"message": "internal error"})})
    with ThreadedServer(fake.app()) as api:
        north = clinic_configs(tmp_path, source, state, api.url, {"north": "ref-north"})
        south = write_config(tmp_path, "south.yaml", input={"path": str(source)},
                             api={"base_url": api.url, "account": None,
                                  "access_token": "${TOK}"},
                             state=state, report={"dir": str(tmp_path / "south")},
                             submit={"max_attempts": 1})
        done = tasknotes("run", str(south), "--no-progress", cwd=tmp_path,
                         env={"TOK": "tok-south"})
        assert done.returncode == 1, done.stdout + done.stderr
        done = tasknotes("run", str(north["north"]), "--no-progress", cwd=tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
        x_landed(tmp_path, state, "ref-south")
        assert "TOK" not in os.environ
        assert tasknotes("reconcile", str(south), cwd=tmp_path).returncode == 1
        tasknotes("reconcile", str(north["north"]), cwd=tmp_path)
    reports = {read_summary(d)["account"]: d for d in (tmp_path / "north").iterdir()}
    (north_row,) = read_results(reports["north"])
    assert (north_row["final_status"], north_row["event_id"]) == ("ambiguous", "")


def test_another_configs_runs_are_not_reported_written_off_or_resent_by_this_one(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """Clinics with a config each on one state (state.other_accounts): north's run left X
    unsent. South's config does not write north's report (its redrive.csv holds note
    text) into south's report.dir, does not write off north's rows, and its status says
    not to send them with south's token, which would put north's note in south's chart
    (refcheck HIGH and MEDIUMs)."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"]])
    fake = FakeCobalt(answers={"X": (503, {"message": "busy"})})
    with ThreadedServer(fake.app()) as api:
        configs = clinic_configs(tmp_path, source, state, api.url,
                                 {"north": "ref-north", "south": "ref-south"})
        done = tasknotes("run", str(configs["north"]), "--no-progress", cwd=tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
    (north_run,) = [d.name for d in (tmp_path / "north").iterdir()]
    south = str(configs["south"])
    status = json.loads(tasknotes("status", south, "--json", cwd=tmp_path).stdout)
    settle = status["kinds"]["send_failed"]["settle"]
    assert settle.startswith(f"not this config's: run(s) {north_run} were sent under")
    assert "never with this one" in settle
    assert "tasknotes run" not in settle
    off = tasknotes("status", south, "--write-off", north_run, cwd=tmp_path)
    assert off.returncode == 2, off.stdout + off.stderr
    assert "another config's (state.other_accounts)" in off.stderr
    assert tasknotes("reconcile", south, cwd=tmp_path).returncode == 0
    assert not (tmp_path / "south" / north_run).exists()
    one = tasknotes("reconcile", south, "--run-id", north_run, cwd=tmp_path)
    assert one.returncode == 2, one.stdout + one.stderr
    assert not (tmp_path / "south" / north_run).exists()
    pruned = tasknotes("prune", south, "--older-than", "0", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert not (tmp_path / "south" / north_run).exists()  # refcheck2 MEDIUM: it wrote it
    assert tasknotes("reconcile", str(configs["north"]), cwd=tmp_path).returncode == 1
    assert read_summary(tmp_path / "north" / north_run)["final_status"]["send_failed"] == 1


def test_redrive_of_a_changed_input_is_removed_once_another_run_sends_its_notes(
        tmp_path: Path) -> None:
    """Run A leaves X and Y unsent (503) and offers both in redrive.csv; the nightly export
    overwrites in.csv with X and Z; run B sends X. When B ends, A's redrive.csv (which
    cannot be rewritten from the changed input) is gone, said on stderr; A's row X says
    "sent in run B"; status lists no redrive file for A's open Y; reconcile agrees."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"], ["Y", "note y"]])
    fake = FakeCobalt(answers={t: (503, {"message": "busy"}) for t in ("X", "Y")})
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, input={"path": str(source)},
                              api={"base_url": api.url})
        a = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert a.returncode == 1, a.stdout + a.stderr
        first = next((tmp_path / "reports").iterdir())
        assert (first / "redrive.csv").exists()
        fake.answers.clear()
        write_csv(source, [["X", "note x"], ["Z", "note z"]])
        b = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
        assert b.returncode == 0, b.stdout + b.stderr
    assert not (first / "redrive.csv").exists()
    assert f"{first / 'redrive.csv'} removed" in b.stderr
    rows = {r["emr_task_id"]: r for r in read_results(first)}
    assert rows["X"]["final_status"] == "awaiting_outcome"
    assert rows["X"]["detail"].startswith("sent in run ")
    assert rows["Y"]["final_status"] == "send_failed"
    status = tasknotes("status", str(config), "--json", cwd=tmp_path)
    kinds = json.loads(status.stdout)["kinds"]
    assert (kinds["send_failed"]["count"], kinds["send_failed"]["redrive_files"]) == (1, [])
    done = tasknotes("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert not (first / "redrive.csv").exists()


# -- a full report disk ----------------------------------------------------------------------


def test_a_full_report_disk_is_one_line_and_exit_3_for_reconcile_and_run(
        tmp_path: Path, small_disk: Path) -> None:  # noqa: F811 - the imported fixture
    """report.dir on a full tmpfs: reconcile and run say which report file could not be
    written (never "at None"), exit 3, no traceback."""
    write_csv(tmp_path / "input.csv", [["T1", "a note"]])
    fake = FakeCobalt()
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              state={"ledger": str(tmp_path / "db" / "ledger.sqlite")},
                              report={"dir": str(small_disk / "reports")})
        assert run_cli(config, tmp_path).returncode == 0
        fill(small_disk)
        report = next((small_disk / "reports").iterdir())
        # --run-id: always rewritten (without it, a run with nothing new is left alone)
        done = tasknotes("reconcile", str(config), "--run-id", report.name, cwd=tmp_path)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"tasknotes: disk full: the report file {report / 'results.csv'} cannot be written")
        write_csv(tmp_path / "input.csv", [["T2", "another note"]])
        again = run_cli(config, tmp_path)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert "None" not in again.stderr
    assert "report not written: disk full: the report file" in again.stderr
    # What is known is printed all the same: the final statuses, as the ledger has them.
    assert "final status" in again.stdout
    assert "awaiting_outcome" in again.stdout
    assert "report: not written" in again.stdout


# -- a scan that stopped never looks green -------------------------------------------------


def test_a_disk_full_scan_names_its_input_and_stays_open_until_a_run_reads_it(
        tmp_path: Path, small_disk: Path) -> None:  # noqa: F811 - the imported fixture
    """The ledger's disk fills during the scan: the report names the input, where reading
    stopped and that the rest was not read; verdict attention, exit_code_now 1; status and
    reconcile exit 1 (not_read: 1) until a later run reads the file to its end."""
    rows = [[f"T{i:04d}", f"note number {i}"] for i in range(3000)]
    source = write_csv(tmp_path / "input.csv", rows)
    fake = FakeCobalt()
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              webhooks={"sink": str(tmp_path / "hooks" / "webhooks.jsonl")})
        from pipeline.state import Ledger  # noqa: PLC0415

        Ledger(small_disk / "ledger.sqlite").close()  # its reserve taken
        filler = fill(small_disk, leave=160 * 1024)
        first = run_cli(config, tmp_path)
        assert first.returncode == 3, first.stderr
        filler.unlink()
        report = next((tmp_path / "reports").iterdir())
        summary = read_summary(report)
        assert [f["path"] for f in summary["inputs"]] == [str(source)]
        assert summary["not_read"]["files"] == [str(source)]
        assert (summary["verdict"], summary["exit_code"], summary["exit_code_now"]) == (
            "attention", 3, 1)
        assert "the rest of" in (report / "report.html").read_text()
        status = tasknotes("status", str(config), "--json", cwd=tmp_path)
        assert status.returncode == 1
        assert json.loads(status.stdout)["kinds"]["not_read"]["run_ids"] == [report.name]
        text = tasknotes("status", str(config), cwd=tmp_path)
        assert text.returncode == 1, text.stderr
        assert text.stdout.startswith("input files not read to the end: 1; oldest ")
        assert tasknotes("reconcile", str(config), cwd=tmp_path).returncode == 1
        second = run_cli(config, tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
    status = tasknotes("status", str(config), "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["kinds"]["not_read"]["count"] == 0
    assert read_summary(report)["not_read"] is None  # rewritten when B ended, or by reconcile
    assert sorted(fake.stored) == sorted((t, n) for t, n in rows)


@pytest.mark.slow
def test_sigint_during_the_scan_names_the_input_and_offers_the_recorded_rows(
        tmp_path: Path) -> None:
    """SIGINT while the first of two inputs (a large one) is scanned: exit 3; results.csv
    names the source file of every recorded row; inputs lists both files; redrive.csv
    offers the recorded rows (never "different headers"); the report says where reading
    stopped and that neither file's rest was read; status shows both as not_read."""
    source = tmp_path / "input.csv"
    with source.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["emr_task_id", "note"])
        writer.writerows([f"T{i:06d}", f"note number {i}"] for i in range(300_000))
    later = write_csv(tmp_path / "later.csv", [["L1", "a later note"]])
    config = write_config(tmp_path, api={"base_url": "http://127.0.0.1:9"})
    ledger = tmp_path / "state" / "ledger.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                             "--no-progress", "--input", str(source), "--input", str(later)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def recorded() -> int:
        try:
            store = Ledger.existing(ledger)
        except StateError:  # being created
            return 0
        if store is None:
            return 0
        try:
            latest = store.latest_run()
            return 0 if latest is None else sum(store.status_counts(latest).values())
        except (StateError, sqlite3.Error):  # a schema not yet written
            return 0
        finally:
            store.close()

    wait_until(lambda: recorded() > 0, timeout=60, what="the scan to record rows")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "different headers" not in err
    report = next((tmp_path / "reports").iterdir())
    summary = read_summary(report)
    assert [f["path"] for f in summary["inputs"]] == [str(source), str(later)]
    assert summary["not_read"]["files"] == [str(source), str(later)]
    assert summary["verdict"] == "attention"
    status = tasknotes("status", str(config), "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["kinds"]["not_read"]["count"] == 2
    results = read_results(report)
    assert 0 < len(results) < 300_000
    assert {r["source_file"] for r in results} == {str(source)}
    assert summary["not_read"]["after_line"] == int(results[-1]["line"])
    with (report / "redrive.csv").open(newline="") as fh:
        assert sum(1 for _ in fh) == len(results) + 1  # every recorded row, unsent
