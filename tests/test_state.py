"""The state store's own promises, through its public operations: each pending row handed
out once, private files, its schema, run records and what it mirrors read back typed."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from helpers import make_config, write_csv
from pipeline.errors import StateError
from pipeline.plan import RunOptions, Scan, open_inputs
from pipeline.reconciliation import Reconciler, ingest
from pipeline.rejects import RejectsWriter
from pipeline.state import (
    SCHEMA_VERSION,
    Attempt,
    Earlier,
    EventRecord,
    InputFile,
    InputRecords,
    Ledger,
    NewRow,
    RunInfo,
    RunRecord,
    ScanStopped,
    ScanStore,
    StateStore,
    row_key,
)
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.protocol import ROW_COLUMNS, RUN_CHUNK_COLUMNS, STATUS_CHUNK_COLUMNS
from pipeline.state.schema import OUTCOME_CLOCKS, SCHEMA

ACCOUNT = "test_clinic"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A fresh store of each backend, as the stages see it (the seam, ``StateStore``):
    the SQLite ledger, and the PostgreSQL one on a throwaway server (tests/pg.py)."""
    if request.param == "sqlite":
        opened: StateStore = Ledger(tmp_path / "ledger.sqlite")
    else:
        opened = PgLedger(request.getfixturevalue("pg_url"), ACCOUNT)
    try:
        yield opened
    finally:
        opened.close()


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
        assert ledger.synchronous() == "full"
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
    """sink_position: after a reconcile, the sink's size and the hash of its first line, so
    the next reconcile reads only what was appended (and starts over on a new file)."""
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


def test_a_ledger_without_the_added_columns_gains_them_and_keeps_its_outcome_times(
        tmp_path: Path) -> None:
    """A ledger written before outcome_clock and written_off_at existed opens: the columns
    are added (still schema 2), and events mirrored back then take their created time as
    outcome_at, marked event_created_no_receipt (what their time meant then)."""
    path = tmp_path / "ledger.sqlite"
    old = re.sub(r"\n +(outcome_clock|written_off_at) TEXT[^\n]*|\n +outcome_at TEXT, +--[^\n]*",
                 "", SCHEMA)
    old = old.replace("reason_codes TEXT, ", "reason_codes TEXT  ").replace(
        "line INTEGER,", "line INTEGER")
    assert "outcome_clock" not in old
    assert "written_off_at" not in old
    db = sqlite3.connect(path)
    db.executescript(old)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO events (event_id, kind, job_id, created) VALUES"
               " ('evt_1', 'created', '1', '2026-06-15T12:02:40Z')")
    db.commit()
    db.close()
    ledger = Ledger(path)
    try:
        [event] = ledger.events()
    finally:
        ledger.close()
    assert (event.outcome_at, event.outcome_clock) == ("2026-06-15T12:02:40Z",
                                                       "event_created_no_receipt")
    db = sqlite3.connect(path)  # the file as another reader sees it, once the ledger closed
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(rows)")}
    finally:
        db.close()
    assert {"outcome_clock", "written_off_at"} <= columns


def test_a_ledger_opened_normal_does_not_fsync_every_commit(tmp_path: Path) -> None:
    """state.synchronous: normal is what the connection uses (the faster, WAL-safe level)."""
    ledger = Ledger(tmp_path / "ledger.sqlite", synchronous="normal")
    try:
        assert ledger.synchronous() == "normal"
    finally:
        ledger.close()


def test_a_run_record_reads_back_typed_with_its_info_merged(tmp_path: Path) -> None:
    """start_run's info, finish_run's and update_run_info's are merged in the stored record:
    run() gives them back as RunInfo fields, times from the ledger's clock."""
    times = iter(["2026-06-15T12:00:00.000Z", "2026-06-15T12:05:00.000Z"])
    ledger = Ledger(tmp_path / "ledger.sqlite", clock=lambda: next(times))
    try:
        ledger.start_run("r", ACCOUNT, "fp", {"argv": ["run", "x.csv"], "limit": 5})
        ledger.finish_run("r", "finished", {"throughput_per_s": 12.5, "stop_reason": None,
                                            "send": {"requests": 3},
                                            "truncated_at": ("x.csv", 7)})
        ledger.update_run_info("r", {"exit_code": 1})
        record = ledger.run("r")
    finally:
        ledger.close()
    assert record == RunRecord(
        "r", "2026-06-15T12:00:00.000Z", "2026-06-15T12:05:00.000Z", "finished", ACCOUNT, "fp",
        RunInfo(argv=("run", "x.csv"), limit=5, throughput_per_s=12.5,
                send={"requests": 3}, truncated_at=("x.csv", 7), exit_code=1))


def test_a_run_left_running_reads_as_crashed_once_no_process_holds_the_lock(
        tmp_path: Path) -> None:
    """effective_state: ``running`` while the run lock is held, ``crashed`` once it is free
    (the process is gone), and recover() under the next lock records it as crashed."""
    path = tmp_path / "ledger.sqlite"
    live = Ledger(path)
    live.lock()
    live.start_run("r", ACCOUNT, "fp", {})
    reader = Ledger(path, readonly=True)
    try:
        assert reader.effective_state(reader.run("r")) == "running"
        live.close()  # the lock goes with it, as with a killed process
        assert reader.effective_state(reader.run("r")) == "crashed"
        assert reader.run("r").state == "running"  # as stored, until a run recovers it
        nxt = Ledger(path)
        nxt.lock()
        nxt.recover()
        assert nxt.run("r").state == "crashed"
        nxt.close()
    finally:
        reader.close()


def test_input_files_and_mirrored_events_read_back_as_records(tmp_path: Path) -> None:
    """files() gives InputFile records in file order; events() the mirrored events."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    sink = tmp_path / "webhooks.jsonl"
    sink.write_text('{"id":"evt_1","object":"event","created":"2026-06-15T12:02:40Z",'
                    '"type":"task_note.created","job_id":" 5","data":{"task_note_id":"a"}}\n')
    try:
        ledger.start_run("r", ACCOUNT, "fp", {})
        ledger.add_file("r", 1, "b.csv", ["emr_task_id", "note"])
        ledger.add_file("r", 0, "a.csv", ["emr_task_id", "note", "x"], sha256="ab", size=9)
        assert ingest(ledger, sink, ACCOUNT) == 1
        files, events = ledger.files("r"), ledger.events()
    finally:
        ledger.close()
    assert files == [InputFile(0, "a.csv", "ab", 9, ("emr_task_id", "note", "x")),
                     InputFile(1, "b.csv", None, None, ("emr_task_id", "note"))]
    assert [(e.event_id, e.kind, e.job_id, e.task_note_id) for e in events] == [
        ("evt_1", "created", "5", "a")]


def test_a_mirrored_events_clock_is_stored_as_its_code_and_read_back_as_its_name(
        tmp_path: Path) -> None:
    """Each outcome clock is stored as its one-letter code (schema 3); a value that is not a
    clock's name is stored as it is; events() gives back what was added."""
    clocks = [*OUTCOME_CLOCKS, "unknown-clock"]
    records = [EventRecord(f"evt_{i}", "created", str(i), None, None, None, None, None, None,
                           i, None, clock) for i, clock in enumerate(clocks)]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ledger.add_events(records, {}, offset=9, head="h") == len(clocks)
        stored = ledger._db.execute("SELECT outcome_clock FROM events ORDER BY event_id")
        assert [c for (c,) in stored] == ["r", "p", "n", "unknown-clock"]
        assert ledger.events() == records
    finally:
        ledger.close()


def test_run_info_records_read_back_as_typed_records(store: StateStore) -> None:
    """input_records and scan_stopped are stored as JSON and read back as InputRecords and
    ScanStopped; a later run that reads one of the unread files to its end takes it off
    not_read, the other stays."""
    counts = InputRecords("a.csv", records=4, to_send=2, rejected=1, skipped=1,
                          accounted=True)
    stopped = ScanStopped("a.csv", 3, ("a.csv", "b.csv"))
    store.start_run("r1", ACCOUNT, "fp", {})
    store.finish_run("r1", "aborted", {"input_records": (counts,), "scan_stopped": stopped})
    store.start_run("r2", ACCOUNT, "fp", {})
    store.finish_run("r2", "finished", {"input_records": (
        InputRecords("a.csv", records=4, to_send=4, accounted=True),
        InputRecords("b.csv", records=9, to_send=5, beyond_limit=4, accounted=True))})
    record = store.run("r1")
    assert (record.state, record.info.input_records, record.info.scan_stopped) == (
        "aborted", (counts,), stopped)
    assert store.run("r2").info.scan_stopped is None
    assert store.not_read() == [("r1", ["b.csv"])]


def test_a_runs_rows_cross_the_seam_with_the_documented_columns(store: StateStore) -> None:
    """run_chunks yields RUN_CHUNK_COLUMNS, status_chunks STATUS_CHUNK_COLUMNS and frame
    ROW_COLUMNS, in that order, on every backend: reconciliation.py reads them by name."""
    store.start_run("r", ACCOUNT, "fp", {})
    store.add_file("r", 0, "a.csv", ["emr_task_id", "note"])
    store.add_rows("r", [NewRow(0, 2, "T1", row_key(ACCOUNT, "T1", "n"), "pending"),
                         NewRow(0, 3, "T1", row_key(ACCOUNT, "T1", "n"), "duplicate",
                                ref_id=1)])
    (chunk,) = store.run_chunks("r")
    assert tuple(chunk.columns) == RUN_CHUNK_COLUMNS
    assert list(chunk["source_file"]) == ["a.csv", "a.csv"]
    (statuses,) = store.status_chunks("r")
    assert tuple(statuses.columns) == STATUS_CHUNK_COLUMNS
    assert list(statuses["status"]) == ["pending", "duplicate"]
    assert tuple(store.frame("r").columns) == ROW_COLUMNS


@pytest.mark.parametrize("size", [3, 7, 8])
def test_run_chunks_give_every_row_of_the_run_once_in_input_order(
        store: StateStore, size: int) -> None:
    """Seven rows of a run (and a row of another run between them) read back ``size`` at
    a time: every row of the run once, in input order, with the same columns in every
    chunk; each chunk full but the last (PostgreSQL reads the next chunk ahead)."""
    store.start_run("r", ACCOUNT, "fp", {})
    store.start_run("other", ACCOUNT, "fp", {})
    store.add_file("r", 0, "a.csv", ["emr_task_id", "note"])
    for line in range(2, 9):
        store.add_rows("r", [NewRow(0, line, f"T{line}", row_key(ACCOUNT, f"T{line}", "n"),
                                    "pending")])
        if line == 4:
            store.add_rows("other", [NewRow(0, 2, "X", None, "pending")])
    chunks = list(store.run_chunks("r", size))
    assert [len(c) for c in chunks] == ([3, 3, 1] if size == 3 else [7])
    assert {tuple(c.columns) for c in chunks} == {RUN_CHUNK_COLUMNS}
    assert [line for c in chunks for line in c["line"]] == list(range(2, 9))


class MemoryScanStore:
    """A whole ``ScanStore`` in memory: the scan needs nothing else of a store."""

    def __init__(self, delivered: dict[bytes, Earlier]) -> None:
        self.delivered = delivered
        self.recorded: list[NewRow] = []
        self.named: list[InputFile] = []

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None:
        self.named.append(InputFile(file_no, path, sha256, size, tuple(header)))

    def files(self, run_id: str) -> list[InputFile]:
        return list(self.named)

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        self.recorded.extend(rows)

    def earlier(self, run_id: str, keys: Sequence[bytes]) -> dict[bytes, Earlier]:
        return {k: self.delivered[k] for k in keys if k in self.delivered}

    def sent_accounts(self, ignore: Collection[str] = ()) -> dict[str, int]:
        return {ACCOUNT: len(self.delivered)} if self.delivered and ACCOUNT not in ignore else {}


def test_the_scan_runs_on_any_scan_store(tmp_path: Path) -> None:
    """The scan (plan.py) asks its store only what ``ScanStore`` offers: on a store kept in
    memory, a note an earlier run delivered is already_sent (referring to that run's row),
    a repeat is a duplicate, the rest pending; every row recorded once, in input order."""
    write_csv(tmp_path / "in.csv", [["T1", "sent before"], ["T2", "new"], ["T2", "new"]])
    config = make_config(tmp_path)
    sent = row_key(ACCOUNT, "T1", "sent before")
    memory = MemoryScanStore({sent: Earlier(41, "old-run", "accepted", "job-9", "created")})
    store: ScanStore = memory
    options = RunOptions(inputs=(str(tmp_path / "in.csv"),), progress=False)
    inputs = open_inputs(config, options)
    rejects = RejectsWriter(tmp_path / "rejects.csv", config.input, inputs.headers)
    try:
        counts = Scan(config, options, inputs, "r", lookup=store, recorder=store,
                      rejects=rejects).run()
    finally:
        rejects.close()
    assert (counts.to_send, counts.already_sent, counts.duplicates) == (1, 1, 1)
    assert [(r.line, r.status, r.ref_id) for r in memory.recorded] == [
        (2, "already_sent", 41), (3, "pending", None), (4, "duplicate", None)]
    assert {(f.file_no, f.path) for f in store.files("r")} == {(0, str(tmp_path / "in.csv"))}


def _four_runs(directory: Path, pg_url: str | None = None) -> Ledger:
    """run-1 could not send note A1; run-2 sends A1 (job 3) and B1 (job 1); run-3's row
    (job 9) gets no event; run-4's (job 5) fails in the EMR; run-5 skipped E1 as already
    sent by run-4 under the account's former name (its row refers to run-4's, under
    another key). Events for jobs 3, 1 and 5. In the database at ``pg_url`` (the sink's
    events too) if given."""
    from test_reconcile import Book  # noqa: PLC0415 - its module imports this one's fixtures

    book = Book(directory, pg_url=pg_url)
    book.row("failed", task="A1")
    for run_id, rows in (("run-2", [("A1", "3"), ("B1", "1")]), ("run-3", [("D1", "9")]),
                         ("run-4", [("E1", "5")])):
        book.ledger.start_run(run_id, "test_clinic", "fp", {})
        for task, job in rows:
            book.row("accepted", task=task, job_id=job, run_id=run_id)
    (sent,) = book.ledger.frame("run-4")["id"]
    book.ledger.start_run("run-5", "renamed_clinic", "fp", {})
    book.ledger.add_rows("run-5", [NewRow(0, 2, "E1", row_key("renamed_clinic", "E1", "a note"),
                                          "already_sent", "already sent in run run-4",
                                          int(sent))])
    book.event("task_note.created", "3", n=1, task="A1")
    book.event("task_note.created", "1", n=2, task="B1")
    book.event("task_note.failed", 5, n=3)
    return book.ledger


@pytest.mark.parametrize(("quiet_from", "scan_keys_from"), [(10**9, 0), (0, 0), (0, 10**9)])
def test_a_large_write_of_outcomes_bumps_the_runs_the_row_triggers_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_from: int,
        scan_keys_from: int) -> None:
    """Outcomes written row by row through the rows' triggers, or (many at once) with the
    triggers set aside and the runs bumped by one statement, the keys of more than one row
    found by reading rows_key whole or by a probe per changed row: the same outcomes, the
    same runs' ``rev`` moved (run-2 and run-4 for their own rows, run-1 because its row's
    note was sent by run-2, run-5 because its row refers to run-4's; not run-3), and the
    triggers are there again after."""
    import pipeline.state.outcomes  # noqa: PLC0415 - the module whose thresholds are set

    monkeypatch.setattr(pipeline.state.outcomes, "QUIET_FROM", quiet_from)
    monkeypatch.setattr(pipeline.state.outcomes, "SCAN_KEYS_FROM", scan_keys_from)
    ledger = _four_runs(tmp_path)
    try:
        revs = dict(ledger._db.execute("SELECT run_id, rev FROM runs"))
        assert Reconciler(ledger, tmp_path / "webhooks.jsonl").refresh("test_clinic") is None
        moved = {r: v - revs[r] for r, v in ledger._db.execute("SELECT run_id, rev FROM runs")}
        assert {r for r, v in moved.items() if v} == {"run-1", "run-2", "run-4", "run-5"}
        assert ledger._db.execute("SELECT run_id, emr_task_id, outcome, event_id FROM rows"
                                  " ORDER BY id").fetchall() == [
            ("run-1", "A1", None, None), ("run-2", "A1", "created", "evt_1"),
            ("run-2", "B1", "created", "evt_2"), ("run-3", "D1", None, None),
            ("run-4", "E1", "failed", "evt_3"), ("run-5", "E1", None, None)]
        triggers = {n for (n,) in ledger._db.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger'")}
        assert triggers == {"rows_changed", "rows_followed", "rows_linked", "rows_gone"}
        assert ledger.match_outcomes() == 0  # its stamp was kept: nothing to do again
    finally:
        ledger.close()


@pytest.mark.slow
def test_the_join_rules_on_postgres_bump_the_runs_the_row_trigger_would(
        tmp_path: Path, pg_url: str) -> None:
    """On PostgreSQL the join rules' write of outcomes bumps the runs itself (no UPDATE
    trigger there): the same runs' ``rev`` moved as SQLite's row triggers move them
    (run-2 and run-4 for their own rows, run-1 because its row's note was sent by run-2,
    run-5 because its row refers to run-4's; not run-3), each once; after it, in the same
    session, a send bumps again."""
    ledger = _four_runs(tmp_path, pg_url)
    try:
        revs = dict(ledger._db.execute("SELECT run_id, rev FROM runs"))
        Reconciler(ledger, tmp_path / "webhooks.jsonl").refresh("test_clinic")
        moved = {r: v - revs[r] for r, v in ledger._db.execute("SELECT run_id, rev FROM runs")}
        assert moved == {"run-1": 1, "run-2": 1, "run-3": 0, "run-4": 1, "run-5": 1}
        assert ledger._db.execute("SELECT run_id, emr_task_id, outcome, event_id FROM rows"
                                  " ORDER BY id").fetchall() == [
            ("run-1", "A1", None, None), ("run-2", "A1", "created", "evt_1"),
            ("run-2", "B1", "created", "evt_2"), ("run-3", "D1", None, None),
            ("run-4", "E1", "failed", "evt_3"), ("run-5", "E1", None, None)]
        (row_id,) = ledger._db.execute("SELECT id FROM rows WHERE run_id = 'run-3'").fetchone()
        ledger.apply([row_id], [])
        after = dict(ledger._db.execute("SELECT run_id, rev FROM runs"))
        assert after["run-3"] == revs["run-3"] + 1
    finally:
        ledger.close()


def test_adopt_keys_moves_only_rows_that_neither_delivered_nor_may_have(
        store: StateStore) -> None:
    """``adopt_keys`` (a renamed account's run about to send, or hold, notes its former
    name did not deliver): of the rows under the former key, those not sent, whose send
    failed, that failed in the EMR, or in doubt (ambiguous, in flight) take the new key;
    one that delivered the note (accepted) keeps its key (the scan skips that note), as
    do the sending run's own rows. Their runs are bumped (reports rewritten)."""
    old, new = row_key("clinicA", "T1", "n"), row_key("clinicB", "T1", "n")
    store.lock()
    kinds = ["pending", "failed", "failed_in_emr", "accepted", "ambiguous", "sending"]
    for n, kind in enumerate(kinds):
        store.start_run(f"run-{n}", "clinicA", "fp", {})
        store.add_rows(f"run-{n}", [NewRow(0, 2, "T1", old, "pending")])
        (row,) = [r[0] for r in store.rows_to_send(f"run-{n}")]
        if kind == "pending":
            continue
        store.apply([row], [])
        if kind in ("failed", "accepted", "ambiguous"):
            store.apply([], [Attempt(row, kind, 202 if kind == "accepted" else None)])
        if kind == "failed_in_emr":
            store.apply([], [Attempt(row, "accepted", 202, f"tn-{n}", f"job-{n}")])
            store.add_events([EventRecord(f"evt-{n}", "failed", f"job-{n}", f"tn-{n}",
                                          "2026-01-01T00:00:02Z", None, "x", None, None, 1)],
                             {}, offset=1, head="")
            store.match_outcomes()
    store.start_run("run-new", "clinicB", "fp", {})
    store.add_rows("run-new", [NewRow(0, 2, "T1", old, "pending")])  # its own: left alone
    marker = {r: store.report_marker(r) for r in (f"run-{n}" for n in range(len(kinds)))}
    assert store.adopt_keys("run-new", [(old, new)]) == 5
    keys = dict(store.frame(columns="run_id, key")[["run_id", "key"]].itertuples(index=False))
    moved = {"run-0", "run-1", "run-2", "run-4", "run-5"}
    assert {r for r, k in keys.items() if bytes(k) == new} == moved
    assert bytes(keys["run-3"]) == old
    assert bytes(keys["run-new"]) == old
    changed = {r for r in marker if store.report_marker(r) != marker[r]}
    assert moved <= changed
    assert store.adopt_keys("run-new", []) == 0


def test_prune_is_offered_only_runs_that_have_ended(store: StateStore) -> None:
    """runs_started_before (what prune takes as old) leaves out a run still running: it
    writes its input copies and report yet, so pruning it would let them back after."""
    store.start_run("run-ended", ACCOUNT, "fp", {})
    store.finish_run("run-ended", "finished", {})
    store.start_run("run-live", ACCOUNT + "-other", "fp", {})
    assert store.runs_started_before("9999-12-31T00:00:00.000Z") == ["run-ended"]
    store.finish_run("run-live", "crashed", {})
    assert store.runs_started_before("9999-12-31T00:00:00.000Z") == ["run-ended", "run-live"]
    assert store.runs_started_before("2000-01-01T00:00:00.000Z") == []


def test_add_events_keeps_the_first_record_of_each_event_id_with_every_value(
        store: StateStore) -> None:
    """add_events stores each record's every value as given (bytes, a non-ASCII text, an
    account, Nones) and keeps the first record of an event id, whether its repeat comes in
    the same batch or a later one; the others are counted as repeated deliveries."""
    first = EventRecord("evt_1", "created", "5", "tn_a", "2026-11-28T10:01:00Z", "emr-1", None,
                        None, row_key(ACCOUNT, "T1", "café"), 101, "2026-11-28T10:02:00.123Z",
                        "sink_received", "clinic_b")
    failed = EventRecord("evt_2", "failed", None, "tn_b", None, None, "Task n\u00f6t found",
                         "task_not_found;other", None, 102)
    again = first._replace(kind="failed", job_id="6", line=103)  # the same id, other values
    assert store.add_events([first, failed, again], {}, offset=103, head="") == 2
    assert store.add_events([failed._replace(line=104)], {"x": 1}, offset=104, head="") == 0
    assert store.events() == [first, failed]
    assert store.event_tally() == {"(repeated)": 2, "x": 1}
