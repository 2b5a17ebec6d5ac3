"""Input fidelity (issue 11): a note reaches Cobalt exactly as written, or not at all.

Each of the eight inputs of the issue runs through ``tasknotes run`` against the
emulator on loopback; each test asserts what the emulator stored, what was
rejected with which code, and the exit code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import re
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from helpers import (
    EmulatorThread,
    make_config,
    read_results,
    read_summary,
    run_pipeline,
    write_config,
)
from pipeline.errors import InputError
from pipeline.runner import RunOutcome
from pipeline.state import Ledger, NewRow, row_key
from pipeline.submit import Attempt


def tasknotes(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def server() -> Any:
    with EmulatorThread() as running:
        yield running


def run_file(tmp_path: Path, server: EmulatorThread, content: bytes | str, *,
             name: str = "input.csv", **input_: Any) -> RunOutcome:
    """Write ``content`` as the input file and run tasknotes on it against the emulator."""
    path = tmp_path / name
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    config = make_config(tmp_path, input={"path": str(path), **input_},
                         api={"base_url": server.url})
    return run_pipeline(config)


def stored_total(server: EmulatorThread) -> int:
    return sum(server.emulator.stored.values())


def rejects(outcome: RunOutcome) -> dict[int, str]:
    """line -> reasons, from rejects.csv."""
    assert outcome.report is not None
    path = outcome.report.directory / "rejects.csv"
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {int(r["line"]): r["reasons"] for r in csv.DictReader(fh)}


# -- 1, 2: structure is never guessed ----------------------------------------------------------


def test_1_an_unclosed_quote_stops_the_run_naming_the_line_it_opened_on(tmp_path: Path) -> None:
    """`T-100,"Pt reports mild pain` never closed: exit 2 before anything is sent, naming
    unclosed-quote and line 2; T-101 and T-102 are not folded into T-100's note."""
    (tmp_path / "input.csv").write_text(
        'emr_task_id,note\nT-100,"Pt reports mild pain\nT-101,Refill approved\n'
        "T-102,Call back Friday\n")
    config = write_config(tmp_path)
    done = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "input.csv line 2: unclosed-quote:" in done.stderr
    assert "nothing was sent" in done.stderr
    assert "Pt reports" not in done.stderr  # no note text in messages
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").rglob("*.csv"))


def test_1_an_unclosed_quote_with_many_rows_after_it_is_still_found_where_it_opened(
        tmp_path: Path, server: EmulatorThread) -> None:
    """400 rows after the stray quote, then a quoted note: still one finding at line 2,
    never one merged row rejected as note-too-long, and nothing stored."""
    before = stored_total(server)
    body = "".join(f"T-{i},Refill approved {i}\n" for i in range(101, 501))
    content = ('emr_task_id,note\nT-100,"Pt reports mild pain\n' + body
               + 'T-501,"Call back, Friday"\n')
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, content)
    assert caught.value.exit_code == 2
    assert "input.csv line 2: stray-quote:" in str(caught.value)
    assert "(line 403)" in str(caught.value)  # where the runaway field was taken to close
    assert stored_total(server) == before


def test_1_a_runaway_quote_that_closes_cleanly_is_caught_by_its_dangling_quote(
        tmp_path: Path, server: EmulatorThread) -> None:
    """A lost closing quote whose runaway field happens to end at a line break makes a
    well-formed merged row; the quote it leaves dangling stops the run before sending."""
    before = stored_total(server)
    content = ('emr_task_id,note\nT-100,"Pt reports mild pain\nT-101,Refill approved\n'
               'T-102,"\nsecond line"\n')
    with pytest.raises(InputError, match=r"line 5: stray-quote: an unquoted field ends"):
        run_file(tmp_path, server, content)
    assert stored_total(server) == before


def test_2_undoubled_quotes_inside_a_quoted_field_stop_the_run(
        tmp_path: Path, server: EmulatorThread) -> None:
    """`T-200,"Pt said "no pain" today"` is never sent as `Pt said no pain" today"`:
    stray-quote at line 2, exit 2, with every other finding's line named too."""
    before = stored_total(server)
    content = ('emr_task_id,note\nT-199,fine\nT-200,"Pt said "no pain" today"\n'
               'T-201,"ok"\nT-202,"She said "yes""\n')
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, content)
    message = str(caught.value)
    assert "input.csv line 3: stray-quote: text follows the closing quote" in message
    assert "also line 5 stray-quote" in message
    assert "no pain" not in message
    assert stored_total(server) == before


def test_quotes_inside_an_unquoted_field_are_literal_text(
        tmp_path: Path, server: EmulatorThread) -> None:
    """`He said "ok" then` and `5" wound`, unquoted, are sent exactly as written."""
    outcome = run_file(tmp_path, server,
                       'emr_task_id,note\nT-210,He said "ok" then\nT-211,5" wound\n')
    assert outcome.exit_code == 0
    assert server.stored("T-210", 'He said "ok" then') == 1
    assert server.stored("T-211", '5" wound') == 1


# -- 3: repeated header ------------------------------------------------------------------------


def test_3_a_repeated_header_is_rejected_never_sent(tmp_path: Path,
                                                    server: EmulatorThread) -> None:
    """Two exports concatenated: the second `TaskID,Note` line is repeated-header (line 3),
    its readable task id kept in results.csv; the data rows around it are sent."""
    outcome = run_file(tmp_path, server, "TaskID,Note\nT-1001,a\nTaskID,Note\nT-1002,b\n",
                       columns={"emr_task_id": "TaskID", "note": "Note"})
    assert outcome.exit_code == 1
    assert server.stored("TaskID", "Note") == 0
    assert server.stored("T-1001", "a") == 1
    assert server.stored("T-1002", "b") == 1
    assert rejects(outcome) == {3: "repeated-header"}
    assert outcome.report is not None
    row = next(r for r in read_results(outcome.report.directory) if r["line"] == "3")
    assert (row["final_status"], row["emr_task_id"]) == ("rejected_invalid", "TaskID")


# -- 4: one note, two Unicode forms -------------------------------------------------------------


def test_4_the_same_note_in_nfd_is_not_sent_again(tmp_path: Path,
                                                  server: EmulatorThread) -> None:
    """`café` with é precomposed is sent (as NFC); a later export with e + U+0301 finds it
    in the ledger (skipped_already_sent), and a file holding both sends it once."""
    nfc, nfd = "Pt likes café", unicodedata.normalize("NFD", "Pt likes café")
    assert nfc != nfd
    first = run_file(tmp_path, server, f"emr_task_id,note\nT-1100,{nfc}\n")
    assert first.exit_code == 0
    second = run_file(tmp_path, server, f"emr_task_id,note\nT-1100,{nfd}\n", name="later.csv")
    assert second.exit_code == 0
    assert second.report is not None
    [again] = read_results(second.report.directory)
    # Not sent again: the row follows the first run's send, whose outcome is still pending.
    assert again["final_status"] == "awaiting_outcome"
    assert f"sent in run {first.run_id}" in again["detail"]
    both = run_file(tmp_path, server, f"emr_task_id,note\nT-1101,{nfd}\nT-1101,{nfc}\n",
                    name="both.csv")
    assert both.report is not None
    assert [r["final_status"] for r in read_results(both.report.directory)][1] == (
        "skipped_duplicate")
    assert server.stored("T-1100", nfc) == 1
    assert server.stored("T-1101", nfc) == 1  # what is sent is NFC
    assert server.stored("T-1100", nfd) == server.stored("T-1101", nfd) == 0


def test_4_the_ledger_key_is_the_same_for_both_forms() -> None:
    """row_key compares task id and note in NFC, whoever calls it."""
    nfc = "Zoë’s café"
    nfd = unicodedata.normalize("NFD", nfc)
    assert row_key("acct", "T-1", nfd) == row_key("acct", "T-1", nfc)
    assert row_key("acct", "T-1", nfc) != row_key("acct", "T-1", nfc + ".")


def test_4_a_note_sent_in_nfd_before_nfc_keys_is_not_sent_again(
        tmp_path: Path, server: EmulatorThread) -> None:
    """A ledger row written by a version before NFC keys (key of the NFD text, accepted):
    the same NFD row now finds it, as skipped_already_sent, and nothing is stored."""
    nfd = unicodedata.normalize("NFD", "Pt likes crème brûlée")
    config = make_config(tmp_path, api={"base_url": server.url})
    config.state.ledger.parent.mkdir(parents=True)
    ledger = Ledger(config.state.ledger)
    ledger.start_run("old", "test_clinic", "fp", {})
    before_nfc = hashlib.sha256(f"test_clinic\x1fT-1150\x1f{nfd}".encode()).digest()
    ledger.add_rows("old", [NewRow(0, 2, "T-1150", before_nfc, "pending")])
    row_id = int(ledger.frame("old")["id"].max())
    ledger.apply([row_id], [])
    ledger.apply([], [Attempt(row_id, "accepted", 200, "tn_1", "41", None, None)])
    ledger.close()
    before = stored_total(server)
    (tmp_path / "input.csv").write_text(f"emr_task_id,note\nT-1150,{nfd}\n", encoding="utf-8")
    outcome = run_pipeline(config)
    assert outcome.report is not None
    assert [r["final_status"] for r in read_results(outcome.report.directory)] == [
        "skipped_already_sent"]
    assert stored_total(server) == before


# -- 5, 6: encodings ----------------------------------------------------------------------------


def test_5_utf8_declared_as_cp1252_stops_before_mojibake(tmp_path: Path,
                                                        server: EmulatorThread) -> None:
    """A UTF-8 file declared cp1252 is never sent as `cafÃ©`: exit 2 naming the first line
    with a multi-byte character and the override key; with the override it reads as told."""
    before = stored_total(server)
    content = "emr_task_id,note\nT-899,plain ascii\nT-900,Pt prefers café\n"
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, content, encoding="cp1252")
    assert caught.value.exit_code == 2
    assert ("input.csv line 3: input.encoding is cp1252, but this line holds bytes that form a "
            "multi-byte UTF-8 character") in str(caught.value)
    assert "input.force_encoding: true" in str(caught.value)
    assert stored_total(server) == before
    forced = run_file(tmp_path, server, content, encoding="cp1252", force_encoding=True)
    assert forced.exit_code == 0
    assert server.stored("T-900", "Pt prefers cafÃ©") == 1


def test_a_real_cp1252_export_is_still_read_as_cp1252(tmp_path: Path, server: EmulatorThread,
                                                     data: Path) -> None:
    """Bytes that are not valid UTF-8 are what cp1252 was declared for: sent as written."""
    outcome = run_file(tmp_path, server, (data / "excel_cp1252.csv").read_bytes(),
                       encoding="cp1252")
    assert outcome.exit_code == 0
    assert server.stored("TSK-1001", "Patient’s café visit rescheduled – see chart") == 1


def unicode_text(rows: list[tuple[str, str]], *, bom: bool = True, big_endian: bool = False
                 ) -> bytes:
    """Excel's "Unicode Text" export: UTF-16 with a byte-order mark, tabs, CRLF."""
    text = "".join(f"{a}\t{b}\r\n" for a, b in [("emr_task_id", "note"), *rows])
    codec = "utf-16-be" if big_endian else "utf-16-le"
    mark = ("\ufeff" if bom else "").encode(codec)
    return mark + text.encode(codec)


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
def test_6_excel_unicode_text_reads_with_delimiter_tab(
        tmp_path: Path, server: EmulatorThread, big_endian: bool) -> None:
    """UTF-16 with a FF FE (or FE FF) mark and tabs: read by its mark with delimiter: tab."""
    note = f"Zoë’s visit — 患者 {'be' if big_endian else 'le'}"
    outcome = run_file(tmp_path, server, unicode_text([("T-6001", note)], big_endian=big_endian),
                       delimiter="tab")
    assert outcome.exit_code == 0
    assert server.stored("T-6001", note) == 1


def test_6_utf16_is_accepted_when_declared(tmp_path: Path, server: EmulatorThread) -> None:
    """input.encoding: utf-16 is accepted (it used to be refused) and reads a marked file."""
    outcome = run_file(tmp_path, server, unicode_text([("T-6002", "déclaré")]),
                       encoding="utf-16", delimiter="tab")
    assert outcome.exit_code == 0
    assert server.stored("T-6002", "déclaré") == 1


def test_6_unicode_text_with_the_default_delimiter_suggests_tab(
        tmp_path: Path, server: EmulatorThread) -> None:
    """Without delimiter: tab the message says to set it (not to try cp1252)."""
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, unicode_text([("T-6003", "x")]))
    assert "set input.delimiter: tab" in str(caught.value)
    assert "cp1252" not in str(caught.value)


def test_6_unmarked_utf16_read_as_utf8_suggests_utf16(tmp_path: Path,
                                                      server: EmulatorThread) -> None:
    """UTF-16 without a mark, declared nothing: the message suggests utf-16, not cp1252."""
    with pytest.raises(InputError) as caught:
        run_file(tmp_path, server, unicode_text([("T-6004", "é")], bom=False))
    assert "input.encoding: utf-16" in str(caught.value)


# -- 7: a lone CR is a line break ---------------------------------------------------------------


def test_7_a_lone_cr_inside_a_quoted_note_is_a_line_break(tmp_path: Path,
                                                         server: EmulatorThread) -> None:
    """`L1,"first line<CR>second line"` is sent with \\n, like CRLF, not rejected."""
    outcome = run_file(tmp_path, server,
                       'emr_task_id,note\nL1,"first line\rsecond line"\n'
                       'L2,"first line\r\nsecond line"\n')
    assert outcome.exit_code == 0
    assert server.stored("L1", "first line\nsecond line") == 1
    assert server.stored("L2", "first line\nsecond line") == 1


# -- 8: rejected rows keep what was readable ----------------------------------------------------


def test_8_a_wrong_field_count_row_keeps_its_task_id_and_line(tmp_path: Path,
                                                             server: EmulatorThread) -> None:
    """An unquoted comma: wrong-field-count, with emr_task_id and line in results.csv."""
    outcome = run_file(tmp_path, server,
                       "emr_task_id,note\nT-5001,fine\nT-5003,an unquoted, comma splits this\n")
    assert outcome.exit_code == 1
    assert outcome.report is not None
    row = next(r for r in read_results(outcome.report.directory) if r["line"] == "3")
    assert (row["emr_task_id"], row["final_status"]) == ("T-5003", "rejected_invalid")
    assert "wrong-field-count" in row["error"]
    assert rejects(outcome) == {3: "wrong-field-count"}


# -- every physical record accounted for ---------------------------------------------------------


def test_every_physical_record_is_accounted_for_per_file(tmp_path: Path,
                                                        server: EmulatorThread) -> None:
    """summary.json states, per file, to_send + rejected + skipped + blank + beyond_limit ==
    records, with the counts of records the files were written with."""
    one = tmp_path / "one.csv"
    # 9 records after the header: 3 to send (one multi-line), 2 rejected, 1 duplicate,
    # 1 repeated header (rejected), 2 blank (an empty line and a line of commas).
    one.write_text('emr_task_id,note\nA1,x\n\nA2,"two\nlines"\nbad id,y\nA1,x\n'
                   "emr_task_id,note\n,\nA3,z\nA4\n")
    two = tmp_path / "two.csv"
    two.write_text("emr_task_id,note\nB1,x\nB2,y\n")
    config = make_config(tmp_path, input={"path": str(tmp_path / "*.csv")},
                         api={"base_url": server.url})
    outcome = run_pipeline(config)
    assert outcome.report is not None
    files = read_summary(outcome.report.directory)["input_records"]
    assert [(Path(f["path"]).name, f["records"], f["to_send"], f["rejected"], f["skipped"],
             f["blank"], f["accounted"]) for f in files] == [
        ("one.csv", 9, 3, 3, 1, 2, True), ("two.csv", 2, 2, 0, 0, 0, True)]
    results = read_results(outcome.report.directory)
    for f in files:
        mine = [r for r in results if r["source_file"] == f["path"]]
        assert len(mine) == f["records"] - f["blank"] - f["beyond_limit"]


def test_records_beyond_limit_are_counted_not_lost(tmp_path: Path,
                                                   server: EmulatorThread) -> None:
    """--limit 2 on 5 rows: 2 to send, 3 beyond the limit, still adding up to the records."""
    (tmp_path / "input.csv").write_text(
        "emr_task_id,note\n" + "".join(f"C{i},n{i}\n" for i in range(5)))
    config = make_config(tmp_path, api={"base_url": server.url})
    outcome = run_pipeline(config, limit=2)
    assert outcome.report is not None
    (counts,) = read_summary(outcome.report.directory)["input_records"]
    assert (counts["records"], counts["to_send"], counts["beyond_limit"],
            counts["accounted"]) == (5, 2, 3, True)


# -- the property: what the emulator stored is what was written, or nothing --------------------

_PIECES = (",", ";", "\t", '"', '""', "\r", "\n", "\r\n", " ", "a", "Z", "5", "é", "e\u0301",
           "u\u0308", "\u0301", "\ufeff", "’", "患")
_NOTE = st.lists(st.sampled_from(_PIECES), max_size=10).map("".join)
# (csv.writer arguments, input.delimiter)
_DIALECTS = {
    "excel": ({}, ","),
    "unix-quote-all": ({"dialect": "unix"}, ","),
    "nonnumeric-lf": ({"quoting": csv.QUOTE_NONNUMERIC, "lineterminator": "\n"}, ","),
    "semicolon-cr": ({"delimiter": ";", "lineterminator": "\r"}, ";"),
    "excel-tab": ({"dialect": "excel-tab"}, "tab"),
}
_ENCODINGS = {"utf-8": "utf-8", "utf-8 with BOM": "utf-8-sig", "utf-16 with BOM": "utf-16"}
_example = itertools.count()


def written(notes: list[str], dialect: str) -> tuple[list[tuple[str, str]], str, list[int]]:
    """Rows with unique task ids, the CSV text csv.writer makes of them in ``dialect``, and
    the offset where each record after the header starts."""
    n = next(_example)
    rows = [(f"P{n}-{i}", note) for i, note in enumerate(notes)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, **_DIALECTS[dialect][0])
    writer.writerow(["emr_task_id", "note"])
    starts = []
    for row in rows:
        starts.append(buffer.tell())
        writer.writerow(row)
    return rows, buffer.getvalue(), [*starts, buffer.tell()]


def folded(note: str, dialect: str) -> bool:
    """The README's suspicious-line-in-quoted-field rule: a line of the note (after a line
    break) starts with a task id holding a letter and a digit, then the delimiter."""
    delimiter = {"tab": "\t"}.get(_DIALECTS[dialect][1], _DIALECTS[dialect][1])
    return any(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", token := part.split(
        delimiter, 1)[0]) and re.search("[a-zA-Z]", token) and re.search("[0-9]", token)
               for part in re.split("\r\n|\r|\n", note)[1:] if delimiter in part)


def expected(note: str) -> str:
    """The documented normalisation: CRLF and CR as LF, NFC, trimmed."""
    return unicodedata.normalize("NFC", note.replace("\r\n", "\n").replace("\r", "\n")).strip()


def run_text(server: EmulatorThread, text: str, encoding: str, dialect: str
             ) -> tuple[RunOutcome | None, list[dict[str, str]], dict[str, Any]]:
    """Run tasknotes on ``text``; (outcome, results.csv rows, summary), or None if it stopped
    with an InputError (exit 2)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.csv"
        path.write_bytes(text.encode(_ENCODINGS[encoding]))
        config = make_config(Path(tmp), input={"path": str(path),
                                               "delimiter": _DIALECTS[dialect][1]},
                             api={"base_url": server.url})
        try:
            outcome = run_pipeline(config)
        except InputError as exc:
            stopped = exc
        else:
            stopped = None
        if stopped is not None:
            assert stopped.exit_code == 2
            return None, [], {}
        assert outcome.report is not None
        return (outcome, read_results(outcome.report.directory),
                read_summary(outcome.report.directory))


def assert_stored_only_source_rows(server: EmulatorThread, rows: list[tuple[str, str]],
                                   before: int) -> int:
    """Every note the emulator stored during the run is a source row's note, for that row's
    task, once; returns how many were stored."""
    counts = [server.stored(task, expected(note)) for task, note in rows]
    assert all(c <= 1 for c in counts)
    assert stored_total(server) - before == sum(counts)
    return sum(counts)


@given(notes=st.lists(_NOTE, min_size=1, max_size=6), dialect=st.sampled_from(list(_DIALECTS)),
       encoding=st.sampled_from(list(_ENCODINGS)))
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
def test_what_csv_writer_wrote_is_what_cobalt_stores(server: EmulatorThread, notes: list[str],
                                                   dialect: str, encoding: str) -> None:
    """Notes with commas, quotes, CR, LF, CRLF, NFD text and BOMs, written by csv.writer in
    several dialects: the emulator stores each one exactly as written (after the documented
    normalisation), or it is rejected with a code; every record is accounted for."""
    rows, text, _ = written(notes, dialect)
    before = stored_total(server)
    outcome, results, summary = run_text(server, text, encoding, dialect)
    assert outcome is not None, "a file csv.writer wrote was refused"
    sendable = [(t, n) for t, n in rows if expected(n) and not folded(n, dialect)]
    assert assert_stored_only_source_rows(server, rows, before) == len(sendable)
    assert [r["emr_task_id"] for r in results] == [t for t, _ in rows]
    for result, (_, note) in zip(results, rows, strict=True):
        assert (result["final_status"] == "rejected_invalid") == (
            not expected(note) or folded(note, dialect))
    (counts,) = summary["input_records"]
    assert counts["accounted"]
    assert counts["records"] == len(rows)


@given(notes=st.lists(_NOTE, min_size=1, max_size=6), dialect=st.sampled_from(list(_DIALECTS)),
       encoding=st.sampled_from(list(_ENCODINGS)), damage=st.sampled_from(["quote", "header"]),
       where=st.integers(min_value=0))
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
def test_a_damaged_file_never_stores_an_altered_note(
        server: EmulatorThread, notes: list[str], dialect: str, encoding: str, damage: str,
        where: int) -> None:
    """The same files with a quote dropped or the header line repeated between records:
    the run stops (exit 2, nothing stored), or every stored note is its source row's
    note and every physical record is accounted for."""
    rows, text, starts = written(notes, dialect)
    if damage == "quote":
        quotes = [i for i, c in enumerate(text) if c == '"']
        assume(quotes)
        cut = quotes[where % len(quotes)]
        text = text[:cut] + text[cut + 1:]
    else:
        cut = starts[where % len(starts)]
        text = text[:cut] + text[:starts[0]] + text[cut:]
    before = stored_total(server)
    outcome, results, summary = run_text(server, text, encoding, dialect)
    event(f"{damage}: {'stopped' if outcome is None else 'ran'}")
    if outcome is None:
        assert stored_total(server) == before
        return
    assert_stored_only_source_rows(server, rows, before)
    (counts,) = summary["input_records"]
    assert counts["accounted"]
    assert len(results) == counts["records"] - counts["blank"]
    if damage == "header":
        assert {t for t, _ in rows} <= {r["emr_task_id"] for r in results}
        assert [r["error"].split(":")[0] for r in results
                if r["emr_task_id"] == "emr_task_id"] == ["repeated-header"]
