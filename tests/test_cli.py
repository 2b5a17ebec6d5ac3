"""The tasknotes command, run as a user runs it: a subprocess, exit codes, output, files."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_results, read_sink, write_config, write_csv

ROOT = Path(__file__).parent.parent


def tasknotes(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


def sandbox(tmp_path: Path) -> Path:
    """A copy of the shipped sandbox config and sample data in a fresh directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    return tmp_path


@pytest.mark.slow
def test_the_sandbox_run_goes_from_csv_to_a_reconciled_report(tmp_path: Path) -> None:
    """`tasknotes run configs/sandbox.yaml`: documented exit code, one result per input row,
    every accepted row with its webhook outcome, job ids as the emulator gave them."""
    cwd = sandbox(tmp_path)
    done = tasknotes("run", "configs/sandbox.yaml", "--no-progress", cwd=cwd)
    assert done.returncode == 1, done.stderr  # the sample has rows meant to be rejected/fail
    assert "Traceback" not in done.stderr
    report = next((cwd / "reports").iterdir())
    assert f"report: reports/{report.name}/" in done.stdout
    assert "notes confirmed" in done.stdout.splitlines()[-1]
    for name in ("results.csv", "summary.json", "report.html", "rejects.csv"):
        assert (report / name).exists(), name
    with (cwd / "sample_data" / "task_notes.csv").open(newline="") as fh:
        inputs = list(csv.DictReader(fh))
    results = read_results(report)
    assert len(results) == len(inputs)
    accepted = [r for r in results if r["submit_status"] == "accepted"]
    assert accepted
    assert {r["outcome"] for r in accepted} <= {"created", "failed"}
    events = {e["job_id"]: e for _, e in read_sink(cwd / "state" / "sandbox" / "webhooks.jsonl")}
    for row in accepted:
        assert row["job_id"].isdigit()
        assert events[row["job_id"]]["data"]["task_note_id"] == row["task_note_id"]
    statuses = {r["final_status"] for r in results}
    assert statuses == {"confirmed", "failed_in_emr", "rejected_invalid", "skipped_duplicate"}
    summary = json.loads((report / "summary.json").read_text())
    assert summary["exit_code"] == 1


@pytest.mark.slow
def test_running_the_sandbox_again_sends_nothing_twice(tmp_path: Path) -> None:
    """The second run of the same input finds every delivered row in the ledger."""
    cwd = sandbox(tmp_path)
    tasknotes("run", "configs/sandbox.yaml", "--no-progress", cwd=cwd)
    again = tasknotes("-q", "run", "configs/sandbox.yaml", "--no-progress", cwd=cwd)
    latest = sorted((cwd / "reports").iterdir())[-1]
    finals = {r["final_status"] for r in read_results(latest)}
    assert "confirmed" not in finals
    assert "skipped_already_sent" in finals
    assert again.returncode == 1  # the invalid rows are still invalid


def test_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """A config error: exit 2, one line naming the key, no traceback, nothing sent."""
    config = write_config(tmp_path, submit={"concurrency": 0})
    done = tasknotes("run", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"tasknotes: {config}: submit.concurrency: must be >= 1"]
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        pytest.param(None, 2, "input file not found", id="missing-file"),
        pytest.param("", 2, "the file is empty", id="empty-file"),
        pytest.param("Task,Notes\nT1,x\n", 2, "column 'emr_task_id'", id="wrong-columns"),
        pytest.param("emr_task_id,note\n", 0, "0 rows: the input has a header and no data",
                     id="header-only"),
        pytest.param("emr_task_id,note\nT1,ok\nT2,fine\n", 0, "2 rows: 2 valid", id="valid"),
        pytest.param("emr_task_id,note\nT1,ok\n,no id\nbad id,x\n", 1, "missing-task-id",
                     id="some-rejected"),
        pytest.param("emr_task_id,note\nT1,ok\nT2,caf\udce9\n", 2,
                     "input.csv line 3: bytes e9 are not valid utf-8", id="bad-bytes"),
    ],
)
def test_validate_exit_codes_and_output(tmp_path: Path, content: str | None, code: int,
                                        message: str) -> None:
    """validate: 0 all valid, 1 some rejected, 2 unreadable; the reason is plain."""
    if content is not None:
        (tmp_path / "input.csv").write_bytes(content.encode("utf-8", "surrogateescape"))
    config = write_config(tmp_path)
    done = tasknotes("validate", str(config), cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()


def test_validate_prints_codes_with_counts_and_first_lines(tmp_path: Path) -> None:
    """The problem table: code, how many rows, and the first few line numbers."""
    rows = [["", f"note {i}"] for i in range(7)] + [["T1", ""]]
    write_csv(tmp_path / "input.csv", rows)
    done = tasknotes("validate", str(write_config(tmp_path)), cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["problem", "rows", "first", "lines"]
    assert lines[1].split(maxsplit=2) == ["missing-task-id", "7", "2, 3, 4, 5, 6, …"]
    assert lines[2].split(maxsplit=2) == ["blank-note", "1", "9"]
    rejects = tmp_path / done.stdout.split("rejects: ")[1].strip()
    assert rejects.stat().st_mode & 0o777 == 0o600
    with rejects.open(newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0] == ["source_file", "line", "reasons", "emr_task_id", "note"]
    assert got[1][1:] == ["2", "missing-task-id", "", "note 0"]


def test_run_limit_and_dry_run_send_nothing(tmp_path: Path) -> None:
    """--dry-run counts what would be sent and writes no ledger; with --limit 1 it counts one
    row and says at which line reading stopped."""
    write_csv(tmp_path / "input.csv", [["T1", "a"], ["T2", "b"], ["T2", "b"]])
    config = str(write_config(tmp_path))
    done = tasknotes("run", config, "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "would send 2; skip 1 duplicate," in done.stdout
    assert "--limit reached" not in done.stdout
    limited = tasknotes("run", config, "--dry-run", "--limit", "1", cwd=tmp_path)
    assert limited.returncode == 0, limited.stderr
    assert "would send 1; skip 0 duplicates" in limited.stdout
    assert f"stopped reading at {tmp_path / 'input.csv'} line 3; 2 rows left unread" in (
        limited.stdout)
    assert not (tmp_path / "state").exists()


def test_python_dash_m_and_the_console_script_agree(tmp_path: Path) -> None:
    """`python -m pipeline` is the `tasknotes` command, the console script installed next to
    this interpreter (found there, not on PATH: `.venv/bin/python -m pytest` runs without the
    venv on PATH, and a check that skips itself proves nothing)."""
    done = tasknotes("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("tasknotes ")
    script = Path(sys.executable).parent / "tasknotes"
    assert script.is_file(), f"no console script next to {sys.executable}: pip install -e ."
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          check=True).stdout == done.stdout


def test_a_reader_that_goes_away_gets_no_traceback_and_the_exit_code_stands(
        tmp_path: Path) -> None:
    """`tasknotes status | head -1`: the reader closes the pipe; the command finishes
    quietly with the exit code it would have had (Python's docs, "Note on SIGPIPE")."""
    config = write_config(tmp_path)
    argv = [sys.executable, "-m", "pipeline", "status", str(config)]
    whole = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err.decode()
    assert "BrokenPipeError" not in err.decode()
    assert proc.returncode == whole.returncode


def test_the_commands_log_shows_psycopgs_errors_not_its_warnings() -> None:
    """psycopg's warning about a connection it could not close cleanly ("error ignored
    terminating <psycopg.Pipeline [BAD] ...>") followed tasknotes' own one-line error when
    the database went away mid-run (newcomer finding): the command's log shows only
    psycopg's errors; tasknotes' own warnings still show."""
    import io  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from pipeline import logs  # noqa: PLC0415

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("psycopg").level)
    root.handlers = [h for h in root.handlers if isinstance(h, logs._Handler)]
    try:
        logs.configure(logging.INFO, "text", stream=stream)
        logging.getLogger("psycopg").warning("error ignored terminating <psycopg.Pipeline>")
        logging.getLogger("psycopg").error("psycopg-error-line")
        logging.getLogger("pipeline.state").warning("tasknotes-warning-line")
    finally:
        root.handlers, _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("psycopg").setLevel(saved[2])
    shown = stream.getvalue()
    assert "error ignored" not in shown
    assert "psycopg-error-line" in shown
    assert "tasknotes-warning-line" in shown


@pytest.mark.parametrize("argv", [["reconcile", "--run-id", ""], ["poll", "--run-id", " "]])
def test_an_empty_run_id_is_a_usage_error_not_every_run(tmp_path: Path, argv: list[str]) -> None:
    """``--run-id ''`` (an unset shell variable) reconciled every run, as no --run-id does:
    refused as usage, exit 2, before the config is read (as ``status --write-off ''`` is,
    test_status.py)."""
    config = write_config(tmp_path)
    done = tasknotes(argv[0], str(config), *argv[1:], cwd=tmp_path)
    assert done.returncode == 2
    assert "must name a run" in done.stderr
    assert "Traceback" not in done.stderr
