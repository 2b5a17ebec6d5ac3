"""Reading CSV files: every cell as written, physical line numbers, clear errors."""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import source
from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.source import CsvFile, expand_inputs


def read(path: Path, **settings: object) -> tuple[list[int], list[list[str]], list[int]]:
    """All records of a file: (start lines, cells, indices of careful records)."""
    lines: list[int] = []
    rows: list[list[str]] = []
    careful: list[int] = []
    with CsvFile(path, InputConfig.model_validate(settings)) as f:
        for batch in f.batches(size=3):  # small batches: the boundaries get exercised
            careful += [len(rows) + i for i in batch.careful]
            lines += batch.lines
            rows += batch.rows
    return lines, rows, careful


def test_cells_stay_text_exactly_as_written(data: Path) -> None:
    """NA, null, None, N/A, #N/A, nan, TRUE and leading zeros are kept as the text they are."""
    _, rows, _ = read(data / "literals.csv")
    assert rows == [["007", "NA"], ["0001", "null"], ["TSK-6003", "None"], ["TSK-6004", "N/A"],
                    ["TSK-6005", "0001"], ["TSK-6006", "#N/A"], ["TSK-6007", "nan"],
                    ["TSK-6008", "TRUE"]]


def test_line_numbers_are_physical_after_multiline_notes(data: Path) -> None:
    """A record's line is where it starts in the file, counting lines inside quoted notes."""
    lines, rows, careful = read(data / "multiline.csv")
    assert lines == [2, 5, 7, 9]
    assert [r[0] for r in rows] == ["TSK-4001", "TSK-4002", "TSK-4003", "TSK-4004"]
    assert rows[0][1] == "First line\r\nsecond line\r\nthird line"
    assert careful == [0, 2]  # the multi-line records get the slow checks


def test_line_numbers_hold_across_block_boundaries(tmp_path: Path) -> None:
    """Past the 1 MiB blocks the reader decodes at once, lines and records still line up."""
    path = tmp_path / "big.csv"
    expected_lines, line = [], 2
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(["emr_task_id", "note"])
        for i in range(12000):
            note = f"note {i} " + "x" * 200 + ("\nsecond line" if i % 7 == 0 else "")
            writer.writerow([f"T{i}", note])
            expected_lines.append(line)
            line += 2 if i % 7 == 0 else 1
    assert path.stat().st_size > 2 * 2**20  # more than two of the 1 MiB reads
    lines, rows, _ = read(path)
    assert lines == expected_lines
    assert [r[0] for r in rows] == [f"T{i}" for i in range(12000)]


def test_control_bytes_are_found_in_any_block(tmp_path: Path) -> None:
    """A row with a control character gets the slow checks wherever it sits in a large file.

    (The rows sharing its 1 MiB block do too; the rows of clean blocks do not.)
    """
    path = tmp_path / "ctrl.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("emr_task_id,note\n")
        for i in range(12000):
            fh.write(f"T{i},{'y' * 150}{chr(0x0b) if i == 11000 else ''}\n")
    lines, rows, careful = read(path)
    flagged = {rows[i][0] for i in careful}
    assert "T11000" in flagged
    assert "T0" not in flagged
    assert len(flagged) < 8000
    assert lines[rows.index(next(r for r in rows if r[0] == "T11000"))] == 11002


def test_bom_and_spaces_around_header_names_are_ignored(data: Path) -> None:
    """A UTF-8 BOM and spaces around header names do not stop the columns being found."""
    with CsvFile(data / "bom_utf8.csv", InputConfig()) as f:
        assert f.bom == "utf-8"
        assert (f.header.task_col, f.header.note_col) == (0, 1)
        rows = [r for b in f.batches() for r in b.rows]
    assert rows[0] == ["TSK-2001", "Called back — no answer"]


def test_cp1252_excel_export_reads_with_its_encoding(data: Path) -> None:
    """An Excel 'CSV (Windows)' export reads right when input.encoding says cp1252."""
    _, rows, _ = read(data / "excel_cp1252.csv", encoding="cp1252")
    assert rows[0][1] == "Patient’s café visit rescheduled – see chart"
    assert rows[1][1] == 'Résumé of call: "doing better", will call back'


@pytest.mark.parametrize(
    ("name", "delimiter"),
    [pytest.param("semicolon.csv", ";", id="semicolon"), pytest.param("tab.tsv", "tab", id="tab")],
)
def test_other_delimiters(data: Path, name: str, delimiter: str) -> None:
    """input.delimiter reads ; and tab separated files (commas inside stay in the note)."""
    _, rows, _ = read(data / name, delimiter=delimiter)
    assert rows[0][1] in ("Rückruf erledigt, Termin am 12.03.", "Tabs separate, commas, stay")


def test_undecodable_bytes_stop_with_the_physical_line(data: Path) -> None:
    """By default a byte that is not UTF-8 stops the read, naming the line it is on."""
    with pytest.raises(InputError) as caught:
        read(data / "bad_utf8.csv")
    message = str(caught.value)
    assert "bad_utf8.csv line 4: bytes 92 are not valid utf-8" in message
    assert "input.encoding" in message


def test_undecodable_bytes_can_be_set_aside(data: Path) -> None:
    """With on_bad_encoding: reject, the row keeps its bytes (as surrogates) and reading goes on."""
    _, rows, careful = read(data / "bad_utf8.csv", on_bad_encoding="reject")
    assert [r[0] for r in rows] == ["TSK-8001", "TSK-8002", "TSK-8003"]
    assert "\udc92" in rows[1][1]
    assert 1 in careful


def test_an_empty_file_is_an_input_error(data: Path) -> None:
    """A file with no header is refused, not read as zero rows."""
    with pytest.raises(InputError, match="the file is empty"):
        read(data / "empty.csv")


def test_a_header_only_file_has_no_rows(data: Path) -> None:
    """Only a header: zero records, no error."""
    assert read(data / "header_only.csv") == ([], [], [])


def test_missing_columns_are_named_with_what_was_found(data: Path) -> None:
    """A header without the configured columns stops, naming both sides."""
    with pytest.raises(InputError) as caught:
        read(data / "wrong_header.csv")
    message = str(caught.value)
    assert "'emr_task_id' (input.columns.emr_task_id)" in message
    assert "'note' (input.columns.note)" in message
    assert "the first row has 2 non-empty fields; field 1 'Task ID' looks like 'emr_task_id'" in (
        message)


def test_columns_can_be_mapped(data: Path) -> None:
    """input.columns maps the file's own header names to the two fields."""
    with CsvFile(data / "wrong_header.csv",
                 InputConfig.model_validate({"columns": {"emr_task_id": "Task ID",
                                                         "note": "Notes"}})) as f:
        assert (f.header.task_col, f.header.note_col) == (0, 1)


def test_a_duplicate_header_name_is_an_error(data: Path) -> None:
    """Two columns with one name make the mapping ambiguous: refused."""
    with pytest.raises(InputError, match=r"names column 'note' twice \(fields \d and \d\)"):
        read(data / "duplicate_header.csv")


def test_an_unclosed_quote_is_reported_at_its_line(tmp_path: Path) -> None:
    """A quote that never closes would swallow the rest of the file: the read stops, naming
    the line where the field opened, instead of making one row of several."""
    path = tmp_path / "runaway.csv"
    path.write_text("emr_task_id,note\nT1,fine\nT2,\"never closed\n" + "more\n" * 3)
    with pytest.raises(InputError) as caught:
        read(path)
    assert "runaway.csv line 3: unclosed-quote:" in str(caught.value)


def test_inputs_expand_globs_in_order(tmp_path: Path) -> None:
    """A glob names its files in sorted order; a glob matching nothing is an error."""
    for name in ("b.csv", "a.csv", "c.txt"):
        (tmp_path / name).write_text("emr_task_id,note\n")
    assert [p.name for p in expand_inputs([str(tmp_path / "*.csv")])] == ["a.csv", "b.csv"]
    with pytest.raises(InputError, match="no input file matches"):
        expand_inputs([str(tmp_path / "*.xlsx")])
    with pytest.raises(InputError, match="input file not found"):
        expand_inputs([str(tmp_path / "missing.csv")])
    with pytest.raises(InputError, match="named twice"):
        expand_inputs([str(tmp_path / "a.csv"), str(tmp_path / "a.csv")])


def test_checksum_covers_every_byte(data: Path) -> None:
    """The sha256 after a full pass is the file's own, BOM included."""
    path = data / "bom_utf8.csv"
    with CsvFile(path, InputConfig()) as f:
        for _ in f.batches():
            pass
        assert f.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f.size == path.stat().st_size


def test_a_unicode_line_separator_inside_a_note_is_not_a_line_break(tmp_path: Path) -> None:
    """U+2028, U+0085, VT and FF are text to the csv tokenizer, not line ends: the rows and
    their line numbers stay as written."""
    path = tmp_path / "seps.csv"
    path.write_text("emr_task_id,note\nT1,a\u2028b\nT2,c\x85d\nT3,e\x0bf\nT4,g\x0ch\n",
                    encoding="utf-8", newline="")
    lines, rows, _ = read(path)
    assert lines == [2, 3, 4, 5]
    assert [r[1] for r in rows] == ["a\u2028b", "c\x85d", "e\x0bf", "g\x0ch"]


def test_a_lone_cr_ends_a_line_and_lives_inside_a_quoted_field(tmp_path: Path) -> None:
    """Old Mac files end lines with CR alone; inside quotes a CR is part of the note."""
    path = tmp_path / "mac.csv"
    path.write_bytes(b'emr_task_id,note\rT1,one\rT2,"two\rlines"\rT3,three\r')
    lines, rows, careful = read(path)
    assert lines == [2, 3, 5]
    assert rows == [["T1", "one"], ["T2", "two\rlines"], ["T3", "three"]]
    assert careful == [1]


def test_a_quoted_field_ending_with_a_doubled_quote_is_fine(tmp_path: Path) -> None:
    """A quoted note ending with a doubled quote is read with its quote, no finding."""
    path = tmp_path / "ok.csv"
    path.write_text('emr_task_id,note\nT1,"wound 5"""\n')
    assert read(path)[1] == [["T1", 'wound 5"']]


def test_findings_are_all_listed_with_their_lines(tmp_path: Path) -> None:
    """Several broken rows: the first is described, the others' lines are named, and the
    rows between them are read on (one pass fixes the file)."""
    path = tmp_path / "many.csv"
    path.write_text('emr_task_id,note\nT1,"a "b" c"\nT2,fine\nT3,"d"e\nT4,"never closed\n')
    with pytest.raises(InputError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: stray-quote: text follows the closing quote")
    assert "(also line 4 stray-quote, line 5 unclosed-quote)" in message


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-8"])
def test_a_byte_order_mark_decides_the_encoding(tmp_path: Path, codec: str) -> None:
    """A BOM is honoured whatever input.encoding says (here cp1252), and is not in the header."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffemr_task_id,note\r\nT1,Zoë — 患者\r\n".encode(codec))
    with CsvFile(path, InputConfig(encoding="cp1252")) as f:
        assert f.bom == codec
        assert f.header.names == ("emr_task_id", "note")
        rows = [r for b in f.batches() for r in b.rows]
    assert rows == [["T1", "Zoë — 患者"]]


_CELL = st.lists(st.sampled_from(["a", "é", "患", "🙂", ",", '"', "\r", "\n", "\r\n", "\u2028",
                                  "\x85", "\x0b", " "]), max_size=8).map("".join)


@given(rows=st.lists(st.tuples(_CELL, _CELL), max_size=8),
       terminator=st.sampled_from(["\r\n", "\n", "\r"]), read_size=st.sampled_from([1, 2, 3, 7]))
@settings(max_examples=150, deadline=None)
def test_reads_cut_anywhere_give_the_same_records_and_lines(
        rows: list[tuple[str, str]], terminator: str, read_size: int) -> None:
    """Whatever byte a read ends on (inside a CRLF, a multi-byte character, a long line),
    the records and their start lines are those of the csv module reading the whole text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=terminator)
    writer.writerow(["emr_task_id", "note"])
    writer.writerows(rows)
    text = buffer.getvalue()
    reference = csv.reader(io.StringIO(text, newline=""), strict=True)
    expected, prev = [], 0
    for record in reference:
        if record:
            expected.append((prev + 1, record))
        prev = reference.line_num
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_bytes(text.encode("utf-8"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(source, "READ_SIZE", read_size)
            with CsvFile(path, InputConfig()) as f:
                got = [(f.header.line, list(f.header.names))]
                got += [(line, row) for b in f.batches(size=2)
                        for line, row in zip(b.lines, b.rows, strict=True)]
    assert got == expected
