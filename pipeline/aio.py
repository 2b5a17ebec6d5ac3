"""The Python API for callers already inside an event loop (asyncio or trio, through anyio).

    result = await pipeline.aio.run("configs/sandbox.yaml")

Each function here takes the same arguments as the front door of the same name in
jobs.py (``pipeline.run`` and the others), returns the same result and raises the same
errors; it runs that front door in a thread of its own, so the caller's event loop goes
on serving its other tasks meanwhile. In that thread no signal handler is installed:
stopping the process is the host's business.

Cancelling the awaiting task never abandons the work half-way: the cancellation is held
back until the work has ended, then re-raised (``CancelledError`` under asyncio). A run
is asked to stop gracefully first, as a first SIGINT/SIGTERM would: no new request is
sent, those in flight finish, its rows are recorded, its report is written (exit code 3,
``stop_reason`` "interrupted: the awaiting task was cancelled"). So when the
cancellation arrives the run is closed in the ledger, and a next run may start. The
others (validate, reconcile, poll, status, prune, write_off) run to their end.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import anyio
import anyio.to_thread
import sniffio

from pipeline import jobs
from pipeline.jobs import (
    ConfigSource,
    PollResult,
    PruneOutcome,
    ReconcileResult,
    RunResult,
    StatusResult,
)

if TYPE_CHECKING:
    from pipeline.runner import Run

T = TypeVar("T")

CANCELLED = "interrupted: the awaiting task was cancelled"


class _Stopper:
    """Asks the run to stop (once it exists; at once if it already does), from the loop's
    thread while the run goes on in its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Run | None = None
        self._asked = False

    def started(self, run: Run) -> None:
        with self._lock:
            self._run = run
            asked = self._asked
        if asked:
            run.request_stop(CANCELLED)

    def ask(self) -> None:
        with self._lock:
            self._asked = True
            run = self._run
        if run is not None:
            run.request_stop(CANCELLED)


@dataclass
class _Outcome(Generic[T]):
    """What the worker thread of ``_to_the_end`` hands back: its value, or its error."""

    value: T | None = None
    error: BaseException | None = None
    done: bool = False


async def _to_the_end(call: Callable[[], T], on_cancel: Callable[[], None] | None = None) -> T:
    """``call()`` in a thread of its own (the caller's context copied, as
    ``anyio.to_thread`` does); its result or exception once it has returned. A cancellation
    of the caller meanwhile calls ``on_cancel`` and is re-raised only after that."""
    box: _Outcome[T] = _Outcome()
    context = contextvars.copy_context()

    def in_context() -> T:
        sniffio.current_async_library_cvar.set(None)  # no event loop runs in this thread
        return call()

    def target() -> None:
        try:
            box.value = context.run(in_context)
            box.done = True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            box.error = exc

    thread = threading.Thread(target=target, name="tasknotes-aio")
    thread.start()
    cancelled: BaseException | None = None
    while thread.is_alive():
        try:
            # abandon_on_cancel: the join is what is abandoned, never the work
            with anyio.CancelScope(shield=cancelled is not None):
                await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class() as exc:
            if cancelled is None:
                cancelled = exc
                if on_cancel is not None:
                    on_cancel()
    if cancelled is not None:
        raise cancelled
    if box.error is not None:
        raise box.error
    assert box.done, "the thread ended without a result or an error"
    return cast("T", box.value)


async def run(config: ConfigSource, *, inputs: Sequence[str | os.PathLike[str]] = (),
              dry_run: bool = False, limit: int | None = None, force: bool = False,
              progress: bool = False, argv: Sequence[str] = ()) -> RunResult:
    """``pipeline.run`` (jobs.run) in a thread of its own: the same arguments, result and
    errors. Cancelled, it asks the run to stop gracefully and re-raises the cancellation
    once the run has ended (the module docstring)."""
    stopper = _Stopper()
    return await _to_the_end(functools.partial(
        jobs._run, config, inputs=inputs, dry_run=dry_run, limit=limit, force=force,
        progress=progress, argv=argv, started=stopper.started), stopper.ask)


async def validate(config: ConfigSource, inputs: Sequence[str | os.PathLike[str]] = ()
                   ) -> RunResult:
    """``pipeline.validate`` (jobs.validate) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.validate, config, inputs))


async def reconcile(config: ConfigSource, run_id: str | None = None) -> ReconcileResult:
    """``pipeline.reconcile`` (jobs.reconcile) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.reconcile, config, run_id))


async def poll(config: ConfigSource, run_id: str | None = None) -> PollResult:
    """``pipeline.poll`` (jobs.poll) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.poll, config, run_id))


async def status(config: ConfigSource, *, config_path: str | None = None) -> StatusResult:
    """``pipeline.status`` (jobs.status) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.status, config, config_path=config_path))


async def prune(config: ConfigSource, older_than_days: float | None = None, *,
                dry_run: bool = False) -> PruneOutcome:
    """``pipeline.prune`` (jobs.prune) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.prune, config, older_than_days,
                                               dry_run=dry_run))


async def write_off(config: ConfigSource, run_id: str) -> tuple[int, ReconcileResult]:
    """``pipeline.write_off`` (jobs.write_off) in a thread of its own."""
    return await _to_the_end(functools.partial(jobs.write_off, config, run_id))
