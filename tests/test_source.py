"""Reading CSV files: every cell as written, physical line numbers, clear errors."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

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
        assert f.had_bom
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
    assert "the header has 'Task ID', 'Notes'" in message


def test_columns_can_be_mapped(data: Path) -> None:
    """input.columns maps the file's own header names to the two fields."""
    with CsvFile(data / "wrong_header.csv",
                 InputConfig.model_validate({"columns": {"emr_task_id": "Task ID",
                                                         "note": "Notes"}})) as f:
        assert (f.header.task_col, f.header.note_col) == (0, 1)


def test_a_duplicate_header_name_is_an_error(data: Path) -> None:
    """Two columns with one name make the mapping ambiguous: refused."""
    with pytest.raises(InputError, match="names column 'note' twice"):
        read(data / "duplicate_header.csv")


def test_an_unclosed_quote_swallows_the_rest_into_the_row_where_it_starts(tmp_path: Path
                                                                          ) -> None:
    """A quote that never closes swallows the rest of the file into one row, numbered by the
    line where that row starts. (Whether validate then reports the quote is issue 11's.)"""
    path = tmp_path / "runaway.csv"
    path.write_text("emr_task_id,note\nT1,fine\nT2,\"never closed\n" + "more\n" * 3)
    lines, rows, _ = read(path)
    assert lines == [2, 3]
    assert rows[1][0] == "T2"
    assert rows[1][1] == "never closed\n" + "more\n" * 3


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
