"""The ledger's own promises: each pending row handed out once, private files, its schema."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from pipeline.errors import StateError
from pipeline.ledger import SCHEMA_VERSION, Attempt, Ledger, NewRow, row_key
from pipeline.reconcile import Reconciler, ingest

ACCOUNT = "test_clinic"


def test_every_pending_row_is_handed_out_once_across_batches(tmp_path: Path) -> None:
    """rows_to_send pages through the pending rows 5,000 at a time: 10,001 rows come back
    once each, in input order, across the page boundaries."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run("r", ACCOUNT, "fp", {})
    n = 10_001
    ledger.add_rows("r", [NewRow(0, i + 2, f"T{i}", row_key(ACCOUNT, f"T{i}", "n"), "pending")
                          for i in range(n)])
    lines = [line for _, _, line, _, _ in ledger.rows_to_send("r")]
    ledger.close()
    assert lines == list(range(2, n + 2))


def test_the_state_directory_and_files_are_private(tmp_path: Path) -> None:
    """A new state directory is 0700; the ledger and its run lock are 0600."""
    path = tmp_path / "state" / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.lock()
    try:
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.with_name("ledger.sqlite.lock").stat().st_mode & 0o777 == 0o600
    finally:
        ledger.close()


def test_the_ledger_fsyncs_every_commit_by_default(tmp_path: Path) -> None:
    """state.synchronous: full (PRAGMA synchronous 2), not SQLite's WAL default of normal,
    which can lose the last commits (a `sending` mark) on power loss."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ledger._db.execute("PRAGMA synchronous").fetchone() == (2,)
    finally:
        ledger.close()


def test_a_ledger_from_another_schema_is_refused(tmp_path: Path) -> None:
    """A ledger written by a newer tasknotes is refused with a StateError naming both
    schemas, rather than read wrongly."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(StateError, match=f"schema {SCHEMA_VERSION + 1}, expected "
                                         f"{SCHEMA_VERSION}"):
        Ledger(path)


def test_reconcile_remembers_how_far_it_read_the_sink(tmp_path: Path) -> None:
    """sink_position: after a reconcile, the sink's size and its inode with the hash of its
    first line, so the next reconcile reads only what was appended (and starts over on a
    new file, even one whose first line is the same, as a pruned copy's may be)."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run("r", ACCOUNT, "fp", {})
    sink = tmp_path / "webhooks.jsonl"
    first = (b'{"id":"evt_1","object":"event","created":"2026-06-15T12:02:40Z",'
             b'"type":"task_note.created","job_id":"5","data":{"task_note_id":"a"}}\n')
    sink.write_bytes(first)
    assert ledger.sink_position() == (0, "")
    Reconciler(ledger, sink).run("r")
    head = f"{sink.stat().st_ino}:{hashlib.sha256(first).hexdigest()[:16]}"
    assert ledger.sink_position() == (len(first), head)
    more = first.replace(b"evt_1", b"evt_2").replace(b'"5"', b'"6"')
    with sink.open("ab") as fh:
        fh.write(more)
    Reconciler(ledger, sink).run("r")
    assert ledger.sink_position() == (len(first) + len(more), head)
    ledger.close()


def test_a_sink_larger_than_one_batch_is_mirrored_whole(tmp_path: Path) -> None:
    """ingest writes events to the ledger 10,000 at a time: 10,001 events are all mirrored,
    and the position saved is the end of the file."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    sink = tmp_path / "webhooks.jsonl"
    line = ('{{"id":"evt_{n}","object":"event","created":"2026-06-15T12:02:40Z",'
            '"type":"task_note.created","job_id":"{n}","data":{{"task_note_id":"{n}"}}}}\n')
    sink.write_text("".join(line.format(n=n) for n in range(10_001)))
    assert ingest(ledger, sink, ACCOUNT) == 10_001
    assert ledger.sink_position()[0] == sink.stat().st_size
    assert ingest(ledger, sink, ACCOUNT) == 0  # nothing new: nothing read twice
    ledger.close()


def test_apply_records_results_before_marking_rows_sending(tmp_path: Path) -> None:
    """A retried row's "back to pending" and its next "sending" in one apply: the row ends
    sending (its second attempt), never pending while its request is in flight (after a
    kill -9, a pending row is sent again)."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run("r", ACCOUNT, "fp", {})
    ledger.add_rows("r", [NewRow(0, 2, "T1", row_key(ACCOUNT, "T1", "n"), "pending")])
    (row_id, *_), = ledger.rows_to_send("r")
    ledger.apply([row_id], [])
    ledger.apply([row_id], [Attempt(row_id, "pending", 429, error="Too many requests")])
    (row,) = ledger.frame("r").to_dict("records")
    assert list(ledger.rows_to_send("r")) == []
    ledger.close()
    assert (row["status"], row["attempts"], row["http_status"]) == ("sending", 2, 429)
