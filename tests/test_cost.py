"""Cost follows change: reconcile rewrites a run's report only when something it shows
changed since it was written, and status asks the ledger small indexed questions."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_reconcile import ACCOUNT, Book
from test_truth_now import book_config

from helpers import make_config, read_summary, write_config, write_csv
from pipeline.cli import main
from pipeline.events import receipts_path
from pipeline.open_items import ledger_status
from pipeline.reconciliation import Reconciler
from pipeline.state import Attempt, Ledger, NewRow, row_key

# Indexes over a small part of the rows (partial): reading one of them whole is fine.
SMALL_INDEXES = ("rows_open", "rows_unsent", "rows_failed", "rows_ambiguous", "rows_sending")


def files_of(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each report file: (inode, mtime in ns, bytes). An atomic rewrite changes the inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.iterdir())}


def two_open_runs(tmp_path: Path) -> tuple[Book, Path]:
    """run-1 (job 1) and run-2 (job 2) each have a row awaiting its outcome."""
    book = Book(tmp_path / "b")
    book.row("accepted", task="A1", job_id="1")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 0})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="B1", job_id="2", run_id="run-2")
    book.ledger.finish_run("run-2", "finished", {"exit_code": 0})
    book.ledger.close()
    return book, book_config(book, tmp_path)


def test_reconcile_with_nothing_new_writes_no_report_and_a_new_event_rewrites_its_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two open runs: a second reconcile with nothing new leaves both reports byte for byte
    (same inode, mtime, bytes) and exits as the first did; an event for run 1 rewrites
    run 1's report only (confirmed), run 2's files stay untouched."""
    _, config = two_open_runs(tmp_path)
    one, two = tmp_path / "reports" / "run-1", tmp_path / "reports" / "run-2"
    assert main(["reconcile", str(config)]) == 0
    before = {one: files_of(one), two: files_of(two)}
    capsys.readouterr()
    assert main(["reconcile", str(config)]) == 0  # awaiting, not stale: as before
    out = capsys.readouterr().out
    assert "run run-1:" not in out
    assert "run run-2:" not in out
    assert "2 run(s) with rows not confirmed (awaiting an outcome, failed, rejected or not " \
        "sent) unchanged since" in out
    assert {one: files_of(one), two: files_of(two)} == before
    book = Book.__new__(Book)  # the same sink file, appended to
    book.pg_url = None
    book.sink = tmp_path / "b" / "webhooks.jsonl"
    book.event("task_note.created", "1", n=1, task="A1")
    assert main(["reconcile", str(config)]) == 0
    out = capsys.readouterr().out
    assert "run run-1:" in out
    assert "run run-2:" not in out
    assert files_of(two) == before[two]
    assert files_of(one)["results.csv"] != before[one]["results.csv"]
    assert read_summary(one)["final_status"]["confirmed"] == 1
    assert read_summary(two)["awaiting"] == 1


def test_a_later_send_of_a_note_rewrites_the_earlier_run_that_failed_to_send_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run-1 could not send note A1 (send_failed); run-2 is open and unrelated; run-3 sends
    A1 and Cobalt takes it: run-1's report is rewritten (its row follows run-3's send,
    no longer send_failed) although no row of run-1 changed; run-2 is left alone."""
    book = Book(tmp_path / "b")
    book.row("failed", task="A1")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 1})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="B1", job_id="2", run_id="run-2")
    book.ledger.finish_run("run-2", "finished", {"exit_code": 0})
    config = book_config(book, tmp_path)
    one, two = tmp_path / "reports" / "run-1", tmp_path / "reports" / "run-2"
    book.ledger.close()
    assert main(["reconcile", str(config)]) == 1
    assert read_summary(one)["final_status"]["send_failed"] == 1
    before = {one: files_of(one), two: files_of(two)}
    book.ledger = Ledger(book.ledger.path)
    book.ledger.start_run("run-3", ACCOUNT, "fp", {})
    book.row("accepted", task="A1", job_id="3", run_id="run-3")
    book.ledger.finish_run("run-3", "finished", {"exit_code": 0})
    book.ledger.close()
    capsys.readouterr()
    assert main(["reconcile", str(config)]) == 0
    out = capsys.readouterr().out
    assert "run run-1:" in out
    assert "run run-2:" not in out
    assert files_of(two) == before[two]
    assert read_summary(one)["final_status"]["send_failed"] == 0
    assert read_summary(one)["final_status"]["awaiting_outcome"] == 1


def test_a_report_is_rewritten_once_its_next_awaiting_row_turns_stale(tmp_path: Path) -> None:
    """The report records when its next awaiting row crosses report.stale_after
    (submitted + stale_after); the run is left alone before that instant, rewritten at it."""
    book, config = two_open_runs(tmp_path)
    assert main(["reconcile", str(config)]) == 0
    ledger = Ledger(book.ledger.path)
    try:
        submitted = ledger.frame("run-1")["submitted_at"].iloc[0]
        info = ledger.run("run-1").info
        due = sqlite3.connect(ledger.path).execute(
            "SELECT json_extract(info, '$.report_stale_due') FROM runs WHERE run_id='run-1'"
        ).fetchone()[0]
        import pandas as pd  # noqa: PLC0415

        stale_after = make_config(tmp_path).report.stale_after
        assert due == pytest.approx(pd.Timestamp(submitted).timestamp() + stale_after)
        assert info.report_final is False
        context = _context(tmp_path, config)
        assert "run-1" not in ledger.reports_to_rewrite(context, due - 1)
        assert "run-1" in ledger.reports_to_rewrite(context, due)
        assert ledger.reports_to_rewrite(context, None) == []
    finally:
        ledger.close()


def _context(tmp_path: Path, config: Path) -> str:
    from pipeline.config import load_config  # noqa: PLC0415
    from pipeline.report import report_context  # noqa: PLC0415

    return report_context(load_config(config))


def test_a_changed_report_setting_rewrites_every_report(tmp_path: Path) -> None:
    """What a report is made from includes its settings: another report.stale_after makes
    every report due again; the same settings leave them alone."""
    book, config = two_open_runs(tmp_path)
    assert main(["reconcile", str(config)]) == 0
    ledger = Ledger(book.ledger.path)
    try:
        assert ledger.reports_to_rewrite(_context(tmp_path, config), None) == []
        text = config.read_text()
        config.write_text(text.replace("report:", "report:\n  stale_after: 60", 1)
                          if "report:" in text else text + "report:\n  stale_after: 60\n")
        assert ledger.reports_to_rewrite(_context(tmp_path, config), None) == [
            "run-1", "run-2"]
    finally:
        ledger.close()


def test_an_older_ledger_gains_the_change_counter_and_rewrites_each_report_once(
        tmp_path: Path) -> None:
    """A ledger written before runs.rev and its triggers: opened, it gains both (the
    triggers then count a row change), and every run's report is due once (no marker)."""
    book = Book(tmp_path / "b")
    row = book.row("accepted", task="A1", job_id="1")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 0})
    path = book.ledger.path
    book.ledger.close()
    with sqlite3.connect(path) as db:
        for trigger in ("rows_changed", "rows_followed", "rows_linked", "rows_gone"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.executescript("""
            CREATE TABLE old_runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL,
                finished_at TEXT, state TEXT NOT NULL, account TEXT NOT NULL,
                config_fingerprint TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}');
            INSERT INTO old_runs SELECT run_id, started_at, finished_at, state, account,
                config_fingerprint, info FROM runs;
            DROP TABLE runs;
            ALTER TABLE old_runs RENAME TO runs;""")
        assert "rev" not in {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    ledger = Ledger(path)
    try:
        assert ledger.reports_to_rewrite("", None) == ["run-1"]
        with sqlite3.connect(path) as db:
            db.execute("UPDATE rows SET outcome='created' WHERE id=?", (row,))
            assert db.execute("SELECT rev FROM runs").fetchone()[0] == 1
    finally:
        ledger.close()


def test_status_reads_no_ledger_table_whole(tmp_path: Path) -> None:
    """Every statement `status` runs once the sink is mirrored, planned by SQLite: no full
    scan of rows and no walk of a whole index over every row (only the small partial
    indexes of open rows may be read whole), so its cost follows the open rows."""
    book, _ = two_open_runs(tmp_path)
    settings = make_config(tmp_path, state={"ledger": str(book.ledger.path)},
                           webhooks={"sink": str(book.sink)})
    ledger_status(settings)  # mirrors the sink, matches: the nothing-new case is next
    with traced_statements() as statements:
        found = ledger_status(settings)
    assert found.kind("awaiting_outcome").count == 2
    selects = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert selects
    db = sqlite3.connect(book.ledger.path)
    full = []
    for statement in selects:
        for *_, detail in db.execute("EXPLAIN QUERY PLAN " + statement):
            words = detail.split()
            on_rows = words[1] in ("rows", "r", "h", "d", "o", "ref", "via")
            whole = words[0] == "SCAN" or "(key>?)" in detail  # key IS NOT NULL: every key
            if on_rows and whole and not any(index in detail for index in SMALL_INDEXES):
                full.append((statement.split()[:12], detail))
    db.close()
    assert full == []


def whole_reads(path: Path, statements: list[str]) -> list[tuple[list[str], str]]:
    """The statements (as traced) that SQLite plans as a full scan of ``rows`` or of the
    events mirror (reads and writes alike), or as a walk of every key of ``rows``, not
    through one of the SMALL_INDEXES: (the statement's first words, the plan's line)."""
    db = sqlite3.connect(path)
    found = []
    try:
        for statement in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE",
                                                          "DELETE", "INSERT")):
                continue
            for *_, detail in db.execute("EXPLAIN QUERY PLAN " + statement):
                words = detail.split()
                on_big = words[1] in ("rows", "r", "h", "d", "o", "ref", "via", "events", "e")
                whole = words[0] == "SCAN" or "(key>?)" in detail
                if on_big and whole and not any(index in detail for index in SMALL_INDEXES):
                    found.append((statement.split()[:12], detail))
    finally:
        db.close()
    return found


def test_reconcile_and_status_with_nothing_new_read_no_big_table_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Once the sink is mirrored and the reports written, a ``tasknotes reconcile`` with
    nothing new and a ``tasknotes status`` (opening the ledger included) run no statement
    that reads every row or every mirrored event: their cost follows the open rows and
    the runs, not the history the ledger holds."""
    book, config = two_open_runs(tmp_path)
    book.sink.write_text("")  # an event no row owns: the mirror holds one
    book.event("task_note.created", "9", n=9, task="Z9")
    assert main(["reconcile", str(config)]) == 0
    capsys.readouterr()
    with traced_statements() as statements:
        assert main(["reconcile", str(config)]) == 0
        assert main(["status", str(config)]) == 1  # two notes awaiting
    assert "unchanged since" in capsys.readouterr().out
    assert any(s.lstrip().upper().startswith("SELECT") for s in statements)
    assert whole_reads(book.ledger.path, statements) == []


@contextmanager
def traced_statements() -> Iterator[list[str]]:
    """Every SQL statement run inside the block on a SQLite connection opened in it."""
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(statements.append)
        return db

    sqlite3.connect = traced  # type: ignore[assignment]
    try:
        yield statements
    finally:
        sqlite3.connect = real_connect

_OPENED: list[str] | None = None  # paths opened while a test listens (opened_paths)


def _listen(event: str, args: tuple[object, ...]) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_listen)  # Python's own audit events: every file this process opens


@contextmanager
def opened_paths() -> Iterator[list[str]]:
    """The paths this process opens inside the block (PEP 578 ``open`` events)."""
    global _OPENED  # noqa: PLW0603 - the one hook reads it
    _OPENED = found = []
    try:
        yield found
    finally:
        _OPENED = None


def test_reconcile_and_status_with_nothing_new_do_not_read_the_receipts_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sink's receipts file (a line per event ever received) is read only when the sink
    file has lines the ledger has not mirrored: a reconcile or a status with nothing new
    does not open it; one with a new line does (its receive time is needed)."""
    book, config = two_open_runs(tmp_path)
    receipts = receipts_path(book.sink)
    receipts.write_text('{"id":"evt_0","offset":0,"received_at":"2026-06-15T12:02:40.000Z"}\n')
    assert main(["reconcile", str(config)]) == 0
    with opened_paths() as opened:
        assert main(["reconcile", str(config)]) == 0
        assert main(["status", str(config)]) == 1  # two notes awaiting
    assert str(book.ledger.path) in opened  # the listening works
    assert str(receipts) not in opened
    book.event("task_note.created", "1", n=1, task="A1")
    with opened_paths() as opened:
        assert main(["reconcile", str(config)]) == 0
    assert str(receipts) in opened
    capsys.readouterr()


def test_the_scan_reads_no_big_table_whole(tmp_path: Path) -> None:
    """`tasknotes validate` (the scan of every run) on a ledger with history: the already
    sent lookups and the check of the account labels the ledger holds (sent_accounts) run
    no statement that reads every row, so the scan costs what its input does."""
    book, _ = two_open_runs(tmp_path)
    data = write_csv(tmp_path / "in.csv", [["A1", "a note"], ["N1", "a new note"]])
    config = write_config(tmp_path, state={"ledger": str(book.ledger.path)},
                          webhooks={"sink": str(book.sink)}, input={"path": str(data)})
    with traced_statements() as statements:
        assert main(["validate", str(config)]) == 0
    assert any("account" in s and s.lstrip().upper().startswith("SELECT") for s in statements)
    assert whole_reads(book.ledger.path, statements) == []


def test_the_join_rules_run_again_when_a_row_changes_though_no_event_is_new(
        tmp_path: Path) -> None:
    """The webhook of job 7 is mirrored before the ledger records that its row got job 7
    (the sink was faster than the run's commit): an orphan. The row's update alone (no new
    event, no new row) must make the next refresh match it: confirmed, no orphan."""
    book = Book(tmp_path / "b")
    book.ledger.add_rows("run-1", [NewRow(0, 2, "T1", row_key(ACCOUNT, "T1", "a note"),
                                          "pending")])
    row_id = int(book.ledger.frame("run-1")["id"].max())
    book.event("task_note.created", "7", n=1)
    Reconciler(book.ledger, book.sink).refresh(ACCOUNT)
    assert book.ledger.orphans()[0] == 1
    book.ledger.apply([row_id], [])
    book.ledger.apply([], [Attempt(row_id, "accepted", 200, None, "7")])
    Reconciler(book.ledger, book.sink).refresh(ACCOUNT)
    assert book.ledger.orphans()[0] == 0
    assert book.ledger.frame("run-1")["outcome"].tolist() == ["created"]
    assert book.ledger.match_outcomes() == 0  # nothing changed since: nothing to do


@pytest.mark.parametrize("rejected", [False, True])
def test_reconcile_of_settled_runs_with_nothing_new_rewrites_no_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], rejected: bool) -> None:
    """Every run settled (one confirmed row; with a rejected row too, which needs
    attention): a second reconcile leaves the report byte for byte (same inode, mtime,
    bytes; only generated_at would differ) and exits as that report did; a report that
    was removed is written again."""
    book = Book(tmp_path / "b")
    book.row("accepted", task="A1", job_id="1")
    book.event("task_note.created", "1", n=1, task="A1")
    if rejected:
        book.row("rejected", task="R1")
    book.ledger.finish_run("run-1", "finished", {"exit_code": 0})
    book.ledger.close()
    config = book_config(book, tmp_path)
    code = 1 if rejected else 0
    assert main(["reconcile", str(config)]) == code
    report = tmp_path / "reports" / "run-1"
    before = files_of(report)
    capsys.readouterr()
    assert main(["reconcile", str(config)]) == code
    out = capsys.readouterr().out
    assert "run run-1:" not in out
    assert "nothing changed since the reports were written" in out
    assert files_of(report) == before
    (report / "summary.json").unlink()
    assert main(["reconcile", str(config)]) == code
    assert "run run-1:" in capsys.readouterr().out
    assert read_summary(report)["final_status"]["confirmed"] == 1
