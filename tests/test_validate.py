"""Validation: every row valid, a skipped duplicate, or rejected with stable problem codes."""

from __future__ import annotations

import csv
import io
import re
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig, ValidationConfig
from pipeline.errors import InputError
from pipeline.source import CsvFile
from pipeline.validation import TEMPLATES, CheckedBatch, DuplicateIndex, Validator


def check(path: Path, input_: dict[str, object] | None = None,
          rules: dict[str, object] | None = None, *, extra: list[Path] = ()) -> list[CheckedBatch]:
    settings_ = InputConfig.model_validate(input_ or {})
    validator = Validator(settings_, ValidationConfig.model_validate(rules or {}))
    out = []
    for file_no, p in enumerate([path, *extra]):
        validator.name_file(file_no, p.name)
        with CsvFile(p, settings_, file_no=file_no) as f:
            out += [validator.check(b, f.header) for b in f.batches(size=4)]
    return out


def rows_of(batches: list[CheckedBatch]) -> list[tuple[int, str, str, str]]:
    """(line, task id, note, reasons) for every row, in order."""
    return [(b.lines[i], b.task_ids[i], b.notes[i], b.reasons(i))
            for b in batches for i in range(len(b))]


def test_each_problem_code_is_found_with_its_line(data: Path) -> None:
    """Each problem code is reported at the line of the row that has it."""
    rows = rows_of(check(data / "problems.csv", rules={"duplicates": "reject"}))
    reasons = {line: r for line, _, _, r in rows}
    assert reasons == {2: "missing-task-id", 3: "blank-note", 4: "bad-task-id",
                       5: "control-characters", 6: "", 7: "duplicate-row", 8: ""}


def test_problem_messages_come_from_one_template_per_code(data: Path) -> None:
    """Each problem's message is its code's template, filled in."""
    batches = check(data / "problems.csv", rules={"duplicates": "reject"})
    messages = {p.code: p.message for b in batches for ps in b.problems.values() for p in ps}
    assert messages["control-characters"] == (
        "the note contains control character U+0007 at position 5")
    assert messages["bad-task-id"] == (
        "the emr_task_id (7 characters) does not match validation.emr_task_id_pattern")
    assert messages["duplicate-row"] == "same emr_task_id and note as line 6"
    assert set(messages) <= set(TEMPLATES)


def test_task_ids_are_trimmed_and_notes_keep_inner_whitespace(data: Path) -> None:
    """Outer spaces go from both fields; the note's inner spaces stay as written."""
    rows = rows_of(check(data / "problems.csv"))
    assert (8, "TSK-7007", "outer spaces trimmed, inner  kept", "") in rows


def test_crlf_inside_a_note_becomes_lf(data: Path) -> None:
    """Cobalt shows \\n as a line break: CRLF inside a note is sent as \\n."""
    rows = rows_of(check(data / "multiline.csv"))
    assert rows[0][2] == "First line\nsecond line\nthird line"
    assert rows[2][2] == 'a note with "quotes", commas,\nand an LF inside'


def test_escaped_newlines_are_unescaped_only_when_asked(tmp_path: Path) -> None:
    """The two characters \\n stay as written unless input.unescape_newlines is set."""
    path = tmp_path / "esc.csv"
    path.write_text("emr_task_id,note\nT1,line one\\nline two\n")
    assert rows_of(check(path))[0][2] == "line one\\nline two"
    assert rows_of(check(path, {"unescape_newlines": True}))[0][2] == "line one\nline two"


def test_wrong_field_count_is_rejected_and_the_rest_read(data: Path) -> None:
    """A short row and a long row are rejected; rows after them are still read; blanks skipped."""
    batches = check(data / "shapes.csv")
    rows = rows_of(batches)
    assert [(line, reasons) for line, _, _, reasons in rows] == [
        (2, ""), (3, "wrong-field-count"), (4, "wrong-field-count"), (7, "")]
    messages = [p.message for b in batches for ps in b.problems.values() for p in ps]
    assert messages == ["expected 2 fields, found 1", "expected 2 fields, found 3"]


def test_rejected_rows_keep_their_cells_as_read(data: Path) -> None:
    """A rejected row carries its cells unchanged, for rejects.csv."""
    batches = check(data / "shapes.csv")
    cells = [b.cells[i] for b in batches for i in b.problems]
    assert cells == [["TSK-5002"], ["TSK-5003", "an unquoted", " comma splits this note"]]


def test_a_note_over_the_limit_is_rejected(tmp_path: Path) -> None:
    """note-too-long names the length and the limit."""
    path = tmp_path / "long.csv"
    path.write_text("emr_task_id,note\nT1," + "x" * 11 + "\nT2," + "x" * 10 + "\n")
    batches = check(path, rules={"max_note_chars": 10})
    problems = [p for b in batches for ps in b.problems.values() for p in ps]
    assert [(p.code, p.message) for p in problems] == [
        ("note-too-long", "the note has 11 characters; the limit is 10")]


def test_bad_encoding_rows_are_rejected_when_asked(data: Path) -> None:
    """With on_bad_encoding: reject, the undecodable row is bad-encoding; others pass."""
    rows = rows_of(check(data / "bad_utf8.csv", {"on_bad_encoding": "reject"}))
    assert [(line, reasons) for line, _, _, reasons in rows] == [
        (2, ""), (3, "bad-encoding"), (5, "")]


@pytest.mark.parametrize(
    ("policy", "reasons", "duplicates"),
    [
        pytest.param("skip", ["", ""], {1: (0, 2)}, id="skip"),
        pytest.param("reject", ["", "duplicate-row"], {1: (0, 2)}, id="reject"),
        pytest.param("allow", ["", ""], {}, id="allow"),
    ],
)
def test_duplicates_follow_the_policy(tmp_path: Path, policy: str, reasons: list[str],
                                      duplicates: dict[int, tuple[int, int]]) -> None:
    """Same task id and note twice: skipped, rejected or allowed, naming the first line."""
    path = tmp_path / "dup.csv"
    path.write_text("emr_task_id,note\nT1,same\nT1,  same  \nT1,different\n")
    batch = check(path, rules={"duplicates": policy})[0]
    assert [batch.reasons(i) for i in range(2)] == reasons
    assert batch.duplicate_of == duplicates
    assert len(batch.sendable()) == (3 if policy == "allow" else 2)


def test_duplicates_are_found_across_files_and_batches(tmp_path: Path) -> None:
    """A row repeating one from an earlier file (or batch) names that file and line."""
    first = tmp_path / "one.csv"
    second = tmp_path / "two.csv"
    first.write_text("emr_task_id,note\n" + "".join(f"T{i},n{i}\n" for i in range(10)))
    second.write_text("emr_task_id,note\nT9,n9\nT3,n3\nT3,other\n")
    batches = check(first, rules={"duplicates": "reject"}, extra=[second])
    messages = [(b.file_no, b.lines[i], p.message) for b in batches
                for i, ps in b.problems.items() for p in ps]
    assert messages == [(1, 2, "same emr_task_id and note as line 11 of one.csv"),
                        (1, 3, "same emr_task_id and note as line 5 of one.csv")]


@pytest.mark.parametrize(
    ("content", "line"),
    [
        pytest.param('emr_task_id,note,clinic\nT1,a,North\nT2,b,South"\n', 3, id="third-column"),
        pytest.param('emr_task_id,note\nT1,"first line\nsecond line"\nT2,ok\n'
                     'T3,lost opening\nquote"\n', 6, id="lost-opening-quote"),
        pytest.param('emr_task_id,note\nT1",a\n', 2, id="task-id"),
    ],
)
def test_an_unquoted_field_ending_with_a_quote_stops_the_read(
        tmp_path: Path, content: str, line: int) -> None:
    """A cell that ends with a quote it did not open, in any column, is a stray-quote
    finding: its opening quote was likely lost, so the row before may be cut short."""
    path = tmp_path / "in.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=rf"in.csv line {line}: stray-quote: an unquoted field"):
        check(path, {"passthrough": ["clinic"]} if "clinic" in content else None)


@pytest.mark.parametrize(
    "repeat",
    [
        pytest.param("emr_task_id,note", id="plain"),
        pytest.param(" emr_task_id , note ", id="spaces"),
        pytest.param("\ufeffemr_task_id,note", id="with-its-bom"),
        pytest.param('"emr_task_id","note"', id="quoted"),
    ],
)
def test_a_repeated_header_is_rejected(tmp_path: Path, repeat: str) -> None:
    """Two exports joined: the second header, however written, is repeated-header."""
    path = tmp_path / "joined.csv"
    path.write_text(f"emr_task_id,note\nT1,a\n{repeat}\nT2,b\n", encoding="utf-8")
    rows = rows_of(check(path))
    assert [(line, reasons) for line, _, _, reasons in rows] == [
        (2, ""), (3, "repeated-header"), (4, "")]


class _SmallRuns(DuplicateIndex):
    RUN_CAP = 128  # so that this test also fills runs that are then left alone


@pytest.mark.parametrize("index_type", [DuplicateIndex, _SmallRuns])
def test_duplicate_index_finds_first_occurrences(index_type: type[DuplicateIndex]) -> None:
    """Across many batches, each repeated hash points at its first occurrence only."""
    index = index_type()
    rng = np.random.default_rng(3)
    seen: dict[int, int] = {}
    ref = 0
    for _ in range(40):
        hashes = rng.integers(0, 500, size=64, dtype=np.int64)
        refs = np.arange(ref, ref + 64, dtype=np.int64)
        ref += 64
        earlier = index.check_and_add(hashes, refs)
        for h, r, e in zip(hashes.tolist(), refs.tolist(), earlier.tolist(), strict=True):
            assert e == seen.get(h, -1)
            seen.setdefault(h, r)
    assert len(index) == len(seen)


# -- the property: nothing lost, nothing invented -----------------------------------------------

CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")
cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(st.tuples(cell, cell), max_size=25))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_csv_writer_table_is_accepted_or_rejected_never_lost(
    rows: list[tuple[str, str]]
) -> None:
    """Whatever csv.writer writes, each row is accepted with its exact normalised text
    (CRLF and CR as LF, NFC, trimmed),
    skipped as a duplicate, or rejected with a code; no exception, no row missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["emr_task_id", "note"])
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        batches = check(path)
    seen = [(b, i) for b in batches for i in range(len(b))]
    blank = [r for r in rows if not r[0].strip() and not r[1].strip()]
    assert len(seen) == len(rows) - len(blank)
    kept = iter(r for r in rows if r not in blank)
    for batch, i in seen:
        task_id, note = next(kept)
        if i in batch.problems:
            assert batch.reasons(i)
            continue
        assert batch.task_ids[i] == unicodedata.normalize("NFC", task_id.strip())
        sent = note.replace("\r\n", "\n").replace("\r", "\n")
        assert batch.notes[i] == unicodedata.normalize("NFC", sent).strip()
        assert not CONTROL.search(sent), "a control character got through"
