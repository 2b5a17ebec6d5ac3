"""Untrusted text never carries a note out (attack review of issues 12 + 13).

- an API error that quotes the note re-encoded (JSON-escaped, URL- or HTML-encoded, NFD,
  re-cased) is withheld, keeping the status and the code;
- a webhook's ``failure_reason`` is redacted against the row's note, read back from the
  input, or withheld (reason codes kept) when the note cannot be read back;
- results.csv has no raw line break in a cell, so a spreadsheet neither splits a row nor
  runs a formula hidden after one;
- an input error never echoes a cell.

Each end-to-end test looks for its canaries in every file the run leaves, in a dump of
the ledger, and on stdout/stderr. Cobalt is ``FakeCobalt`` (test_shared_files.py) on
uvicorn, 127.0.0.1.
"""

from __future__ import annotations

import csv
import html
import json
import re
import sqlite3
import subprocess
import sys
import unicodedata
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
from test_shared_files import FakeCobalt, append_events, envelope

from helpers import ThreadedServer, read_results, read_summary, write_config, write_csv
from pipeline.config import load_config
from pipeline.reasons import ReasonRedactor, codes_of, safe_emr_note_id
from pipeline.reconciliation import ingest
from pipeline.redaction import MESSAGE_WITHHELD, canonical, redact, safe_id
from pipeline.report import FORMULA_STARTS, one_line, shareable
from pipeline.state import Ledger

WITHHELD = f"HTTP 400 request-rejected: {MESSAGE_WITHHELD}"


def canary_holders(root: Path, canaries: tuple[str, ...], *,
                   besides: tuple[str, ...] = ("config.yaml",)) -> set[str]:
    """Names of the files under ``root`` (not the inputs) holding a canary in any case,
    the ledger read as a SQL dump (so text in any table or page is found)."""
    found = set()
    for file in root.rglob("*"):
        if not file.is_file() or file.name in besides or (file.suffix in (".csv", ".tsv") and (
                file.parent == root)):
            continue
        data = file.read_bytes().decode("utf-8", "replace").casefold()
        if file.name.endswith(".sqlite"):
            with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as db:
                data += "\n".join(db.iterdump()).casefold()
        if any(c.casefold() in data for c in canaries):
            found.add(str(file.relative_to(root)))
    return found


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "-vv", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


# -- 4. re-encoded quotes of the note in an API error --------------------------------------

MULTILINE = "Pt CANARYJS\nBP ok\nHIV+\nf/u 2w"  # no line holds 16 letters and digits
SPACED = 'Patient CANARYURL said "HIV & hep C" <urgent>'
ACCENTED = "Résumé CANARYNFD: patient reports café-au-lait spots"
SHORT = "hiv pos canaryb"


@pytest.mark.parametrize(("text", "note"), [
    (json.dumps({"emr_task_id": "T1", "note": MULTILINE}), MULTILINE),  # the body echoed
    (json.dumps(json.dumps({"note": MULTILINE})), MULTILINE),  # ... escaped twice
    ("Invalid note: " + urllib.parse.quote(SPACED), SPACED),
    ("Invalid note: " + urllib.parse.quote_plus(SPACED), SPACED),
    ("Invalid note: " + unicodedata.normalize("NFD", ACCENTED), ACCENTED),
    ("Invalid note: " + html.escape(SPACED), SPACED),
    ("Invalid note: " + html.escape(SPACED).replace("CANARY", "&#67;&#x41;NARY"), SPACED),
    ("Invalid note: HIV POS CANARYB", SHORT),  # short, upper-cased
    ("Invalid note: HIV-POS-CANARYB!", SHORT),
    ("Invalid note: hivposcanaryb", SHORT),
    ("Invalid note: " + ACCENTED.upper().replace("É", "E"), ACCENTED),  # accents dropped
])
def test_a_re_encoded_quote_of_the_note_withholds_the_message(text: str, note: str) -> None:
    assert redact(text, [note]) == MESSAGE_WITHHELD


@pytest.mark.parametrize(("text", "note"), [
    ("Invalid note: HIV POS CANARYB.", "hiv po"),  # "po" inside a longer word is not it
    ("Unexpected fields in request body: subject", "subj"),
    ("Task T-9 is closed", "Patient CANARY called about the refill"),
    ("Missing required field: emr_task_id", "n"),
])
def test_text_that_does_not_quote_the_note_is_kept(text: str, note: str) -> None:
    assert redact(text, [note]) == text


def test_canonical_drops_escapes_case_accents_and_punctuation() -> None:
    assert canonical('Pt\\nBP \\"ok\\" %C3%A9t%C3%A9 &amp; R\u00e9sum\u0301e') == [
        "pt", "bp", "ok", "ete", "resume"]


def test_an_api_error_quoting_the_note_re_encoded_reaches_no_file_ledger_or_console(
        tmp_path: Path) -> None:
    """Each row's 400 quotes its own note in another encoding: results.csv's error keeps
    the status and the code, withheld; the canaries are nowhere but in the input."""
    answers = {
        "T1": (400, lambda note: {"success": False, "message": json.dumps(
            {"emr_task_id": "T1", "note": note})}),
        "T2": (400, lambda note: {"success": False,
                                  "message": "Invalid note: " + urllib.parse.quote(note)}),
        "T3": (400, lambda note: {"success": False, "message": "Invalid note: "
                                  + unicodedata.normalize("NFD", note)}),
        "T4": (400, lambda note: {"success": False,
                                  "message": "Invalid note: " + html.escape(note)}),
        "T5": (400, lambda note: {"success": False,
                                  "message": "Invalid note: " + note.upper()}),
    }
    notes = {"T1": MULTILINE, "T2": SPACED, "T3": ACCENTED, "T4": SPACED + " twice",
             "T5": SHORT}
    write_csv(tmp_path / "input.csv", list(notes.items()))
    with ThreadedServer(FakeCobalt(answers).app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url}, submit={"concurrency": 1})
        done = run_cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    canaries = ("CANARYJS", "CANARYURL", "CANARYNFD", "CANARYB", "cafe")
    for output in (done.stdout, done.stderr):
        assert not any(c.casefold() in output.casefold() for c in canaries)
    assert canary_holders(tmp_path, canaries) == set()
    report = next((tmp_path / "reports").iterdir())
    errors = {r["emr_task_id"]: r["error"] for r in read_results(report)}
    assert errors == dict.fromkeys(notes, WITHHELD)
    assert read_summary(report)["final_status"]["rejected_by_api"] == 5


# -- 3. line breaks inside a cell of results.csv ---------------------------------------------

CALC = "=cmd|' /C calc'!A0"


@pytest.mark.parametrize(("cell", "shown"), [
    ("Northside\r" + CALC, "Northside " + CALC),
    ("a\nb\r\nc\x0bd\x85e\u2028f\tg", "a b  c d e f g"),
    ("\r" + CALC, "' " + CALC),
    ("\n@SUM(1)", "' @SUM(1)"),
    ("  +1", "  +1"),  # a plain number, spaces or not
    ("  +A1", "'  +A1"),
])
def test_a_shared_cell_is_one_line_and_shown_as_text(cell: str, shown: str) -> None:
    table = pd.DataFrame({"c": [cell], "line": [2]})
    assert shareable(table)["c"].tolist() == [shown]
    assert one_line(cell).count("\n") == one_line(cell).count("\r") == 0


def test_results_csv_has_no_line_break_in_a_cell_so_no_row_splits(tmp_path: Path) -> None:
    """A passthrough cell with a bare CR before a formula, a webhook emr_note_id with CRLF
    before one, and a multi-line failure_reason: csv.reader sees the header and one row per
    input row, every row as wide as the header, and no cell starts like a formula."""
    write_csv(tmp_path / "input.csv", [
        ["T1", "first note", "Northside\r" + CALC],
        ["T2", "second note", "line one\nline two"],
        ["T3", "third note", "plain"],
    ], header=("emr_task_id", "note", "clinic"))
    fake = FakeCobalt()
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url},
                              input={"path": str(tmp_path / "input.csv"),
                                     "passthrough": ["clinic"]})
        assert run_cli("run", str(config), "--no-progress", cwd=tmp_path).returncode == 0
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        envelope("evt-1", "created", fake.jobs["T1"], emr_note_id="n-1\r\n@SUM(1)"),
        envelope("evt-2", "failed", fake.jobs["T2"],
                 failure_reason="Could not append\r=HYPERLINK(\"http://x\",\"y\")\nretry"),
    ])
    done = run_cli("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    report = next((tmp_path / "reports").iterdir())
    with (report / "results.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.reader(fh))
    assert [len(r) for r in table] == [len(table[0])] * 4
    assert [r[table[0].index("emr_task_id")] for r in table[1:]] == ["T1", "T2", "T3"]
    rows = {r["emr_task_id"]: r for r in read_results(report)}
    assert rows["T1"]["clinic"] == "Northside " + CALC
    assert rows["T1"]["emr_note_id"].startswith("withheld-")  # not id-like: withheld
    assert rows["T2"]["clinic"] == "line one line two"
    assert rows["T2"]["failure_reason"] == (
        'Could not append =HYPERLINK("http://x","y") retry')
    raw = (report / "results.csv").read_bytes()
    assert raw.count(b"\n") == 4
    assert b"\r" not in raw
    for cells in table:
        for cell in cells:
            assert not cell.lstrip(" ").startswith(FORMULA_STARTS), cell


# -- 5. input errors never echo a cell ---------------------------------------------------------


def test_a_file_without_a_header_stops_without_printing_its_first_row(tmp_path: Path) -> None:
    """The first row is data: the one-line error names the expected columns and counts the
    fields, and quotes no cell (the note would reach a cron log)."""
    (tmp_path / "nohdr.csv").write_text("t-1,Patient CANARYHDR has HIV and hep C,Northside\n")
    config = write_config(tmp_path)
    done = run_cli("run", str(config), "--input", str(tmp_path / "nohdr.csv"), "--no-progress",
                   cwd=tmp_path)
    assert done.returncode == 2
    assert "CANARYHDR" not in done.stdout + done.stderr
    assert "Northside" not in done.stdout + done.stderr
    assert ("column 'emr_task_id' (input.columns.emr_task_id) and 'note' (input.columns.note) "
            "not found; the first row has 3 non-empty fields (a file without a header row?"
            ) in done.stderr
    assert "Traceback" not in done.stderr
    assert canary_holders(tmp_path, ("CANARYHDR",), besides=("config.yaml", "nohdr.csv")) == set()


def test_a_close_header_name_is_suggested_but_a_note_never_is(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("Task-ID,Patient CANARYNT note text\nT1,x\n")
    done = run_cli("run", str(write_config(tmp_path)), "--input", str(tmp_path / "in.csv"),
                   cwd=tmp_path)
    assert done.returncode == 2
    assert "field 1 'Task-ID' looks like 'emr_task_id'" in done.stderr
    assert "CANARYNT" not in done.stdout + done.stderr


def test_a_broken_multi_line_note_keeps_its_second_line_out_of_the_ledger_and_reports(
        tmp_path: Path) -> None:
    """An unquoted line break splits a note: its second line is a record of its own, whose
    "task id" is note text. It is rejected with the task id left out of the ledger,
    results.csv and the console; rejects.csv (0600) keeps the line as written."""
    (tmp_path / "input.csv").write_text(
        "emr_task_id,note\nT1,first line\nsecond line CANARYML has HIV,x,y\n"
        "CANARYBAD has HIV,note\nT2,fine\n")
    with ThreadedServer(FakeCobalt().app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url})
        done = run_cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "CANARY" not in done.stdout + done.stderr
    assert canary_holders(tmp_path, ("CANARY",), besides=("config.yaml", "rejects.csv")) == set()
    report = next((tmp_path / "reports").iterdir())
    rows = {int(r["line"]): r for r in read_results(report)}
    assert [(rows[n]["emr_task_id"], rows[n]["final_status"]) for n in (3, 4)] == [
        ("", "rejected_invalid"), ("", "rejected_invalid")]
    assert rows[4]["error"] == (
        "bad-task-id: the emr_task_id (17 characters) does not match "
        "validation.emr_task_id_pattern")
    assert "CANARYML" in (report / "rejects.csv").read_text()


# -- 1. a webhook's failure_reason quoting the note ------------------------------------------

SINK = "webhooks.jsonl"  # the sink file (0600): Cobalt's events as they came, by design
PHI = "CANARYPHI Patient has HIV and hep C diagnosis"
LOUD = "CANARYUP follow-up for the hepatitis B result"


def _failed(fake: FakeCobalt, task: str, n: int, reason: str, code: str) -> dict[str, object]:
    return envelope(f"evt-{n}", "failed", fake.jobs[task], failure_reason=reason,
                     task_note_id=f"{int(fake.jobs[task]):024x}",
                     reasons=[{"code": code, "description": reason}])


def _sent(tmp_path: Path, rows: list[list[str]]) -> tuple[FakeCobalt, Path]:
    write_csv(tmp_path / "input.csv", rows)
    fake = FakeCobalt()
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url})
        done = run_cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return fake, config


def test_a_failure_reason_quoting_the_note_is_redacted_against_the_row_read_back(
        tmp_path: Path) -> None:
    """Cobalt accepts, then a signed task_note.failed says `Could not append note "<note>":
    task is closed` (also upper-cased, also in reasons[].description). The note is read
    back from the input and cut out; a reason that does not quote it is kept."""
    fake, config = _sent(tmp_path, [["fq-1", PHI], ["fq-2", LOUD], ["fq-3", "refill due"]])
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        _failed(fake, "fq-1", 1, f'Could not append note "{PHI}": task is closed',
                "task_closed"),
        _failed(fake, "fq-2", 2, f"COULD NOT APPEND NOTE {LOUD.upper()}", "task_closed"),
        _failed(fake, "fq-3", 3, "Task is locked by another user", "task_locked"),
    ])
    done = run_cli("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "CANARY" not in (done.stdout + done.stderr).upper()
    assert canary_holders(tmp_path, ("CANARYPHI", "CANARYUP", "hepatitis", "HIV and hep"),
                          besides=("config.yaml", "redrive.csv", SINK)) == set()
    report = next((tmp_path / "reports").iterdir())
    reasons = {r["emr_task_id"]: r["failure_reason"] for r in read_results(report)}
    assert reasons == {"fq-1": 'Could not append note "[redacted]": task is closed',
                       "fq-2": "COULD NOT APPEND NOTE [redacted]",
                       "fq-3": "Task is locked by another user"}
    assert sorted((r["reason"], r["count"]) for r in read_summary(report)["failure_reasons"]
                  ) == sorted((reason, 1) for reason in reasons.values())


def test_a_failure_reason_is_withheld_when_the_note_cannot_be_read_back(
        tmp_path: Path) -> None:
    """The input moved after the run: the reason text cannot be checked, so only the reason
    code is kept, and a warning says so (without the text)."""
    fake, config = _sent(tmp_path, [["fq-1", PHI], ["fq-2", "second note"]])
    (tmp_path / "input.csv").rename(tmp_path / "moved.csv")
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        _failed(fake, "fq-1", 1, f"Could not append {PHI}", "task_closed"),
        _failed(fake, "fq-2", 2, "Task is closed", "task_closed"),
    ])
    done = run_cli("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "2 failure reason(s) withheld (reason codes kept)" in done.stderr
    assert "CANARY" not in done.stdout + done.stderr
    assert canary_holders(tmp_path, ("CANARYPHI", "HIV and hep"),
                          besides=("config.yaml", "moved.csv", SINK)) == set()
    report = next((tmp_path / "reports").iterdir())
    withheld = "task_closed [reason withheld: the note was not read back to check it]"
    assert [r["failure_reason"] for r in read_results(report)] == [withheld, withheld]
    assert read_summary(report)["failure_reasons"] == [{"reason": withheld, "count": 2}]


def test_a_re_encoded_quote_in_a_failure_reason_is_withheld_with_its_codes(
        tmp_path: Path) -> None:
    fake, config = _sent(tmp_path, [["fq-1", MULTILINE]])
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        _failed(fake, "fq-1", 1, "Could not append " + json.dumps(MULTILINE), "rpa_error"),
        {**envelope("evt-9", "failed", "no-such-job", failure_reason=f"job for {PHI}"),
         "data": {"failure_reason": f"job for {PHI}", "reasons": [
             {"code": "bad code with spaces", "description": "x"}, {"code": "orphan"}]}},
    ])
    done = run_cli("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert canary_holders(tmp_path, ("CANARYJS", "CANARYPHI"),
                          besides=("config.yaml", SINK)) == set()
    report = next((tmp_path / "reports").iterdir())
    assert [r["failure_reason"] for r in read_results(report)] == [
        "rpa_error [reason withheld: it quoted the note]"]
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", readonly=True)
    try:
        (orphan,) = [e for e in ledger.events() if e.event_id == "evt-9"]
    finally:
        ledger.close()
    assert (orphan.failure_reason, orphan.reason_codes) == (
        "orphan [reason withheld: the note was not read back to check it]", "orphan")


def test_an_upstream_id_is_kept_when_id_like_else_withheld() -> None:
    """Ids from Cobalt (task_note_id, job_id, emr_note_id, an event's id) are kept as given
    when they look like ids; text (a space, other punctuation, longer than 128) is withheld
    the same way every time (a digest), so nothing of it shows and duplicates still match."""
    assert safe_emr_note_id("emr-123_A.9", PHI) == "emr-123_A.9"
    assert safe_emr_note_id(f"appended: {PHI}", PHI) == safe_id(f"appended: {PHI}")
    assert safe_emr_note_id(None, PHI) is None
    for kept in ("12345", "65f0c0ffee0123456789abcd", "evt_AbC123", "5b2e-4c1a:9.x", "a" * 128):
        assert safe_id(kept) == kept
    for text in (PHI, "CANARYPHI", "a" * 129, "n-1\r\n@SUM(1)", "x/y", "note\u00e9", ""):
        if text == "CANARYPHI":  # one word is indistinguishable from an id: kept (documented)
            assert safe_id(text) == text
            continue
        shown = safe_id(text)
        assert shown is not None
        assert re.fullmatch(r"withheld-[0-9a-f]{16}", shown), shown
        assert shown == safe_id(text)
    assert safe_id(12345) == "12345"
    assert codes_of([{"code": "task_closed"}, {"code": "has space"}, {"code": "=1+2"},
                     "task_locked", {"description": "x"}]) == ["task_closed"]


def test_an_ingest_reads_each_input_file_back_once_however_many_batches(
        tmp_path: Path) -> None:
    """Six failed events read two at a time (batches of 2): the input is read back once,
    for all of them, and every reason is redacted."""
    rows = [[f"fq-{i}", f"{PHI} number {i}"] for i in range(6)]
    fake, config_path = _sent(tmp_path, rows)
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        _failed(fake, f"fq-{i}", i, f"Could not append {PHI} number {i}", "task_closed")
        for i in range(6)])
    config = load_config(config_path)
    ledger = Ledger(config.state.ledger)
    try:
        redactor = ReasonRedactor(ledger, config.input)
        assert ingest(ledger, config.webhooks.sink, config.api.account_id(),
                      redactor=redactor, batch_size=2) == 6
        stored = [e.failure_reason for e in ledger.events()]
    finally:
        ledger.close()
    assert redactor.files_read == 1
    assert stored == ["Could not append [redacted]"] * 6


def test_ids_from_cobalt_that_are_not_ids_reach_no_file_or_ledger(tmp_path: Path) -> None:
    """A 200 whose task_note_id is the note is not believed (the row is ambiguous, its id
    kept nowhere); an event whose id, task_note_id and emr_note_id carry the note still
    settles its row by job_id, with those ids withheld: the note is in no report file and
    nowhere in the ledger."""
    write_csv(tmp_path / "input.csv", [["T1", PHI], ["T2", LOUD]])
    fake = FakeCobalt(answers={"T2": (200, lambda note: {
        "success": True, "message": "ok", "task_note_id": note, "job_id": 77})})
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, api={"base_url": api.url})
        done = run_cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        envelope(f"evt {PHI}", "created", fake.jobs["T1"], task_note_id=PHI,
                 emr_note_id=f"{PHI} (appended)", emr_task_id="T1", note=PHI)])
    done = run_cli("reconcile", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    report = next((tmp_path / "reports").iterdir())
    rows = {r["emr_task_id"]: r for r in read_results(report)}
    assert rows["T1"]["final_status"] == "confirmed"
    for column in ("event_id", "emr_note_id"):
        assert rows["T1"][column].startswith("withheld-"), column
    assert rows["T2"]["final_status"] == "ambiguous"
    assert rows["T2"]["task_note_id"] == ""
    assert rows["T2"]["job_id"] == ""
    for path in report.iterdir():
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "CANARY" not in text, path.name
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    try:
        dumped = "\n".join(db.iterdump())
    finally:
        db.close()
    assert "CANARY" not in dumped
    assert "CANARY" not in done.stdout + done.stderr


def test_id_shaped_ids_that_show_the_events_note_are_withheld_in_the_mirror(
        tmp_path: Path) -> None:
    """Ids of the right shape that spell the event's own note out (its words joined by
    digits and separators, 16 of its letters and digits) are withheld in the ledger's
    mirror, each of the four; the same ids beside another note are kept as given, and a
    failed event (no note of its own) keeps them too: the shape rule alone applies."""
    note = "Patient has HIV diagnosis, dose 1200 mg at 08:00 14:00"
    ids = {"event_id": "evt_Patient1has2HIV", "job_id": "x1hiv-x2diagnosis",
           "task_note_id": "1200mgat08001400", "emr_note_id": "emr7Patient-7-has"}
    sink = tmp_path / "webhooks.jsonl"

    def event(n: int, kind: str, event_note: str | None) -> dict[str, object]:
        data: dict[str, object] = {"task_note_id": ids["task_note_id"] + f"-{n}",
                                   "emr_note_id": ids["emr_note_id"] + f"-{n}",
                                   "emr_task_id": "T1"}
        if event_note is not None:
            data["note"] = event_note
        return envelope(f"{ids['event_id']}-{n}", kind, f"{ids['job_id']}-{n}", **data)

    append_events(sink, [event(1, "created", note),
                         event(2, "created", "refill due next week"),
                         event(3, "failed", None)])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ingest(ledger, sink, "acct") == 3
        stored = {e.line: e for e in ledger.events()}
    finally:
        ledger.close()
    first, second, third = (stored[k] for k in sorted(stored))
    for kept in (second, third):
        assert kept.event_id.startswith(ids["event_id"])
        assert (kept.job_id or "").startswith(ids["job_id"])
        assert (kept.task_note_id or "").startswith(ids["task_note_id"])
    assert (second.emr_note_id or "").startswith(ids["emr_note_id"])
    for value in (first.event_id, first.job_id, first.task_note_id, first.emr_note_id):
        assert re.fullmatch(r"withheld-[0-9a-f]{16}", value or ""), value
