"""Input fidelity, second pass: the inputs a newcomer/attacker review found still
altered, folded, lost or crashing, each run through ``tasknotes run`` against the
emulator on loopback. Each test asserts exactly what the emulator stored (every
key it stored during the run), the reject codes and the exit code.
"""

from __future__ import annotations

import codecs
import csv
import logging
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    EmulatorThread,
    make_config,
    read_results,
    read_summary,
    run_pipeline,
    write_config,
)
from pipeline.config import load_config
from pipeline.emulator import note_key
from pipeline.errors import InputError
from pipeline.open_items import ledger_status
from pipeline.reconciliation import Reconciler
from pipeline.report import write_report
from pipeline.runner import RunOutcome
from pipeline.state import Ledger


@pytest.fixture(scope="module")
def server() -> Any:
    with EmulatorThread() as running:
        yield running


def run_file(tmp_path: Path, server: EmulatorThread, content: bytes, *,
             name: str = "input.csv", limit: int | None = None, **input_: Any
             ) -> tuple[RunOutcome, Counter[str]]:
    """Run tasknotes on ``content``; the outcome and what the emulator stored meanwhile."""
    path = tmp_path / name
    path.write_bytes(content)
    config = make_config(tmp_path, input={"path": str(path), **input_},
                         api={"base_url": server.url})
    before = Counter(server.emulator.stored)
    outcome = run_pipeline(config, limit=limit)
    return outcome, Counter(server.emulator.stored) - before


def refused(tmp_path: Path, server: EmulatorThread, content: bytes, **kw: Any) -> str:
    """Run, expecting exit 2 before anything is stored; the one-line message."""
    before = Counter(server.emulator.stored)
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, content, **kw)
    assert caught.value.exit_code == 2
    assert Counter(server.emulator.stored) == before  # nothing sent
    message = str(caught.value)
    assert "\n" not in message
    return message


def sent(*rows: tuple[str, str]) -> Counter[str]:
    return Counter(note_key(task, note) for task, note in rows)


def rejects_of(outcome: RunOutcome, encoding: str = "utf-8-sig") -> dict[int, str]:
    assert outcome.report is not None
    path = outcome.report.directory / "rejects.csv"
    with path.open(newline="", encoding=encoding) as fh:
        return {int(r["line"]): r["reasons"] for r in csv.DictReader(fh)}


def shared_text(outcome: RunOutcome, ledger: Path) -> str:
    """Everything in the shared reports and the ledger, as text."""
    assert outcome.report is not None
    parts = [(outcome.report.directory / n).read_text(encoding="utf-8")
             for n in ("results.csv", "summary.json", "report.html")]
    with sqlite3.connect(ledger) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            parts += [repr(r) for r in db.execute(f"SELECT * FROM {table}")]
    return "\n".join(parts)


# -- 1: rows folded into a quoted field ------------------------------------------------------


def test_1_a_row_folded_into_a_quoted_field_is_rejected_not_sent(
        tmp_path: Path, server: EmulatorThread) -> None:
    """Valid CSV, but line 3 inside T2's quoted note starts `T3,`: the broken-quote fold.
    T2's record is rejected as suspicious-line-in-quoted-field; T4 is sent; exit 1."""
    outcome, stored = run_file(
        tmp_path, server, b'emr_task_id,note\r\nT2,"Pt quote: I fell\r\nT3,wound 5"\r\nT4,ok\r\n')
    assert stored == sent(("T4", "ok"))
    assert outcome.exit_code == 1
    assert rejects_of(outcome) == {2: "suspicious-line-in-quoted-field"}
    assert outcome.report is not None
    summary = read_summary(outcome.report.directory)
    assert summary["input_records"][0]["accounted"] is True
    assert "line 3, inside a quoted field" in read_results(outcome.report.directory)[0]["error"]


def test_1_real_multi_line_notes_are_not_flagged(tmp_path: Path, server: EmulatorThread) -> None:
    """Lines of a note that start with a word, a date or a time and a comma are text."""
    note = "Seen today.\nPlan, continue meds\n2024-05-01, labs\n12:30, called back\nT-x, none"
    outcome, stored = run_file(tmp_path, server,
                               f'emr_task_id,note\nT5,"{note}"\n'.encode())
    assert outcome.exit_code == 0
    assert stored == sent(("T5", note))


# -- 2: stray quote hidden by whitespace -----------------------------------------------------


def test_2_a_quote_before_trailing_whitespace_is_still_a_stray_quote(
        tmp_path: Path, server: EmulatorThread) -> None:
    """` "Pt said ""fine"" today" ` (a quoted field with spaces around it) and `abc" <tab>`
    are stray-quote findings: exit 2, nothing sent, never CSV escaping in the chart."""
    message = refused(tmp_path, server,
                      b'emr_task_id,note\r\nT2, "Pt said ""fine"" today" \r\nT4,abc" \t\r\n')
    assert "input.csv line 2: stray-quote:" in message
    assert "also line 3 stray-quote" in message
    assert "fine" not in message


# -- 3: UTF-8 mixed into a code-page file ----------------------------------------------------


def test_3_utf8_anywhere_in_a_cp1252_file_stops_the_run(tmp_path: Path,
                                                        server: EmulatorThread) -> None:
    """A real cp1252 byte on line 2 does not excuse the UTF-8 `é` on line 3: exit 2 naming
    line 3; nothing is sent as `CafÃ©`."""
    message = refused(tmp_path, server,
                      b"emr_task_id,note\r\nT1,Caf\xe9 cp1252\r\nT2,Caf\xc3\xa9 utf8\r\n",
                      encoding="cp1252")
    assert "input.csv line 3: input.encoding is cp1252, but this line holds bytes" in message
    assert "input.force_encoding" in message


def test_3_with_limit_the_utf8_row_is_still_refused(tmp_path: Path,
                                                    server: EmulatorThread) -> None:
    """--limit 1: the UTF-8 row at line 2 is the one to send, a cp1252 byte comes later."""
    message = refused(tmp_path, server,
                      b"emr_task_id,note\r\nT1,Caf\xc3\xa9\r\nT2,x\r\nT3,Caf\xe9\r\n",
                      encoding="cp1252", limit=1)
    assert "input.csv line 2: input.encoding is cp1252" in message


# -- 4, 10: the copy in rejects.csv ----------------------------------------------------------


@pytest.mark.parametrize("codec", ["utf-8", "utf-16-le"])
def test_4_a_bom_file_declared_cp1252_writes_rejects_in_its_own_encoding(
        tmp_path: Path, server: EmulatorThread, codec: str) -> None:
    """The byte-order mark decides the encoding, for reading and for rejects.csv: no crash,
    exit 1, the good row sent, the bad record copied byte for byte (mark included)."""
    text = "\ufeffemr_task_id,note\r\nT1,Café 日本 🙂,extra\r\nT2,ok 日本\r\n"
    outcome, stored = run_file(tmp_path, server, text.encode(codec), encoding="cp1252")
    assert stored == sent(("T2", "ok 日本"))
    assert outcome.exit_code == 1
    assert outcome.report is not None
    raw = (outcome.report.directory / "rejects.csv").read_bytes()
    assert raw == ("\ufeffsource_file,line,reasons,emr_task_id,note\r\n"
                   f"{tmp_path / 'input.csv'},2,wrong-field-count,T1,Café 日本 🙂,extra\r\n"
                   ).encode(codec)


def test_10_rejects_csv_holds_each_record_as_read(tmp_path: Path,
                                                  server: EmulatorThread) -> None:
    """Quotes, spacing and line breaks of a rejected record are kept (no re-quoting, no
    padding); fed back, rejects.csv gets fresh source_file,line,reasons, and again."""
    body = ('emr_task_id,note\n'
            'T1,"a",x\n'
            'T2,5" wound,x\n'
            '\x01\n'
            'T4,"two\r\nlines",x\n'
            'T5,fine\n')
    outcome, stored = run_file(tmp_path, server, body.encode())
    assert stored == sent(("T5", "fine"))
    assert outcome.report is not None
    first = outcome.report.directory / "rejects.csv"
    name = tmp_path / "input.csv"
    assert first.read_bytes().decode() == (
        "source_file,line,reasons,emr_task_id,note\r\n"
        f'{name},2,wrong-field-count,T1,"a",x\n'
        f'{name},3,wrong-field-count,T2,5" wound,x\n'
        f"{name},4,wrong-field-count,\x01\n"
        f'{name},5,wrong-field-count,T4,"two\r\nlines",x\n')
    again, _ = run_file(tmp_path, server, first.read_bytes(), name="fed.csv")
    assert again.report is not None
    second = (again.report.directory / "rejects.csv").read_bytes().decode()
    fed = tmp_path / "fed.csv"
    assert second.splitlines(keepends=True)[:2] == [
        "source_file,line,reasons,emr_task_id,note\r\n",
        f'{fed},2,wrong-field-count,T1,"a",x\n']
    third, _ = run_file(tmp_path, server, second.encode(), name="fed2.csv")
    assert third.exit_code == 1  # read again: no "names column twice"


def test_10_a_bom_inside_the_file_is_never_a_task_id(tmp_path: Path,
                                                     server: EmulatorThread) -> None:
    """Two UTF-8 exports joined leave a BOM mid-file: the row is rejected (bad-task-id) and
    results.csv shows no task id for it, just its line."""
    outcome, stored = run_file(tmp_path, server,
                               "emr_task_id,note\nT1,a\n\ufeffT2,b\n".encode())
    assert stored == sent(("T1", "a"))
    assert rejects_of(outcome) == {3: "bad-task-id"}
    assert outcome.report is not None
    row = read_results(outcome.report.directory)[1]
    assert (row["line"], row["emr_task_id"]) == ("3", "")


# -- 5: a rejected row's task-id cell may be note text --------------------------------------


def test_5_note_text_in_a_task_id_cell_stays_out_of_shared_files(
        tmp_path: Path, server: EmulatorThread) -> None:
    """An unquoted multi-line note: its continuation lines are rejected, their first cell
    (note text) appears in no shared report, not in the ledger, not in any error text."""
    content = (b"emr_task_id,note\nT1,first line of note\nSECRETPHI patient has HIV\n"
               b"SECRETC: diabetic,x\nT2,ok\n")
    outcome, stored = run_file(tmp_path, server, content)
    assert stored == sent(("T1", "first line of note"), ("T2", "ok"))
    assert outcome.exit_code == 1
    assert rejects_of(outcome) == {3: "wrong-field-count", 4: "bad-task-id"}
    assert outcome.report is not None
    rows = read_results(outcome.report.directory)
    assert [(r["line"], r["emr_task_id"]) for r in rows[1:3]] == [("3", ""), ("4", "")]
    text = shared_text(outcome, tmp_path / "state" / "ledger.sqlite")
    assert "SECRET" not in text
    assert "diabetic" not in text


# -- 7, 9: UTF-16 without a mark, and with a stray byte --------------------------------------


@pytest.mark.parametrize(("codec", "advice"), [("utf-16-le", "utf-16-le"),
                                               ("utf-16-be", "utf-16-be")])
def test_7_utf16_declared_without_a_bom_is_one_line(tmp_path: Path, server: EmulatorThread,
                                                    codec: str, advice: str) -> None:
    """No traceback: exit 2, and the message names the byte order to declare."""
    message = refused(tmp_path, server, "emr_task_id\tnote\r\nT1\tx\r\n".encode(codec),
                      encoding="utf-16", delimiter="tab")
    assert f"set input.encoding: {advice}" in message
    assert "byte-order mark" in message


def test_7_from_the_command_line_there_is_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "input.csv").write_bytes("emr_task_id\tnote\r\nT1\tx\r\n".encode("utf-16-le"))
    config = write_config(tmp_path, input={"encoding": "utf-16", "delimiter": "tab"})
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "utf-16-le" in done.stderr


def test_9_a_stray_byte_after_utf16_names_its_line_and_byte(
        tmp_path: Path, server: EmulatorThread) -> None:
    """A Unix tool's `\\n` after a UTF-16 file: the line it is on (3), the byte (0a), and no
    advice to set the encoding that is already set."""
    content = codecs.BOM_UTF16_LE + "emr_task_id\tnote\r\nT1\tx\r\n".encode("utf-16-le") + b"\n"
    message = refused(tmp_path, server, content, delimiter="tab")
    assert "input.csv line 3: bytes 0a are not valid utf-16-le" in message
    assert "set input.encoding" not in message


# -- 8: a repeated header in another case or order -------------------------------------------


@pytest.mark.parametrize("repeat", ["EMR_TASK_ID,NOTE", "note,emr_task_id", "Note , Emr_Task_Id"])
def test_8_a_repeated_header_in_any_case_or_order_is_not_sent(
        tmp_path: Path, server: EmulatorThread, repeat: str) -> None:
    outcome, stored = run_file(tmp_path, server,
                               f"emr_task_id,note\nT1,a\n{repeat}\nT2,b\n".encode())
    assert stored == sent(("T1", "a"), ("T2", "b"))
    assert outcome.exit_code == 1
    assert rejects_of(outcome) == {3: "repeated-header"}


# -- 11: a long field is not an unclosed quote -----------------------------------------------


def test_11_a_closed_field_over_the_limit_is_field_too_long(tmp_path: Path,
                                                             server: EmulatorThread) -> None:
    big = "x" * (16 * 1024 * 1024 + 10)
    message = refused(tmp_path, server, f'emr_task_id,note\nT1,ok\nT2,"{big}"\n'.encode())
    assert "input.csv line 3: field-too-long:" in message
    assert "unclosed-quote" not in message


# -- newcomer confusions ---------------------------------------------------------------------


def test_findings_are_listed_from_the_first_line(tmp_path: Path, server: EmulatorThread) -> None:
    """A quote-end finding (found when its batch is validated) on line 2 leads the message,
    before a quote error on line 4 that the reader met first."""
    message = refused(tmp_path, server, b'emr_task_id,note\nT1,abc"\nT2,ok\nT3,"x"y\n')
    assert "input.csv line 2: stray-quote:" in message
    assert "also line 4 stray-quote" in message


def test_the_bom_warning_is_given_once_per_file(tmp_path: Path, server: EmulatorThread,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    run_file(tmp_path, server, "\ufeffemr_task_id,note\nT1,bom once\n".encode(),
             name="bom_once.csv", encoding="cp1252")
    assert sum("byte-order mark" in r.getMessage() for r in caplog.records) == 1


def test_4_redrive_csv_is_written_in_the_effective_encoding(tmp_path: Path) -> None:
    """redrive.csv is a copy too: a UTF-8 BOM file declared cp1252 gets a UTF-8 redrive.csv
    with the mark, its note as written (no crash, no `\\uXXXX`)."""
    from pipeline.emulator import Faults  # noqa: PLC0415 - only this test needs it

    with EmulatorThread(faults=Faults(rate_503=1, retry_after_s=0,
                                      only_tasks=frozenset({"T3"}))) as api:
        outcome, _ = run_file(tmp_path, api,
                              "\ufeffemr_task_id,note\r\nT3,gone 日本\r\n".encode(),
                              encoding="cp1252")
    assert outcome.report is not None
    redrive = (outcome.report.directory / "redrive.csv").read_bytes()
    assert redrive == "\ufeffemr_task_id,note\r\nT3,gone 日本\r\n".encode()


def test_a_refused_input_leaves_no_unsent_rows_and_records_exit_2(
        tmp_path: Path, server: EmulatorThread) -> None:
    """A run refused for its input (exit 2, nothing sent) forgets the rows it had scanned:
    status never offers them as send_failed, and once the file is fixed the rerun sends both
    notes and nothing of the refused run stays open but its unread input, which the fixed
    run reads. The refused run's record keeps the process's exit code, 2."""

    refused(tmp_path, server, b'emr_task_id,note\r\nT2,"Pt said "fine" today"\r\nT4,abc\r\n')
    config_path = write_config(tmp_path, input={"path": str(tmp_path / "input.csv")},
                               api={"base_url": server.url})
    config = load_config(config_path, needs=("api",))
    status = ledger_status(config).to_dict()
    assert [kind for kind, k in status["kinds"].items() if k["count"]] == ["not_read"]
    fixed, stored = run_file(tmp_path, server,
                             b'emr_task_id,note\r\nT2,"Pt said ""fine"" today"\r\nT4,abc\r\n')
    assert fixed.exit_code == 0
    assert stored == sent(("T2", 'Pt said "fine" today'), ("T4", "abc"))
    after = ledger_status(config).to_dict()["kinds"]
    # Only the fixed run's own two notes stay open, awaiting their outcomes (no webhooks here).
    assert {kind: k["count"] for kind, k in after.items() if k["count"]} == {
        "awaiting_outcome": 2}
    ledger = Ledger(config.state.ledger)
    try:
        (first,) = [r for r in ledger.run_ids() if r != fixed.run_id]
        written = write_report(Reconciler.of(ledger, config).run(first), config.report,
                               input_settings=config.input)
    finally:
        ledger.close()
    summary = read_summary(written.directory)
    assert summary["exit_code"] == 2
    assert summary["rows"] == 0  # forgotten: none offered as send_failed
    assert summary["final_status"].get("send_failed", 0) == 0


@pytest.mark.parametrize("line", [b" T3,wound 5", b"T3 ,wound 5", b"\tT3,wound 5"])
def test_1_a_folded_row_is_found_whatever_space_stands_around_its_task_id(
        tmp_path: Path, server: EmulatorThread, line: bytes) -> None:
    """A task id is read trimmed, so a folded line is recognised trimmed too: T2 is not sent
    with T3's row inside its note."""
    outcome, stored = run_file(tmp_path, server,
                               b'emr_task_id,note\r\nT2,"Pt quote: I fell\r\n' + line
                               + b'"\r\nT4,ok\r\n')
    assert outcome.exit_code == 1
    assert stored == sent(("T4", "ok"))
    assert rejects_of(outcome) == {2: "suspicious-line-in-quoted-field"}


def test_3_c1_control_characters_from_a_misdeclared_code_page_are_never_sent(
        tmp_path: Path, server: EmulatorThread) -> None:
    """A cp1252 export declared latin-1: its smart quotes, dash and euro read as C1 control
    characters (U+0080-U+009F), which no note holds: the row is rejected, not sent altered."""
    outcome, stored = run_file(
        tmp_path, server,
        b"emr_task_id,note\r\nT1,Pt said \x93fine\x94 \x96 ok \x80 5\r\nT2,plain\r\n",
        encoding="latin-1")
    assert outcome.exit_code == 1
    assert stored == sent(("T2", "plain"))
    assert rejects_of(outcome, "latin-1") == {2: "control-characters"}  # the input's encoding
