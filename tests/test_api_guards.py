"""The Python API's edges (issue 18's findings): cancelling ``pipeline.aio.run``, a signal
at the very start of a run, the host's context, threads and umask after a run, the
event-loop guard, a config that is not one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import pipeline
from helpers import EmulatorThread, make_config, notes, write_csv
from pipeline import logs, runner
from pipeline.aio import CANCELLED
from pipeline.state import Ledger

ROOT = Path(__file__).parent.parent


def _ledger_runs(path: Path) -> list[tuple[str, str, str | None]]:
    """(run id, state, stop_reason) of every run in the ledger at ``path``."""
    book = Ledger(path, readonly=True)
    try:
        return [(r.run_id, r.state, r.info.stop_reason) for r in map(book.run, book.run_ids())]
    finally:
        book.close()


def test_cancelling_aio_run_returns_once_the_run_is_closed(tmp_path: Path) -> None:
    """A native ``Task.cancel()`` mid-send: the run is asked to stop as a first signal
    would; CancelledError reaches the caller only once the run is closed in the ledger
    (aborted, with its stop reason and report), so a next run is not refused."""
    write_csv(tmp_path / "input.csv", notes(60))
    with EmulatorThread(latency_ms=(100.0, 100.0)) as api:
        config = make_config(tmp_path, api={"base_url": api.url}, submit={"concurrency": 1})

        async def cancel_mid_send() -> list[tuple[str, str, str | None]]:
            task = asyncio.create_task(pipeline.aio.run(config))
            deadline = time.monotonic() + 60
            while api.emulator.requests < 2:  # sending has begun (a condition, not a delay)
                assert time.monotonic() < deadline, "the run never started sending"
                assert not task.done()
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return _ledger_runs(config.state.ledger)  # at the moment CancelledError arrived

        [(run_id, state, reason)] = asyncio.run(cancel_mid_send())
        assert (state, reason) == ("aborted", CANCELLED)
        assert (config.report.dir / run_id / "summary.json").exists()
        sent_before = api.emulator.requests
        assert sent_before < 60  # it stopped: not every row was sent
        following = asyncio.run(pipeline.aio.run(config))  # not refused: the lock is free
    assert following.exit_code in (0, 1)
    assert following.stop_reason is None


@pytest.fixture
def host_sigterm() -> Iterator[list[int]]:
    """A SIGTERM handler of the host's own that only notes the signal (as a host that logs
    it would); the list of signals it got."""
    got: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_before_the_inputs_are_read_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_sigterm: list[int]) -> None:
    """SIGTERM while the run opens its inputs (before its event loop and the scan): the
    run handles it (exit 3, "interrupted by SIGTERM", nothing sent, the run closed), the
    host's handler is not called and is put back; the run id is not left in the caller's
    logging context."""
    assert threading.current_thread() is threading.main_thread()
    write_csv(tmp_path / "input.csv", notes(5))
    real_open = runner.open_inputs

    def signalled_while_opening(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before returning here
        return real_open(*args)

    monkeypatch.setattr(runner, "open_inputs", signalled_while_opening)
    before = logs._RUN_ID.get()
    with EmulatorThread() as api:
        result = pipeline.run(make_config(tmp_path, api={"base_url": api.url}))
        notes_posted = api.emulator.requests
    assert host_sigterm == []
    assert (result.exit_code, result.stop_reason) == (3, "interrupted by SIGTERM")
    assert notes_posted == 0
    assert [s for _, s, _ in _ledger_runs(tmp_path / "state" / "ledger.sqlite")] == ["aborted"]
    assert signal.getsignal(signal.SIGTERM) is not None
    os.kill(os.getpid(), signal.SIGTERM)  # the host's handler is back
    assert host_sigterm == [signal.SIGTERM]
    assert logs._RUN_ID.get() == before


def test_a_blocking_call_from_a_plain_loop_callback_is_refused(tmp_path: Path) -> None:
    """``loop.call_soon(pipeline.validate, ...)`` runs on the loop with no current task
    (sniffio sees none): still a RuntimeError naming the async form, nothing done."""
    write_csv(tmp_path / "input.csv", notes(2))
    config = make_config(tmp_path)

    async def from_a_callback() -> object:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()

        def callback() -> None:
            try:
                done.set_result(pipeline.validate(config))
            except RuntimeError as exc:
                done.set_result(exc)

        loop.call_soon(callback)
        return await done

    outcome = asyncio.run(from_a_callback())
    assert isinstance(outcome, RuntimeError)
    assert "pipeline.aio.validate" in str(outcome)
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("given", [None, 42, b"configs/sandbox.yaml"])
def test_a_config_that_is_neither_a_path_nor_a_run_config_is_a_config_error(
        given: Any) -> None:
    call: Callable[..., Any] = pipeline.run
    with pytest.raises(pipeline.ConfigError, match="config: the path of a YAML file") as err:
        call(given)
    assert err.value.exit_code == 2


def test_after_a_run_the_host_has_no_stray_thread_and_owner_only_files(tmp_path: Path) -> None:
    """A fresh interpreter, umask 022 as a host's: after ``import pipeline`` alone,
    ``pipeline.logs`` is there (README); a sandbox run with progress=False leaves no
    thread behind (tqdm's monitor included), and the metrics file and its directory are
    owner-only."""
    import shutil  # noqa: PLC0415

    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    config = (ROOT / "configs" / "sandbox.yaml").read_text(encoding="utf-8").replace(
        "report:\n  dir: reports\n",
        "report:\n  dir: reports\n  metrics_file: metrics/tasknotes.prom\n")
    assert "metrics_file" in config
    (tmp_path / "sandbox.yaml").write_text(config, encoding="utf-8")
    script = """
import os, stat, threading, logging
os.umask(0o022)
import pipeline
handler = pipeline.logs.handler("json")
before = {t.name for t in threading.enumerate()}
result = pipeline.run("sandbox.yaml", progress=False)
assert result.exit_code in (0, 1), result
left = {t.name for t in threading.enumerate()} - before
assert not left, left
for path in ("metrics", "metrics/tasknotes.prom"):
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o077 == 0, (path, oct(mode))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
