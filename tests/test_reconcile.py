"""Reconciliation: each join rule on hand-made ledgers and sink files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.reconciliation import FINAL_STATUSES, Reconciler, _final_status
from pipeline.state import Attempt, Ledger, NewRow, row_key, utcnow
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.postgres import connect

ACCOUNT = "test_clinic"


class Book:
    """A ledger with one run, rows added by hand, and a sink file written by hand."""

    def __init__(self, tmp: Path, run_id: str = "run-1", pg_url: str | None = None) -> None:
        self.when: str | None = None  # what the ledger's clock reads while a test sets it
        self.pg_url = pg_url  # state.url: the ledger and the sink's events in PostgreSQL
        if pg_url is None:
            self.ledger = Ledger(tmp / "ledger.sqlite", clock=lambda: self.when or utcnow())
        else:
            self.ledger = PgLedger(pg_url, ACCOUNT, clock=lambda: self.when or utcnow())
        self.sink = tmp / "webhooks.jsonl"
        self.sink.write_text("")
        self.run_id = run_id
        self.ledger.start_run(run_id, ACCOUNT, "fp", {})
        self.ledger.add_file(run_id, 0, "in.csv", ["emr_task_id", "note"], sha256="x", size=1)
        self.next_line = 2

    def row(self, status: str, *, task: str = "T1", note: str = "a note", job_id: str | None = None,
            task_note_id: str | None = None, run_id: str | None = None, ref_id: int | None = None,
            submitted_at: str | None = None, account: str = ACCOUNT) -> int:
        run = run_id or self.run_id
        key = row_key(account, task, note) if status != "rejected" else None
        self.ledger.add_rows(run, [NewRow(0, self.next_line, task, key, "pending",
                                          ref_id=ref_id)])
        self.next_line += 1
        row_id = int(self.ledger.frame(run)["id"].max())
        if status in ("accepted", "ambiguous", "api_rejected", "failed"):
            self.when = submitted_at  # the row is submitted then (None: now)
            self.ledger.apply([row_id], [])
            self.when = None
        self.ledger.apply([], [Attempt(row_id, status, 200 if job_id else None,  # type: ignore[arg-type]
                                       task_note_id, job_id, None, submitted_at)])
        return row_id

    def event(self, kind: str, job_id: object, *, n: int, task_note_id: str = "",
              task: str = "T1", note: str = "a note", reason: str = "Task not found in EMR",
              created: str = "2026-06-15T12:02:40Z") -> None:
        data: dict[str, Any]
        if kind == "task_note.created":
            data = {"task_note_id": task_note_id, "emr_note_id": f"emr-{n}",
                    "emr_task_id": task, "note": note}
        elif kind == "task_note.failed":
            # the code a reason has ("EMR session expired" -> emr_session_expired): with no
            # input file to read the note back from, only codes survive (pipeline/reasons.py)
            data = {"task_note_id": task_note_id, "failure_reason": reason,
                    "reasons": [{"code": "_".join(reason.lower().split()[:3]),
                                 "description": reason}]}
        else:
            data = {"patient_id": "p1"}
        envelope = {"id": f"evt_{n}", "access_token_reference_id": "user_1", "object": "event",
                    "created": created, "type": kind, "job_id": job_id, "data": data}
        body = json.dumps(envelope, separators=(",", ":"))
        if self.pg_url is None:
            with self.sink.open("a") as fh:
                fh.write(body + "\n")
            return
        with connect(self.pg_url) as conn:  # as the sink stores a webhook it verified
            conn.execute("INSERT INTO sink_events (event_id, body_sha256, body, verdict,"
                         " received_at) VALUES (%s, %s, %s, 'signature-verified', now())"
                         " ON CONFLICT DO NOTHING",
                         (envelope["id"], hashlib.sha256(body.encode()).digest(),
                          body.encode()))

    def result(self, run_id: str | None = None) -> Any:
        return Reconciler(self.ledger, self.sink).run(run_id or self.run_id)

    def finals(self, run_id: str | None = None) -> list[tuple[str, str]]:
        rows = self.result(run_id).frame()
        return list(zip(rows["final_status"], rows["outcome"].fillna(""), strict=True))


def test_an_integer_job_id_joins_its_string_twin(book: Book) -> None:
    """The response's job_id 12345 (kept as "12345") matches the webhook's "12345"."""
    book.row("accepted", job_id="12345")
    book.event("task_note.created", "12345", n=1)
    assert book.finals() == [("confirmed", "created")]


def test_an_event_with_a_numeric_job_id_still_joins(book: Book) -> None:
    """Should an event carry job_id as a number, it is compared as text all the same."""
    book.row("accepted", job_id="777")
    book.event("task_note.failed", 777, n=1)
    assert book.finals() == [("failed_in_emr", "failed")]


def test_control_characters_in_upstream_text_do_not_stop_reconcile(book: Book) -> None:
    """A NUL (which a PostgreSQL text column cannot hold) in an event's ``created`` or
    failure reason: the event settles its row on both backends, and later reconciles go on
    (one such event used to stop every run and poll on PostgreSQL with exit 2)."""
    book.row("accepted", job_id="900", task="T1", note="n1")
    book.row("accepted", job_id="901", task="T2", note="n2")
    book.event("task_note.created", "900", n=1, task="T1", note="n1",
               created="2026-06-15T12:02:40\u0000Z")
    book.event("task_note.failed", "901", n=2, reason="Task not found\u0000 in EMR")
    assert book.finals() == [("confirmed", "created"),
                             ("failed_in_emr", "failed")]
    assert book.finals() == [("confirmed", "created"),
                             ("failed_in_emr", "failed")]


def test_task_note_id_is_the_fallback_key(book: Book) -> None:
    """A row whose job_id matches nothing is matched by task_note_id."""
    book.row("accepted", job_id="1", task_note_id="abc")
    book.event("task_note.created", "999", n=1, task_note_id="abc")
    result = book.result()
    assert book.finals() == [("confirmed", "created")]
    assert result.frame()["settled_by"].tolist() == ["task_note_id"]


def test_duplicate_events_collapse(book: Book) -> None:
    """The same event twice in the sink counts once."""
    book.row("accepted", job_id="5")
    book.event("task_note.created", "5", n=1)
    book.event("task_note.created", "5", n=1)
    result = book.result()
    assert book.finals() == [("confirmed", "created")]
    # the sink file may hold a repeat (counted); sink_events stores an event id once
    assert result.tally == ({"(repeated)": 1} if book.pg_url is None else {})


def test_created_and_failed_for_one_job_is_a_conflict(book: Book) -> None:
    """Both outcomes for one job: flagged, both events shown, and it needs a human."""
    book.row("accepted", job_id="5")
    book.event("task_note.created", "5", n=1)
    book.event("task_note.failed", "5", n=2)
    rows = book.result().frame()
    assert book.finals() == [("ambiguous", "conflict")]
    assert rows["event_id"].tolist() == ["evt_1;evt_2"]
    assert "conflict" in rows["detail"].iloc[0]


def test_other_event_types_are_counted_and_ignored(book: Book) -> None:
    """appointment.* and the like do not touch rows; they are tallied by type."""
    book.row("accepted", job_id="5")
    book.event("appointment.created", "5", n=1)
    book.event("patient.updated", None, n=2)
    result = book.result()
    assert book.finals() == [("awaiting_outcome", "pending")]
    assert result.tally == {"appointment.created": 1, "patient.updated": 1}


def test_events_matching_no_row_are_orphans(book: Book) -> None:
    """A task_note event for no job of any run is an orphan; one for another run is not."""
    book.row("accepted", job_id="5")
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", job_id="6", run_id="run-2")
    book.event("task_note.created", "5", n=1)
    book.event("task_note.created", "6", n=2)
    book.event("task_note.failed", "404", n=3)
    result = book.result()
    assert result.orphan_count == 1
    assert [o.event_id for o in result.orphans] == ["evt_3"]


def test_an_ambiguous_row_is_settled_by_evidence(book: Book) -> None:
    """No answer came back, but a created event carries the same note for the same task."""
    book.row("ambiguous", task="T9", note="the note")
    book.event("task_note.created", "4242", n=1, task="T9", note="the note")
    result = book.result()
    rows = result.frame()
    assert book.finals() == [("confirmed", "created")]
    assert rows["settled_by"].tolist() == ["evidence"]
    assert (result.orphan_count, result.orphans) == (0, [])  # the evidence is owned
    assert "settled by evidence" in rows["detail"].iloc[0]
    assert result.orphan_count == 0  # the event settled the row: it is owned


def test_evidence_claimed_by_another_row_settles_nothing(book: Book) -> None:
    """A created event that matches an accepted row by job_id is that row's, not evidence."""
    book.row("accepted", task="T9", note="the note", job_id="4242")
    book.row("ambiguous", task="T9", note="the note")
    book.event("task_note.created", "4242", n=1, task="T9", note="the note")
    assert book.finals() == [("confirmed", "created"), ("ambiguous", "")]


def test_one_event_settles_one_of_two_ambiguous_twins(book: Book) -> None:
    """Two ambiguous attempts of one note and one created event: one settled, one still open."""
    book.row("ambiguous", task="T9", note="n")
    book.row("ambiguous", task="T9", note="n")
    book.event("task_note.created", "1", n=1, task="T9", note="n")
    assert book.finals() == [("confirmed", "created"), ("ambiguous", "")]


def test_a_different_note_is_no_evidence(book: Book) -> None:
    """Evidence must carry the same note for the same task."""
    book.row("ambiguous", task="T9", note="the note")
    book.event("task_note.created", "1", n=1, task="T9", note="another note")
    assert book.finals() == [("ambiguous", "")]


def test_a_held_row_follows_the_attempt_it_waits_on(book: Book) -> None:
    """A row held for an earlier ambiguous attempt is already sent once that attempt is settled."""
    first = book.row("ambiguous", task="T9", note="n")
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("held", task="T9", note="n", run_id="run-2", ref_id=first)
    assert book.finals("run-2") == [("ambiguous", "")]
    book.event("task_note.created", "1", n=1, task="T9", note="n")
    assert book.finals("run-2") == [("skipped_already_sent", "created")]
    (detail,) = book.result("run-2").frame()["detail"]
    assert detail == "sent in run run-1: confirmed"


def test_final_statuses_for_rows_never_sent(book: Book) -> None:
    """Rejected, duplicate, failed, api-rejected and never-started rows each get their status."""
    book.row("rejected")
    book.row("duplicate")
    book.row("api_rejected")
    book.row("failed")
    book.row("pending")
    assert [f for f, _ in book.finals()] == [
        "rejected_invalid", "skipped_duplicate", "rejected_by_api", "send_failed", "send_failed"]


def test_outcomes_are_remembered_in_the_ledger(book: Book) -> None:
    """Reconcile writes what it learned back, so the next run knows what landed."""
    row_id = book.row("accepted", job_id="5")
    book.event("task_note.failed", "5", n=1)
    book.result()
    frame = book.ledger.frame("run-1")
    assert frame.loc[frame["id"] == row_id, "outcome"].tolist() == ["failed"]
    assert book.ledger.unresolved_runs() == []


@pytest.mark.parametrize(("bad", "final"), [
    ("failed", "send_failed"), ("ambiguous", "ambiguous"), ("api_rejected", "rejected_by_api"),
    ("pending", "send_failed"),
])
def test_the_exit_code_follows_the_final_statuses(book: Book, bad: str, final: str) -> None:
    """0 when every row ended well (awaiting an outcome counts as well); 1 when one row did
    not, even if that row's only problem is that it may have landed (ambiguous)."""
    book.row("accepted", job_id="5")
    book.row("duplicate")
    assert book.result().exit_code == 0
    book.row(bad, task="T2")
    result = book.result()
    assert [f for f, _ in book.finals()][-1] == final
    assert result.exit_code == 1


def test_a_note_failed_in_the_emr_and_sent_again_follows_the_new_send(book: Book) -> None:
    """A row that failed in the EMR, sent again by a later run: awaiting while that send
    is pending, then skipped_already_sent ("sent again in run X as job J: confirmed"); a
    send_failed row of the first run follows the later send the same way."""
    book.row("accepted", task="T1", job_id="1")
    book.event("task_note.failed", "1", n=1)
    book.row("failed", task="T2")
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="T1", job_id="8", run_id="run-2")
    book.row("accepted", task="T2", job_id="9", run_id="run-2")
    assert book.finals() == [("awaiting_outcome", "failed"), ("awaiting_outcome", "pending")]
    book.event("task_note.created", "8", n=2, task="T1")
    book.event("task_note.created", "9", n=3, task="T2")
    rows = book.result().frame()
    assert list(rows["final_status"]) == ["skipped_already_sent"] * 2
    assert list(rows["detail"]) == [
        "failed in the EMR; sent again in run run-2 as job 8: confirmed",
        "sent in run run-2 as job 9: confirmed"]
    assert list(rows["job_id"]) == ["1", "9"]  # the first row keeps its own (failed) job
def test_the_evidence_of_each_outcome_reaches_the_result(book: Book) -> None:
    """A confirmed row carries its EMR note id and event; a failed one Cobalt's reason codes
    (the reviewer's evidence, from the event's data). The reason's text is withheld: this
    book has no input file to read the note back from and check it (test_untrusted_text)."""
    book.row("accepted", job_id="5")
    book.row("accepted", job_id="6", task="T2")
    book.event("task_note.failed", "5", n=1)
    book.event("task_note.created", "6", n=2, task="T2")
    failed, created = book.result().frame().to_dict("records")
    assert (failed["final_status"], failed["event_id"], failed["failure_reason"],
            failed["reason_codes"]) == (
        "failed_in_emr", "evt_1",
        "task_not_found [reason withheld: the note was not read back to check it]",
        "task_not_found")
    assert (created["final_status"], created["event_id"], created["emr_note_id"]) == (
        "confirmed", "evt_2", "emr-2")
    assert (failed["detail"], created["detail"]) == ("", "")  # the evidence speaks for itself


def test_runs_still_waiting_for_outcomes_are_listed_until_reconciled(tmp_path: Path) -> None:
    """unresolved_runs (what `reconcile` and `status` default to): runs with accepted rows and
    no outcome yet, by run id; a run whose outcomes arrived drops off the list."""
    later = Book(tmp_path, run_id="run-2")
    later.row("accepted", job_id="7")
    later.ledger.start_run("run-1", ACCOUNT, "fp", {})
    later.ledger.add_file("run-1", 0, "in.csv", ["emr_task_id", "note"], sha256="x", size=1)
    later.row("accepted", job_id="8", task="T8", run_id="run-1")
    assert later.ledger.unresolved_runs() == ["run-1", "run-2"]
    later.event("task_note.created", "7", n=1)
    later.result("run-2")
    assert later.ledger.unresolved_runs() == ["run-1"]


def test_an_earlier_delivery_outranks_an_earlier_doubt(tmp_path: Path) -> None:
    """For a key sent by two earlier runs, the ledger reports the run that delivered it, not
    the one left in doubt before it, nor a later failure: so the row is skipped as already
    sent rather than held."""
    book = Book(tmp_path, run_id="run-1")
    book.row("ambiguous")
    for run in ("run-2", "run-3"):
        book.ledger.start_run(run, ACCOUNT, "fp", {})
        book.ledger.add_file(run, 0, "in.csv", ["emr_task_id", "note"], sha256="x", size=1)
    book.row("accepted", job_id="9", run_id="run-2")
    book.row("failed", run_id="run-3")
    (found,) = book.ledger.earlier("run-4", [row_key(ACCOUNT, "T1", "a note")]).values()
    assert (found.run_id, found.status, found.delivered) == ("run-2", "accepted", True)


def test_the_counts_are_the_final_statuses_of_the_rows(book: Book) -> None:
    """``counts`` decides each row's final status from the few columns it depends on
    (status_chunks), not from the rows read whole (chunks): the same statuses, row for row,
    read in chunks of any size, for a run whose rows end in every way a row can."""
    book.row("accepted", task="A1", job_id="1")  # confirmed
    book.row("accepted", task="A2", job_id="2")  # failed in the EMR, sent again: confirmed
    book.row("accepted", task="A3", job_id="3")  # a conflict of events
    book.row("accepted", task="A4", job_id="4")  # awaiting
    book.row("accepted", task="A5", job_id="5")  # failed in the EMR
    failed_first = book.row("accepted", task="A6", job_id="6")  # failed, then already sent
    doubt = book.row("ambiguous", task="A7")  # settled by evidence
    book.row("ambiguous", task="A8")
    for status in ("rejected", "duplicate", "api_rejected", "failed", "pending"):
        book.row(status, task=f"B-{status}")
    book.row("failed", task="A9")  # not sent here, sent (still pending) by run-2
    for n, (kind, job) in enumerate([("task_note.created", "1"), ("task_note.failed", "2"),
                                     ("task_note.created", "3"), ("task_note.failed", "3"),
                                     ("task_note.failed", "5"), ("task_note.failed", "6")]):
        book.event(kind, job, n=n, task=f"A{job}")
    book.event("task_note.created", "77", n=10, task="A7")
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="A2", job_id="22", run_id="run-2")
    book.event("task_note.created", "22", n=11, task="A2")
    book.row("accepted", task="A9", job_id="99", run_id="run-2")
    book.row("already_sent", task="A6", run_id="run-2", ref_id=failed_first)
    book.row("held", task="A7", run_id="run-2", ref_id=doubt)
    book.row("held", task="A8", run_id="run-2", ref_id=doubt + 1)
    for run in ("run-1", "run-2"):
        result = book.result(run)
        finals = list(result.frame()["final_status"])
        assert result.counts == {s: finals.count(s) for s in FINAL_STATUSES}
        assert sum(result.counts.values()) == len(finals)
        small = [s for chunk in book.ledger.status_chunks(run, size=2)
                 for s in _final_status(chunk, result.run, details=False)[0]]
        assert small == [s for chunk in result.chunks(size=3) for s in chunk["final_status"]]
    assert book.result("run-1").counts == {
        "confirmed": 2, "failed_in_emr": 2, "awaiting_outcome": 2, "rejected_invalid": 1,
        "rejected_by_api": 1, "ambiguous": 2, "send_failed": 2, "skipped_duplicate": 1,
        "skipped_already_sent": 1}
    assert book.result("run-2").counts == {
        **dict.fromkeys(FINAL_STATUSES, 0), "confirmed": 1, "awaiting_outcome": 1,
        "failed_in_emr": 1, "skipped_already_sent": 1, "ambiguous": 1}


def test_mirrored_through_is_the_ledgers_position_in_that_file_or_a_copy_of_it(
        tmp_path: Path) -> None:
    """migrate-state's count of a sink file's bytes already mirrored: the ledger's position
    in the file it read or a copy of it (another inode: taken to another host, restored
    from a backup); 0 for a file that begins otherwise, since none of it was read."""
    from pipeline.reconciliation import ingest, mirrored_through  # noqa: PLC0415

    sink = tmp_path / "webhooks.jsonl"
    line = b'{"id":"evt_1","type":"appointment.updated","job_id":"1","data":{}}\n'
    sink.write_bytes(line)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert mirrored_through(ledger, sink) == 0
        ingest(ledger, sink, ACCOUNT)
        assert mirrored_through(ledger, sink) == len(line)
        with sink.open("ab") as fh:
            fh.write(line.replace(b"evt_1", b"evt_2"))
        assert mirrored_through(ledger, sink) == len(line)  # the new line is not read yet
        copied = tmp_path / "copied.jsonl"  # another inode: a copy taken to another host
        copied.write_bytes(sink.read_bytes())
        assert mirrored_through(ledger, copied) == len(line)
        other = tmp_path / "other.jsonl"  # another file: none of it was read
        other.write_bytes(line.replace(b"evt_1", b"evt_3") + line)
        assert mirrored_through(ledger, other) == 0
    finally:
        ledger.close()
