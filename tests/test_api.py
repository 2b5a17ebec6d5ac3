"""The Python API (``import pipeline``): the CLI's front doors, usable from any thread and
from inside an event loop, without touching the host's logging, signals or argv."""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest

import pipeline
from helpers import EmulatorThread, make_config, read_summary, write_config, write_csv
from pipeline import jobs, logs
from pipeline.cli import main
from pipeline.state import Ledger

ROOT = Path(__file__).parent.parent
SANDBOX = ROOT / "configs" / "sandbox.yaml"


def _in_a_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a new worker thread (not the main one); its result, or its exception."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host-worker") as pool:
        return pool.submit(call).result(timeout=110)


def _runs(ledger: Path) -> tuple[list[str], list[str]]:
    """(every run id, the runs still marked running) of the ledger at ``ledger``."""
    book = Ledger(ledger, readonly=True)
    try:
        return book.run_ids(), book.runs_in_progress()
    finally:
        book.close()


def _argv(ledger: Path, run_id: str) -> tuple[str, ...]:
    book = Ledger(ledger, readonly=True)
    try:
        return book.run(run_id).info.argv
    finally:
        book.close()


@pytest.fixture
def host_argv(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host process's command line: never to be recorded by an API call."""
    argv = ["airflow-task-runner", "--host-flag", "host-value"]
    monkeypatch.setattr(sys, "argv", argv)
    return argv


def test_import_pipeline_gives_the_api_and_importing_every_module_does_not_hide_it() -> None:
    """A fresh interpreter: ``import pipeline`` loads no stage (the CLI starts as fast as
    before); its front doors are jobs.py's functions, and stay so once every module of the
    package is imported: the import system sets a submodule as an attribute of its
    package, so a module named like a front door (pipeline/status.py) would replace it."""
    script = """
import sys, importlib, pkgutil
import pipeline
assert "pipeline.jobs" not in sys.modules, "import pipeline loaded the stages"
for found in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    if found.name != "pipeline.__main__":  # that one runs the command
        importlib.import_module(found.name)
from pipeline import jobs, logs
for name in ("run", "validate", "reconcile", "poll", "status", "write_off", "prune"):
    assert getattr(pipeline, name) is getattr(jobs, name), name
from pipeline import status
assert status is jobs.status
for name in pipeline.__all__:
    getattr(pipeline, name)
assert issubclass(pipeline.ConfigError, pipeline.PipelineError)
assert issubclass(pipeline.StorageFull, pipeline.RunAborted)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_validate_loads_no_server_client_database_or_report_library() -> None:
    """The imports inside functions (pyproject's per-file-ignores) are there for this: a
    fresh `tasknotes validate` loads neither uvicorn, aiohttp, httpx, psycopg, pandas nor
    prometheus_client, and checks the rows all the same."""
    script = f"""
import sys
from pipeline.cli import main
code = main(["validate", {str(SANDBOX)!r}])
heavy = {{"uvicorn", "aiohttp", "httpx", "psycopg", "pandas", "prometheus_client"}}
print(code, sorted(heavy & {{name.split(".")[0] for name in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    code, loaded = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert (code in ("0", "1"), loaded) == (True, "[]")
    assert "rows" in done.stdout


def test_run_from_a_worker_thread_on_the_sandbox(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], host_argv: list[str]) -> None:
    """pipeline.run(path) from a worker thread, on configs/sandbox.yaml (the emulator and
    the sink in-process): a RunResult whose figures are its report's, the run closed in the
    ledger; no signal handler installed (Python allows none outside the main thread),
    nothing printed, the host's loggers, signal handlers and argv untouched."""
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")  # the config's input.path
    root = logging.getLogger()
    handlers = list(root.handlers), root.level
    uvicorn_handlers = list(logging.getLogger("uvicorn").handlers)
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capfd.readouterr()

    result = _in_a_thread(lambda: pipeline.run(SANDBOX))

    assert isinstance(result, pipeline.RunResult)
    assert result.report_dir == Path("reports") / result.run_id  # report.dir: reports
    summary = read_summary(result.report_dir)
    assert dict(result.counts) == summary["final_status"]
    assert sum(result.counts.values()) == result.scan.rows > 0  # every row has its status
    assert result.exit_code == summary["exit_code"]
    assert result.stop_reason is None
    ledger = tmp_path / "state" / "sandbox" / "ledger.sqlite"
    assert _runs(ledger) == ([result.run_id], [])  # finished, not left running
    assert _argv(ledger, result.run_id) == ()  # not the host's sys.argv
    assert capfd.readouterr() == ("", "")
    assert (list(root.handlers), root.level) == handlers
    assert logging.getLogger("uvicorn").handlers == uvicorn_handlers
    assert all(isinstance(h, logging.NullHandler)
               for h in logging.getLogger("pipeline").handlers)
    assert {s: signal.getsignal(s) for s in signals} == signals


@pytest.mark.parametrize(("section", "key"), [
    ("api", "client_secret"), ("notify", "url"), ("webhooks", "secret")])
def test_a_config_error_raises_config_error_and_leaves_no_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, key: str) -> None:
    """A secret run needs, given as ${VAR} and not set, loaded from a path exactly as the CLI
    loads it (notify.url; webhooks.secret in a sandbox): ConfigError naming the key and the
    variable, raised in the calling thread (not SystemExit), before the ledger is opened;
    an earlier run stays the only one, and closed."""
    monkeypatch.delenv("TASKNOTES_TEST_UNSET", raising=False)
    write_csv(tmp_path / "input.csv", [["T1", "one"]])
    with EmulatorThread() as api:
        first = pipeline.run(make_config(tmp_path, api={"base_url": api.url}))
    ledger = tmp_path / "state" / "ledger.sqlite"
    overrides: dict[str, Any] = {section: {key: "${TASKNOTES_TEST_UNSET}"}}
    if section == "webhooks":
        overrides["sandbox"] = {"enabled": True}
    path = write_config(tmp_path, **overrides)

    with pytest.raises(pipeline.ConfigError, match=rf"{section}\.{key}: environment "
                                                   "variable TASKNOTES_TEST_UNSET") as caught:
        _in_a_thread(lambda: pipeline.run(path))
    assert caught.value.exit_code == 2
    with pytest.raises(pipeline.ConfigError, match="TASKNOTES_TEST_UNSET"):
        pipeline.validate(path)
    assert _runs(ledger) == ([first.run_id], [])
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [first.run_id]


def test_a_config_file_that_cannot_be_read_raises_before_anything_is_created(
        tmp_path: Path) -> None:
    """No config file: ConfigError (exit 2) from every front door, nothing created."""
    for door in (pipeline.run, pipeline.validate, pipeline.reconcile, pipeline.poll,
                 pipeline.status):
        with pytest.raises(pipeline.ConfigError, match="config file not found") as caught:
            _in_a_thread(lambda door=door: door(tmp_path / "missing.yaml"))
        assert caught.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("given", [None, 42])
def test_a_config_of_the_wrong_type_is_a_config_error_from_every_front_door(
        given: object) -> None:
    """README "Errors": ``config`` neither a path nor a ``RunConfig`` is ConfigError (exit
    2) from each front door, never a TypeError."""
    for door in (pipeline.run, pipeline.validate, pipeline.reconcile, pipeline.poll,
                 pipeline.status, pipeline.prune,
                 lambda config: pipeline.write_off(config, "run-1")):
        with pytest.raises(pipeline.ConfigError, match="path of a YAML file or a RunConfig"):
            _in_a_thread(lambda door=door: door(given))

def test_the_other_front_doors_take_a_path(tmp_path: Path, host_argv: list[str]) -> None:
    """status, reconcile and validate read the config from its path as the CLI does; a run
    records the argv it is given and nothing else; the CLI records its own argv, not the
    host's; a host may log the CLI's JSON lines (logs.handler), each with the run id."""
    write_csv(tmp_path / "input.csv", [["T1", "one"], ["", "no task"]])
    lines = io.StringIO()
    added = logs.handler("json", lines)  # the host's choice: the CLI's JSON lines
    ours = logging.getLogger("pipeline")
    ours.addHandler(added)
    ours.setLevel(logging.INFO)
    try:
        with EmulatorThread() as api:
            path = write_config(tmp_path, api={"base_url": api.url})
            given = pipeline.run(path, argv=["nightly", "--from-airflow"])
    finally:
        ours.removeHandler(added)
        ours.setLevel(logging.NOTSET)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [r["run_id"] for r in records if r.get("event") == "run_ended"] == [given.run_id]
    scanned = [r for r in records if r["logger"] == "pipeline.runner"]
    assert scanned
    assert {r.get("run_id") for r in scanned} == {given.run_id}
    with EmulatorThread() as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        assert main(["run", str(path), "--no-progress"]) == 1
    ledger = tmp_path / "state" / "ledger.sqlite"
    first, second = _runs(ledger)[0]
    assert first == given.run_id
    assert _argv(ledger, first) == ("nightly", "--from-airflow")
    assert _argv(ledger, second) == ("run", str(path), "--no-progress")
    found = pipeline.status(path)
    assert found.exit_code == jobs.status(make_config(tmp_path)).exit_code
    reconciled = pipeline.reconcile(path, given.run_id)
    assert [r.run_id for r in reconciled.runs] == [given.run_id]
    assert reconciled.exit_code == given.exit_code == 1  # a rejected row
    assert pipeline.validate(path).scan.rejected == 1
    with pytest.raises(ValueError, match="limit"):
        pipeline.run(path, limit=0)


@pytest.fixture
def host_sigterm() -> Iterator[Callable[[int, FrameType | None], None]]:
    """A SIGTERM handler of the host's own (as Airflow's task runner sets one)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("not to be called")

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_run_in_the_main_thread_puts_the_hosts_signal_handlers_back(
        tmp_path: Path, host_sigterm: Callable[[int, FrameType | None], None]) -> None:
    """In the main thread a run handles SIGINT/SIGTERM itself while it runs; once it ends
    the handlers the host had are in place again."""
    assert threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT)
    write_csv(tmp_path / "input.csv", [["T1", "one"]])
    with EmulatorThread() as api:
        result = pipeline.run(make_config(tmp_path, api={"base_url": api.url}))
    assert result.exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is host_sigterm
    assert signal.getsignal(signal.SIGINT) is sigint


async def test_inside_an_event_loop_the_async_form_runs_and_the_loop_goes_on(
        tmp_path: Path) -> None:
    """Inside a running loop the blocking form refuses (RuntimeError naming the async one,
    nothing created); ``await pipeline.aio.run`` runs in a worker thread while the loop
    goes on serving its other tasks, and gives the same result as the sync form."""
    write_csv(tmp_path / "input.csv", [["T1", "one"], ["T2", "two"]])
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        with pytest.raises(RuntimeError, match=r"pipeline\.aio\.run"):
            pipeline.run(config)
        with pytest.raises(RuntimeError, match=r"pipeline\.aio\.status"):
            pipeline.status(config)
        with pytest.raises(RuntimeError, match=r"pipeline\.aio\.prune"):
            pipeline.prune(config, 30)
        with pytest.raises(RuntimeError, match=r"pipeline\.aio\.write_off"):
            pipeline.write_off(config, "run-1")
        assert not config.state.ledger.exists()

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.005)
                ticks += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            result = await pipeline.aio.run(config)
            tg.cancel_scope.cancel()
    assert ticks > 0  # the loop was not blocked while the run ran
    assert (result.exit_code, dict(result.counts)) == (
        0, read_summary(result.report_dir)["final_status"])
    assert result.counts["awaiting_outcome"] == 2
    found = await pipeline.aio.status(config)  # no sink here: the outcomes are awaited
    assert found.exit_code == 1
    assert found.to_dict()["kinds"]["awaiting_outcome"]["count"] == 2
    reconciled = await pipeline.aio.reconcile(config, result.run_id)
    assert [r.run_id for r in reconciled.runs] == [result.run_id]
    assert (await pipeline.aio.validate(config)).scan.to_send == 0  # both already sent
    # one input given as a single path (not a list): read as that file, not letter by letter
    alone = await pipeline.aio.validate(config, str(tmp_path / "input.csv"))
    assert alone.scan.to_send == 0
    pruned = await pipeline.aio.prune(config, 30, dry_run=True)
    assert (pruned.exit_code, pruned.pruned.dry_run) == (0, True)
