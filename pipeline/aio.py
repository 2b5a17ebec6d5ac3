"""The Python API for callers already inside an event loop (asyncio or trio, through anyio).

    result = await pipeline.aio.run("configs/sandbox.yaml")

Each function here takes the same arguments as the front door of the same name in
jobs.py (``pipeline.run`` and the others), returns the same result and raises the same
errors; it runs that front door in a worker thread (``anyio.to_thread.run_sync``), so
the caller's event loop goes on serving its other tasks meanwhile. In that thread no
signal handler is installed: stopping the process is the host's business.

Cancelling the awaiting task does not stop the work: a run goes on to the end (every
row recorded, its report written) and the cancellation takes effect once it has
returned, so the ledger never holds a run abandoned half-way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import anyio.to_thread

from pipeline import jobs
from pipeline.jobs import (
    ConfigSource,
    PollResult,
    ReconcileResult,
    RunResult,
    StatusResult,
)


async def run(config: ConfigSource, *, inputs: Sequence[str | os.PathLike[str]] = (),
              dry_run: bool = False, limit: int | None = None, force: bool = False,
              progress: bool = False, argv: Sequence[str] = ()) -> RunResult:
    """``pipeline.run`` (jobs.run) in a worker thread: the same arguments, result and errors."""
    return await anyio.to_thread.run_sync(functools.partial(
        jobs.run, config, inputs=inputs, dry_run=dry_run, limit=limit, force=force,
        progress=progress, argv=argv))


async def validate(config: ConfigSource, inputs: Sequence[str | os.PathLike[str]] = ()
                   ) -> RunResult:
    """``pipeline.validate`` (jobs.validate) in a worker thread."""
    return await anyio.to_thread.run_sync(jobs.validate, config, inputs)


async def reconcile(config: ConfigSource, run_id: str | None = None) -> ReconcileResult:
    """``pipeline.reconcile`` (jobs.reconcile) in a worker thread."""
    return await anyio.to_thread.run_sync(jobs.reconcile, config, run_id)


async def poll(config: ConfigSource, run_id: str | None = None) -> PollResult:
    """``pipeline.poll`` (jobs.poll) in a worker thread."""
    return await anyio.to_thread.run_sync(jobs.poll, config, run_id)


async def status(config: ConfigSource, *, config_path: str | None = None) -> StatusResult:
    """``pipeline.status`` (jobs.status) in a worker thread."""
    return await anyio.to_thread.run_sync(
        functools.partial(jobs.status, config, config_path=config_path))
