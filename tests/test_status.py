"""tasknotes status: open items over every run, by kind, on hand-made ledgers; the CLI's
text, JSON and exit codes."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_reconcile import ACCOUNT, Book

from helpers import make_config, read_results, read_summary, wait_until, write_config
from pipeline.cli import main
from pipeline.open_items import KINDS, LedgerStatus, ledger_status
from pipeline.report import redrive_digest
from pipeline.state import Ledger
from pipeline.state.pg_ledger import PgLedger

NOW = datetime(2026, 6, 16, 12, 0, tzinfo=UTC)
OLD = "2026-06-15T12:00:00.000Z"  # a day before NOW: stale at the default 900 s
RECENT = "2026-06-16T11:59:00.000Z"  # a minute before NOW


def state_of(book: Book) -> dict[str, str]:
    """The config's state section for ``book``'s ledger (state.url on PostgreSQL)."""
    if book.pg_url is None:
        return {"ledger": str(book.ledger.path)}
    return {"url": book.pg_url}


def status_of(book: Book, tmp_path: Path) -> LedgerStatus:
    config = make_config(tmp_path, state=state_of(book),
                         webhooks={"sink": str(book.sink)})
    return ledger_status(config, config_path="my.yaml", now=NOW)


def test_an_empty_ledger_and_no_ledger_have_nothing_open(tmp_path: Path) -> None:
    """Nothing run yet: every kind present and empty, exit code 0."""
    found = ledger_status(make_config(tmp_path), now=NOW)
    assert not found.open
    assert found.exit_code == 0
    shape = found.to_dict()
    assert list(shape["kinds"]) == list(KINDS)
    assert shape["open_total"] == 0


def test_each_kind_is_counted_once_per_note_across_runs(book: Book, tmp_path: Path) -> None:
    """Awaiting (one stale), ambiguous (and the row held behind it), send_failed and a
    retryable EMR failure are open; what another run delivered since is not."""
    book.row("accepted", task="A1", job_id="1", submitted_at=OLD)
    book.row("accepted", task="A2", job_id="2", submitted_at=RECENT)
    doubt = book.row("ambiguous", task="B1", submitted_at=OLD)
    book.row("failed", task="C1")  # send_failed, never sent since
    book.row("pending", task="C2")  # the run stopped before it; a later run sends it
    book.row("pending", task="C3")  # ... and that later send is confirmed
    book.row("accepted", task="D1", job_id="4")
    book.event("task_note.failed", "4", n=1, reason="EMR session expired")  # retryable
    book.row("accepted", task="D2", job_id="5")
    book.event("task_note.failed", "5", n=2, reason="Task not found in EMR")  # not retryable
    book.ledger.finish_run("run-1", "aborted", {"stop_reason": "interrupted by SIGINT"})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("held", task="B1", run_id="run-2", ref_id=doubt)
    book.row("accepted", task="C2", job_id="7", run_id="run-2", submitted_at=RECENT)
    book.row("accepted", task="C3", job_id="8", run_id="run-2", submitted_at=RECENT)
    book.event("task_note.created", "8", n=3, task="C3")
    book.row("failed", task="C1", run_id="run-2")  # the same note failed again: one note
    book.ledger.finish_run("run-2", "finished", {})

    found = status_of(book, tmp_path)
    got = {k.kind: (k.count, k.stale, k.run_ids) for k in found.kinds}
    assert got == {
        "awaiting_outcome": (3, 1, ("run-1", "run-2")),  # A1 (stale), A2, C2 in run-2
        "ambiguous": (1, 0, ("run-1", "run-2")),  # B1 and the row held behind it
        "send_failed": (1, 0, ("run-1", "run-2")),  # C1; C2 and C3 were sent by run-2
        "failed_retryable": (1, 0, ("run-1",)),  # D1; D2's reason is not retryable
        "in_progress": (0, 0, ()),
        "not_read": (0, 0, ()),
    }
    assert found.exit_code == 1
    assert found.kind("awaiting_outcome").oldest_age_s == 24 * 3600
    assert found.kind("awaiting_outcome").settle == "tasknotes poll my.yaml"
    assert found.kind("send_failed").settle.startswith("tasknotes run my.yaml")
    # run-1 lists no redrive.csv (none written, or pruned): the text does not send the
    # reader to one, and names the source files
    retry = found.kind("failed_retryable")
    assert retry.redrive_files == ()
    assert "<redrive.csv>" not in retry.settle
    assert "source files" in retry.settle


def test_a_conflict_is_counted_ambiguous_and_open(book: Book, tmp_path: Path) -> None:
    """A sent row whose job has both task_note.created and task_note.failed (a conflict,
    shown ambiguous in report.html, as one whose event names another account's connection
    is) counts as ambiguous: status is open and exits 1, not "nothing open"."""
    book.row("accepted", task="E1", job_id="6", submitted_at=RECENT)
    book.event("task_note.created", "6", n=1, task="E1")
    book.event("task_note.failed", "6", n=2, reason="EMR session expired")
    book.ledger.finish_run("run-1", "finished", {})

    found = status_of(book, tmp_path)
    assert {k.kind: k.count for k in found.kinds if k.count} == {"ambiguous": 1}
    assert found.kind("ambiguous").run_ids == ("run-1",)
    assert found.exit_code == 1


def test_poll_is_not_offered_for_rows_another_configs_accounts_sent(
        book: Book, tmp_path: Path) -> None:
    """A run sent under an account this config does not name (another config sharing the
    state): its awaiting and ambiguous rows are counted, and their settle text says this
    config's poll cannot settle them (its token sees its own connection only), naming
    the run (newcomer LOW: it offered "tasknotes poll CONFIG", which polled nothing); a
    kind held by such runs alone does not offer this config's poll at all."""
    book.row("accepted", task="A1", job_id="1", submitted_at=RECENT)
    book.ledger.finish_run("run-1", "finished", {})
    book.ledger.start_run("run-2", "other_clinic", "fp", {})
    book.row("accepted", task="B1", job_id="2", run_id="run-2", submitted_at=RECENT)
    book.row("ambiguous", task="B2", run_id="run-2", submitted_at=RECENT)
    book.ledger.finish_run("run-2", "finished", {})

    found = status_of(book, tmp_path)
    awaiting, ambiguous = found.kind("awaiting_outcome"), found.kind("ambiguous")
    assert (awaiting.count, ambiguous.count) == (2, 1)
    assert awaiting.settle.startswith("tasknotes poll my.yaml")  # run-1's rows: this config's
    assert ("; not the rows of run(s) run-2, sent under accounts this config does not "
            "name: the poll of the config that sent them settles those") in awaiting.settle
    # ambiguous: run-2's rows only, none of them this config's to poll
    assert ambiguous.settle == ("not this config's: run(s) run-2 were sent under accounts it "
                                "does not name; the poll of the config that sent them "
                                "settles those")


def test_sent_accounts_counts_delivered_notes_per_account_label(book: Book, tmp_path: Path
                                                                ) -> None:
    """The labels the scan's formerly warning checks (plan.py): a run's account for its
    rows that name none, counting only rows that delivered their note (accepted with no
    failure, or created), but the labels it is told to ignore; the same on both backends."""
    book.row("accepted", task="A1", job_id="1")  # awaiting: delivered as far as we know
    book.row("accepted", task="A2", job_id="2")
    book.event("task_note.failed", "2", n=1, reason="Task not found in EMR")
    book.row("failed", task="A3")
    book.ledger.finish_run("run-1", "finished", {})
    book.ledger.start_run("run-2", "token:0123456789abcdef", "fp", {})
    book.row("accepted", task="B1", job_id="3", run_id="run-2")
    book.event("task_note.created", "3", n=2, task="B1")
    book.ledger.finish_run("run-2", "finished", {})
    status_of(book, tmp_path)  # mirrors the sink's events and matches them to the rows
    assert book.ledger.sent_accounts() == {ACCOUNT: 1, "token:0123456789abcdef": 1}
    # the labels the config names are left out (the scan warns of the others only)
    assert book.ledger.sent_accounts({ACCOUNT}) == {"token:0123456789abcdef": 1}
    assert book.ledger.sent_accounts({ACCOUNT, "token:0123456789abcdef"}) == {}


def test_send_failed_lists_the_rows_of_the_notes_it_counts(book: Book, tmp_path: Path
                                                            ) -> None:
    """A note left ambiguous by one run and unsent by a later one counts as ambiguous (it
    comes first): send_failed neither counts it nor lists its row (rows_total agrees)."""
    book.row("ambiguous", task="B1", submitted_at=OLD)
    book.ledger.finish_run("run-1", "crashed", {})
    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("pending", task="B1", run_id="run-2")  # the same note, not sent by run-2
    book.row("failed", task="C1", run_id="run-2")  # send_failed alone
    book.ledger.finish_run("run-2", "aborted", {})

    found = status_of(book, tmp_path)
    assert found.kind("ambiguous").count == 1
    send_failed = found.kind("send_failed").to_dict()
    assert (send_failed["count"], send_failed["rows_total"]) == (1, 1)
    assert [(r["run_id"], r["line"]) for r in send_failed["rows"]] == [("run-2", 4)]  # C1


def test_matching_counts_each_row_given_a_new_outcome_once(
        book: Book, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """"N rows have a new outcome" is rows: not the change counters the row triggers bump
    (SQLite's total_changes said 66 for 33 rows)."""
    for n in range(1, 4):
        book.row("accepted", task=f"A{n}", job_id=str(n))
        book.event("task_note.created", str(n), n=n, task=f"A{n}")
    book.row("accepted", task="A9", job_id="9")  # no event yet: no outcome
    book.ledger.finish_run("run-1", "finished", {})
    with caplog.at_level(logging.INFO, logger="pipeline.reconciliation"):
        status_of(book, tmp_path)  # learns the sink's events first
    said = [r.getMessage() for r in caplog.records if "new outcome" in r.getMessage()]
    assert said == ["3 rows have a new outcome"]


def test_the_json_shape_is_stable_and_holds_no_note_text(book: Book, tmp_path: Path) -> None:
    """The documented --json shape: field names and types, for a sensor or monitor."""
    book.row("accepted", task="A1", note="SECRET-NOTE-TEXT", job_id="1", submitted_at=OLD)
    book.ledger.finish_run("run-1", "finished", {})
    reports = tmp_path / "reports" / "run-1"
    reports.mkdir(parents=True)
    shape = status_of(book, tmp_path).to_dict()
    assert set(shape) == {"schema", "generated_at", "ledger", "stale_after_s", "open",
                          "exit_code", "open_total", "kinds"}
    assert (shape["schema"], shape["open"], shape["exit_code"], shape["open_total"]) == (
        1, True, 1, 1)
    assert shape["generated_at"] == "2026-06-16T12:00:00.000Z"
    if book.pg_url is None:
        assert shape["ledger"] == str(book.ledger.path)
    else:  # where the state is, never the password
        assert shape["ledger"].startswith("PostgreSQL 127.0.0.1:")
        assert str(urlsplit(book.pg_url).password) not in json.dumps(shape)
    for kind in shape["kinds"].values():
        assert set(kind) == {"count", "stale", "oldest_age_s", "run_ids", "redrive_files",
                             "settle", "rows", "rows_total"}
    assert shape["kinds"]["awaiting_outcome"] == {
        "count": 1, "stale": 1, "oldest_age_s": 86400, "run_ids": ["run-1"],
        "redrive_files": [], "settle": "tasknotes poll my.yaml", "rows": [], "rows_total": 0}
    assert "SECRET-NOTE-TEXT" not in json.dumps(shape)


def test_redrive_files_are_named_only_while_they_offer_the_open_rows(
        book: Book, tmp_path: Path) -> None:
    """send_failed lists a run's redrive.csv while it offers exactly the run's open rows
    (the fingerprint its report recorded); once another run sent one of them, the file
    would offer a delivered note: not listed until a rewrite records the new rows."""
    c1 = book.row("failed", task="C1")
    c2 = book.row("failed", task="C2")
    book.ledger.finish_run("run-1", "finished", {})
    redrive = tmp_path / "reports" / "run-1" / "redrive.csv"
    redrive.parent.mkdir(parents=True)
    redrive.write_text("emr_task_id,note\n")
    book.ledger.report_written("run-1", redrive_digest=redrive_digest([c1, c2]))
    found = status_of(book, tmp_path).kind("send_failed")
    assert (found.count, found.redrive_files) == (2, (str(redrive),))

    book.ledger.start_run("run-2", ACCOUNT, "fp", {})
    book.row("accepted", task="C1", job_id="9", run_id="run-2", submitted_at=RECENT)
    book.ledger.finish_run("run-2", "finished", {})
    found = status_of(book, tmp_path).kind("send_failed")
    assert (found.count, found.run_ids, found.redrive_files) == (1, ("run-1",), ())
    book.ledger.report_written("run-1", redrive_digest=redrive_digest([c2]))  # rewritten
    assert status_of(book, tmp_path).kind("send_failed").redrive_files == (str(redrive),)


def test_the_command_exits_0_1_2_and_prints_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 nothing open; 1 something open, with its count and the settling command; 2 for a
    bad config (one line naming the key)."""
    path = write_config(tmp_path)
    assert main(["status", str(path)]) == 0
    assert "nothing open" in capsys.readouterr().out
    book = Book(tmp_path / "state")
    book.row("accepted", task="A1", job_id="1", submitted_at=OLD)
    book.ledger.close()
    config = write_config(tmp_path, "c.yaml", state=state_of(book),
                          webhooks={"sink": str(book.sink)})
    assert main(["status", str(config)]) == 1
    out = capsys.readouterr().out
    assert "awaiting an outcome: 1 (1 stale, older than 900 s)" in out
    assert f"settle: tasknotes poll {config}" in out
    assert main(["status", str(config), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["kinds"]["awaiting_outcome"]["count"] == 1
    bad = write_config(tmp_path, "bad.yaml", report={"stale_after": 0})
    assert main(["status", str(bad)]) == 2
    assert "report.stale_after" in capsys.readouterr().err


def test_settle_texts_say_what_settles_in_a_sandbox_and_no_unknown_pid(
    book: Book, tmp_path: Path
) -> None:
    """With nothing running, in_progress's settle text names no "(pid ?)"; in a sandbox,
    awaiting and ambiguous rows are not sent to `poll` (which has nothing to ask there)."""
    book.row("accepted", task="A1", note="n1", job_id="1", submitted_at=OLD)
    book.row("ambiguous", task="A2", note="n2", submitted_at=OLD)
    book.ledger.finish_run("run-1", "finished", {})
    plain = status_of(book, tmp_path).to_dict()["kinds"]
    assert plain["in_progress"]["settle"] == "wait for the run to end"
    assert plain["awaiting_outcome"]["settle"] == "tasknotes poll my.yaml"
    sandbox = make_config(tmp_path, state=state_of(book),
                          webhooks={"sink": str(book.sink)}, sandbox={"enabled": True})
    kinds = ledger_status(sandbox, config_path="my.yaml", now=NOW).to_dict()["kinds"]
    assert (kinds["awaiting_outcome"]["count"], kinds["ambiguous"]["count"]) == (1, 1)
    for kind in ("awaiting_outcome", "ambiguous"):
        assert "poll" not in kinds[kind]["settle"].replace("nothing to poll", "")
        assert kinds[kind]["settle"].startswith("nothing will: ")
    assert "emulator that would deliver these outcomes ended with its run" in (
        kinds["awaiting_outcome"]["settle"])


def test_a_run_in_progress_alone_is_open_and_exits_1(book: Book, tmp_path: Path) -> None:
    """Nothing open but a live run's unsent rows: status is open (exit 1), in_progress only;
    the same ledger once the run has ended is not (exit 0)."""
    book.ledger.lock()  # a live process holds the ledger
    book.row("pending", task="P1")
    found = status_of(book, tmp_path)
    assert {k.kind: k.count for k in found.kinds if k.count} == {"in_progress": 1}
    assert (found.open, found.exit_code) == (True, 1)
    book.row("accepted", task="P1", run_id="run-1", job_id="1")
    book.event("task_note.created", "1", n=1, task="P1")
    book.ledger.finish_run("run-1", "finished", {})
    ended = status_of(book, tmp_path)
    assert (ended.open, ended.exit_code) == (False, 0)


def test_a_write_off_is_refused_while_a_run_holds_the_lock(
        book: Book, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``status --write-off`` while a run is sending (it holds the run lock): that run may
    be sending these very notes, so the write-off is refused, naming the holder, and writes
    off nothing (retest MEDIUM: it wrote off 174 rows as "never sent" that the run then
    delivered). Once the run has ended, it goes through."""
    book.row("failed", task="C1")
    book.ledger.finish_run("run-1", "finished", {})
    config = write_config(tmp_path, state=state_of(book), webhooks={"sink": str(book.sink)})
    sending = (Ledger(book.ledger.path) if book.pg_url is None
               else PgLedger(book.pg_url, ACCOUNT))
    sending.lock(holder="run run-2")
    try:
        assert main(["status", str(config), "--write-off", "run-1"]) == 2
        err = capsys.readouterr().err
        assert "run run-2" in err
        assert "it may be sending run run-1's notes; write off after it ends" in err
        assert book.ledger.frame("run-1")["written_off_at"].isna().all()
    finally:
        sending.close()
    wait_until(lambda: book.ledger.lock_holder() is None, timeout=10, what="the lock freed")
    assert main(["status", str(config), "--write-off", "run-1"]) == 0
    assert "1 unsent row written off" in capsys.readouterr().out
    # a run that crashed (left "running", no process holds its lock) is not "in progress"
    book.ledger.start_run("run-3", ACCOUNT, "fp", {})
    book.row("failed", task="C3", run_id="run-3")
    assert main(["status", str(config), "--write-off", "run-3"]) == 0
    assert "1 unsent row written off" in capsys.readouterr().out


def test_a_send_failed_row_no_input_holds_is_named_and_can_be_written_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row left send_failed whose redrive.csv is gone: status names its run, source file
    and line and says that only an input holding it settles it (not a bare `run`), or that
    --write-off closes it. Written off, it is recorded with the time: status exits 0, and
    its run's report keeps it send_failed ("never sent; written off by operator at ..."),
    with no redrive.csv offering it and nothing needing attention."""
    book = Book(tmp_path / "state")
    book.row("failed", task="C1")
    book.row("accepted", task="A1", job_id="1")
    book.event("task_note.created", "1", n=1, task="A1")
    book.ledger.finish_run("run-1", "finished", {})
    book.ledger.close()
    config = write_config(tmp_path, state=state_of(book),
                          webhooks={"sink": str(book.sink)})
    assert main(["status", str(config)]) == 1
    out = capsys.readouterr().out
    assert "row: run run-1, in.csv line 2" in out
    assert f"tasknotes run {config} --input FILE, with an input that holds these rows" in out
    assert f"tasknotes status {config} --write-off RUN_ID" in out
    assert "named below" not in out  # the rows are named above the settle line
    assert main(["status", str(config), "--write-off", ""]) == 2  # not a plain status
    assert "--write-off: the run id is empty" in capsys.readouterr().err
    assert main(["status", str(config), "--json"]) == 1
    send_failed = json.loads(capsys.readouterr().out)["kinds"]["send_failed"]
    assert (send_failed["rows"], send_failed["rows_total"]) == (
        [{"run_id": "run-1", "source_file": "in.csv", "line": 2}], 1)

    assert main(["status", str(config), "--write-off", "run-1"]) == 0
    out = capsys.readouterr().out
    assert "run run-1: 1 unsent row written off (not sent)" in out
    assert "1 of them written off by the operator, never sent" in out
    assert main(["status", str(config)]) == 0
    report = tmp_path / "reports" / "run-1"
    page = (report / "report.html").read_text()
    assert "every row ended well." not in page.replace("ended well, except", "")
    assert re.search(r"1 rows were never sent: written off by the operator at "
                     r"\d{4}-\d\d-\d\dT[\d:.]+Z", page)
    rows = {r["line"]: r for r in read_results(report)}
    assert rows["2"]["final_status"] == "send_failed"
    assert re.fullmatch(r"never sent; written off by operator at "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows["2"]["detail"])
    assert rows["3"]["final_status"] == "confirmed"
    summary = read_summary(report)
    assert (summary["written_off"], summary["needs_attention"], summary["exit_code_now"]) == (
        1, 0, 0)
    assert summary["final_status"]["send_failed"] == 1
    assert not (report / "redrive.csv").exists()
    assert main(["status", str(config), "--write-off", "run-1"]) == 0  # nothing left: a no-op
    assert "0 unsent rows written off" in capsys.readouterr().out
    assert main(["status", str(config), "--json", "--write-off", "run-1"]) == 0
    answer = json.loads(capsys.readouterr().out)  # JSON, as --json promises
    assert (answer["run_id"], answer["written_off"], answer["exit_code"]) == ("run-1", 0, 0)
    assert answer["reports"][0]["written_off"] == 1
    assert main(["status", str(config), "--write-off", "no-such-run"]) != 0
    assert "no run 'no-such-run'" in capsys.readouterr().err
