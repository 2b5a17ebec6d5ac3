"""The front doors below the CLI (jobs.py) and the one place exit codes are decided."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import pytest

from helpers import EmulatorThread, make_config, read_summary, write_csv
from pipeline import exits, jobs
from pipeline.errors import (
    ConfigError,
    InputError,
    PipelineError,
    RunAborted,
    StateError,
    StorageFull,
)

ROWS = [["T1", "one"], ["", "no task"], ["T2", "two"], ["T1", "one"], ["T3", "three"],
        ["T4", "four"], ["", "late reject"], ["T5", "five"]]


def test_run_returns_its_result_and_prints_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jobs.run: the exit code, run id, report directory and final-status counts of the run,
    the counts those of its summary.json; nothing on stdout, the root logger untouched."""
    write_csv(tmp_path / "input.csv", ROWS)
    handlers = list(logging.getLogger().handlers)
    with EmulatorThread() as api:
        result = jobs.run(make_config(tmp_path, api={"base_url": api.url}))
    assert capsys.readouterr().out == ""
    assert logging.getLogger().handlers == handlers
    assert result.report_dir == tmp_path / "reports" / result.run_id
    summary = read_summary(result.report_dir)
    assert dict(result.counts) == summary["final_status"]
    assert result.counts["rejected_invalid"] == 2
    assert result.counts["skipped_duplicate"] == 1
    assert result.exit_code == summary["exit_code"] == 1  # rejected rows
    assert result.stop_reason is None
    assert dataclasses.is_dataclass(result)
    field = "exit_code"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, field, 0)


@pytest.mark.parametrize("limit", [None, 1, 3, 4])
def test_a_dry_run_counts_what_the_run_then_records(tmp_path: Path, limit: int | None) -> None:
    """One scan path: run --dry-run (nothing to look up, nothing recorded) finds the same
    counts, file by file and up to the --limit cut, as the run that records every row."""
    write_csv(tmp_path / "input.csv", ROWS)
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        dry = jobs.run(config, dry_run=True, limit=limit)
        assert not config.state.ledger.exists()  # the dry run recorded nothing
        real = jobs.run(config, limit=limit)
    assert (dry.dry_run, real.dry_run) == (True, False)
    assert dry.counts == {}  # no report: counts per final status only come from one
    assert dry.scan == real.scan
    assert real.scan.to_send == (limit or 5)


def test_validate_is_the_dry_run_scan(tmp_path: Path) -> None:
    """jobs.validate: the scan as run --dry-run, with exit 1 when some row is rejected."""
    write_csv(tmp_path / "input.csv", ROWS)
    config = make_config(tmp_path)
    result = jobs.validate(config)
    assert (result.exit_code, result.scan.rows, result.scan.rejected) == (1, 8, 2)
    assert result.scan == jobs.run(config, dry_run=True).scan
    write_csv(tmp_path / "input.csv", [["T1", "one"]])
    assert jobs.validate(config).exit_code == 0


def test_reconcile_and_poll_without_a_ledger_raise_and_print_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No ledger yet: a PipelineError (exit 2) from the front door, not a printed line."""
    config = make_config(tmp_path, api={"base_url": "http://127.0.0.1:9"})
    for door in (jobs.reconcile, jobs.poll):
        with pytest.raises(PipelineError, match="no ledger") as caught:
            door(config)
        assert caught.value.exit_code == 2
    assert capsys.readouterr().out == ""


def test_reconcile_returns_each_run_and_the_worst_code(tmp_path: Path) -> None:
    """jobs.reconcile: the runs whose report it rewrote, each with its report, and the
    worst of their codes; an unknown run id is a StateError, and so is an empty one given
    to jobs.write_off."""
    write_csv(tmp_path / "input.csv", [["T1", "one"], ["", "no task"]])
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        first = jobs.run(config)
        write_csv(tmp_path / "input.csv", [["T2", "two"]])
        second = jobs.run(config)
    one = jobs.reconcile(config, first.run_id)
    assert [r.run_id for r in one.runs] == [first.run_id]
    assert one.runs[0].report is not None
    assert one.runs[0].report.directory == first.report_dir
    assert one.exit_code == one.runs[0].report.exit_code == 1
    assert jobs.reconcile(config, second.run_id).exit_code == 0
    with pytest.raises(StateError):
        jobs.reconcile(config, "no-such-run")
    for blank in ("", "  "):  # write_off's callers get the check the CLI gave before
        with pytest.raises(StateError, match="the run id is empty"):
            jobs.write_off(config, blank)


def test_poll_in_a_sandbox_has_nothing_to_do(tmp_path: Path) -> None:
    """In a sandbox the emulator lived only during its run: poll does nothing, exit 0."""
    config = make_config(tmp_path, sandbox={"enabled": True},
                         webhooks={"secret": "s" * 32})
    result = jobs.poll(config)
    assert (result.exit_code, result.sandbox, result.stats, result.reconciled) == (
        0, True, None, None)


@pytest.mark.parametrize(("error", "code"), [
    (ConfigError("x"), 2), (InputError("x"), 2), (StateError("x"), 2), (PipelineError("x"), 2),
    (RunAborted("x"), 3), (StorageFull("x"), 3), (KeyboardInterrupt(), 3), (ValueError(), None),
])
def test_exit_codes_of_errors_are_decided_in_one_place(error: BaseException,
                                                       code: int | None) -> None:
    """exits.for_error: 2 for bad usage/config/input, 3 for a stop; the error's own
    ``exit_code`` is the same answer; a foreign exception has none (a bug, a traceback)."""
    assert exits.for_error(error) == code
    if isinstance(error, PipelineError):
        assert error.exit_code == code


def test_exit_codes_of_outcomes() -> None:
    """A run that stopped or wrote no report exits 3, else its report's code; rows needing
    attention give 1; several runs give the worst."""
    assert exits.for_run(stopped=True, report_code=0) == 3
    assert exits.for_run(stopped=False, report_code=None) == 3
    assert exits.for_run(stopped=False, report_code=1) == 1
    assert (exits.for_rows(False), exits.for_rows(True)) == (0, 1)
    assert (exits.worst([]), exits.worst([0, 1, 0])) == (0, 1)


def test_exit_code_rules_of_dry_runs_counts_and_recorded_runs() -> None:
    """The rules other modules used to hold: a dry run exits 1 for any rejected row; final
    counts exit 1 for any row outside the good statuses (zero counts do not count); a run
    recorded before its exit code was kept reads 3 when aborted, else today's code, and has
    none while running or after a crash."""
    assert (exits.for_dry_run(0), exits.for_dry_run(1)) == (0, 1)
    good = frozenset({"accepted"})
    assert exits.for_counts({"accepted": 5, "send_failed": 0}, good) == 0
    assert exits.for_counts({"accepted": 5, "send_failed": 1}, good) == 1
    assert exits.for_recorded_run("completed", 0, 1) == 0
    assert exits.for_recorded_run("aborted", None, 1) == 3
    assert exits.for_recorded_run("completed", None, 1) == 1
    assert (exits.for_recorded_run("running", None, 0),
            exits.for_recorded_run("crashed", None, 0)) == (None, None)


def test_errors_and_exits_do_not_import_each_other() -> None:
    """exits.py imports nothing of tasknotes (errors.py reads its numbers): no cycle."""
    tree = ast.parse(Path(exits.__file__ or "").read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [m for m in imported if m and m.startswith("pipeline")] == []
