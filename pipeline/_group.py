"""Group commit: many callers, one durable write per batch, off the event loop.

Used by the sink file (an event on disk before its 2xx). While one batch is
being written in a worker thread, the next one gathers, so the cost of an
fsync is shared by everything that arrived meanwhile. (The submit stage
commits its waves on the event loop instead: there, a thread's round trip
under load cost more than the commit; see submit.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class _Batch(Generic[T]):
    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Collects items and hands each batch to ``commit`` in a worker thread.

    ``await put(item)`` returns once the batch holding the item is committed,
    or raises the commit's exception.
    ``run()`` is the loop (start it in a task group); after ``close()`` it
    commits what is queued and returns. With ``stop_on_error`` a failed commit
    also ends ``run()`` with that exception.
    """

    def __init__(self, commit: Callable[[list[T]], None], *, stop_on_error: bool = True) -> None:
        self._commit = commit
        self._stop_on_error = stop_on_error
        self._batch: _Batch[T] = _Batch()
        self._wake = anyio.Event()
        self._closed = False

    async def put(self, item: T) -> None:
        batch = self._batch
        batch.items.append(item)
        self._wake.set()
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._batch.items:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            batch, self._batch = self._batch, _Batch()
            try:
                await anyio.to_thread.run_sync(self._commit, batch.items)
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                batch.error = exc
            batch.done.set()
            if batch.error is not None and self._stop_on_error:
                raise batch.error
