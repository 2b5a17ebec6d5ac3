"""A whole run, in-process, against the emulator: inputs in, one result per row out."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from helpers import EmulatorThread, make_config, read_results, run_pipeline, write_csv
from pipeline.errors import InputError


def test_rows_of_several_files_carry_their_source_file(tmp_path: Path) -> None:
    """Two files by glob: each result names its file; a duplicate across files names the first."""
    write_csv(tmp_path / "a.csv", [["T1", "one"], ["T2", "two"]])
    write_csv(tmp_path / "b.csv", [["T3", "three"], ["T1", "one"]])
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url},
                             input={"path": str(tmp_path / "*.csv")})
        outcome = run_pipeline(config)
    assert outcome.exit_code == 0
    results = read_results(outcome.report.directory)
    assert [(Path(r["source_file"]).name, r["line"], r["final_status"]) for r in results] == [
        ("a.csv", "2", "awaiting_outcome"), ("a.csv", "3", "awaiting_outcome"),
        ("b.csv", "2", "awaiting_outcome"), ("b.csv", "3", "skipped_duplicate")]
    assert results[3]["detail"] == f"duplicate of line 2 of {tmp_path / 'a.csv'}"
    assert api.stored("T1", "one") == 1


def test_passthrough_columns_travel_into_results(tmp_path: Path) -> None:
    """input.passthrough columns appear after the contract columns, values as written."""
    write_csv(tmp_path / "input.csv", [["T1", "one", "0042", "Northside"]],
              header=("emr_task_id", "note", "mrn", "clinic"))
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url},
                             input={"passthrough": ["clinic", "mrn"]})
        outcome = run_pipeline(config)
    with (outcome.report.directory / "results.csv").open(newline="") as fh:
        header, row = list(csv.reader(fh))
    assert header[-4:] == ["clinic", "mrn", "detail", "outcome_clock"]
    assert row[-4:-2] == ["Northside", "0042"]


def test_rejects_can_be_fixed_and_fed_back(tmp_path: Path) -> None:
    """rejects.csv keeps the input's encoding, delimiter and values: fix a row, re-feed it."""
    raw = ("emr_task_id;note\r\nT1;Café visit\r\n;Résumé without a task\r\n"
           "T3;note for T3\r\n").encode("cp1252")
    (tmp_path / "input.csv").write_bytes(raw)
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url},
                             input={"encoding": "cp1252", "delimiter": ";"})
        first = run_pipeline(config)
        rejects = first.rejects
        assert rejects is not None
        text = rejects.read_bytes().decode("cp1252")
        assert text == ("source_file;line;reasons;emr_task_id;note\r\n"
                        f"{tmp_path / 'input.csv'};3;missing-task-id;;Résumé without a task\r\n")
        rejects.write_bytes(text.replace(";;Résumé", ";T2;Résumé").encode("cp1252"))
        second = run_pipeline(config, str(rejects))
    assert first.exit_code == 1
    assert second.exit_code == 0
    assert [r["final_status"] for r in read_results(second.report.directory)] == [
        "awaiting_outcome"]
    assert api.stored("T2", "Résumé without a task") == 1


def test_bad_encoding_rejects_reproduce_the_original_bytes(tmp_path: Path) -> None:
    """A row set aside for bad bytes is written back to rejects.csv byte for byte."""
    (tmp_path / "input.csv").write_bytes(b"emr_task_id,note\nT1,ok\nT2,bad \x92 byte\n")
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url},
                             input={"on_bad_encoding": "reject"})
        outcome = run_pipeline(config)
    # the record as read, its own LF included
    assert outcome.rejects.read_bytes().endswith(b"3,bad-encoding,T2,bad \x92 byte\n")
    assert api.stored("T1", "ok") == 1


def test_nothing_is_sent_when_any_file_cannot_be_read(tmp_path: Path) -> None:
    """A bad header in the second file stops the run before the first file is sent."""
    write_csv(tmp_path / "a.csv", [["T1", "one"]])
    (tmp_path / "b.csv").write_text("task,text\nT2,two\n")
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        with pytest.raises(InputError, match=r"b.csv line 1: column 'emr_task_id'"):
            run_pipeline(config, str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    assert api.emulator.requests == 0


def test_the_scan_line_counts_in_the_singular_and_plural(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One duplicate is "1 duplicate", one row "1 row"; other counts take the plural: the
    line a run logs after its scan."""
    one = write_csv(tmp_path / "one.csv", [["T1", "a note"]])
    two = write_csv(tmp_path / "two.csv", [["T3", "c"], ["T3", "c"]])
    three = write_csv(tmp_path / "three.csv", [["T2", "b"], ["T2", "b"], ["T2", "b"]])
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        with caplog.at_level(logging.INFO, logger="pipeline.runner"):
            run_pipeline(config, str(one))
            run_pipeline(config, str(two))
            run_pipeline(config, str(three))
    assert [r.getMessage() for r in caplog.records if " to send, " in r.getMessage()] == [
        "1 row: 1 to send, 0 rejected, 0 duplicates, 0 already sent, 0 held",
        "2 rows: 1 to send, 0 rejected, 1 duplicate, 0 already sent, 0 held",
        "3 rows: 1 to send, 0 rejected, 2 duplicates, 0 already sent, 0 held",
    ]
