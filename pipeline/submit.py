"""Rows to send -> Cobalt, under a concurrency bound, a rate limit and the retry policy.

One dispatcher starts requests in waves. Each time request slots are free it
takes that many jobs (new ones, or retries whose time has come), marks them
``sending`` in the ledger together with the results that arrived since the
last wave, in one transaction, committed on the spot, and only then starts
their requests. So a row is durably ``sending`` before its request leaves,
and one commit serves a whole wave. (Commits are not handed to a worker
thread: under a busy event loop the thread's answer waits for the loop.)

Retry policy, by what the failure proves (errors.py; the rules in retry.py):
    NotApplied (connect error, 429, 503): back to ``pending``, retried with
        full-jitter backoff (honouring Retry-After) until max_attempts -> ``failed``
    OutcomeUnknown (timeout after sending, 5xx, connection lost, bad 2xx):
        ``ambiguous``, never resent unless submit.on_ambiguous is "resend"
    RequestRejected (other 4xx): ``api_rejected``, with Cobalt's message
    CredentialsRefused (401/403): back to ``pending``, and the run stops
A 429/503 pauses every request start until its Retry-After. A stop request
(signal, credentials, too many failures in a row) starts nothing new and lets
requests in flight finish, for at most submit.drain_timeout_s; rows not
started stay ``pending`` for the next run. A commit that fails for want of
disk space (StorageFull) is such a stop: the wave it would have marked
``sending`` is not started, and the results it held are tried once more at the end.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.config import SubmitConfig
from pipeline.errors import (
    ApiError,
    CredentialsRefused,
    NotApplied,
    OutcomeUnknown,
    RequestRejected,
    StorageFull,
)
from pipeline.retry import Backoff, Control, Pacer, RetryPolicy, retry_delay
from pipeline.state import Attempt, Status, utcnow

if TYPE_CHECKING:
    from pipeline.client import NoteAccepted

log = logging.getLogger(__name__)


_UNSURE: Final = "; an earlier attempt's outcome is unknown (the note may be stored)"


@dataclass(frozen=True, slots=True)
class Job:
    """One row to send: its ledger id and the normalised values."""

    row_id: int
    emr_task_id: str
    note: str
    skip: str | None = None  # set: record the row as failed with this reason, do not send


class NoteSender(Protocol):
    """What submit needs of a client (CobaltClient, or a test double of it)."""

    async def create_task_note(self, emr_task_id: str, note: str) -> NoteAccepted: ...


class AttemptRecorder(Protocol):
    """Where submit writes each wave: ``Ledger.apply`` (attempts first, then rows now sending)."""

    def apply(self, sending: Sequence[int], attempts: Sequence[Attempt]) -> None: ...


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


@dataclass(slots=True)
class SubmitStats:
    """What one submit stage did."""

    requests: int = 0
    retries: int = 0
    commits: int = 0
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


@dataclass(order=True, slots=True)
class _Retry:
    due: float
    order: int
    job: Job = field(compare=False)
    attempt: int = field(compare=False)


class Submitter:
    """Sends jobs; every state change goes to the ledger in the dispatcher's wave commits."""

    def __init__(
        self,
        client: NoteSender,
        ledger: AttemptRecorder,
        settings: SubmitConfig,
        *,
        control: Control | None = None,
        progress: Progress | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._settings = settings
        self.control = control or Control()
        self._progress = progress
        rate = settings.rate_per_second
        burst = min(settings.concurrency, math.ceil(rate * 0.05)) if rate else 1
        self._pacer = Pacer(rate, burst=burst)
        self._policy = RetryPolicy.of(settings, backoff=backoff,
                                      repeat_unknown=settings.on_ambiguous == "resend")
        self._results: list[Attempt] = []
        self._fresh: deque[Job] = deque()
        self._retries: list[_Retry] = []
        self._tiebreak = itertools.count()
        self._in_flight = 0
        self._changed = anyio.Event()
        self._source_done = False
        self._consecutive_failures = 0
        # Rows an attempt of which may have stored the note (on_ambiguous: resend): never
        # "provably not sent" again, whatever a later attempt says.
        self._unsure: set[int] = set()
        self.stats = SubmitStats()

    async def run(self, jobs: AsyncIterator[list[Job]]) -> SubmitStats:
        """Send every job (batches from ``jobs``) unless stopped; returns what happened."""
        self.stats.started = anyio.current_time()
        # Workers live for the whole stage and take started jobs from a stream: spawning a
        # task per request cost ~8% of the CPU (anyio's task and cancel-scope set-up).
        to_workers, from_dispatcher = anyio.create_memory_object_stream[tuple[Job, int]](
            math.inf)
        try:
            async with anyio.create_task_group() as requests, to_workers:
                requests.start_soon(self._drain_deadline, requests.cancel_scope)
                for _ in range(self._settings.concurrency):
                    requests.start_soon(self._worker, from_dispatcher.clone())
                from_dispatcher.close()
                await self._dispatch(jobs, to_workers)
                requests.cancel_scope.cancel()  # nothing is in flight: idle workers, watcher
        finally:
            self._commit([])  # results that came in after the last wave
            self.stats.finished = anyio.current_time()
        return self.stats

    # -- the dispatcher -------------------------------------------------------------------

    async def _dispatch(
        self, jobs: AsyncIterator[list[Job]], workers: MemoryObjectSendStream[tuple[Job, int]]
    ) -> None:
        while True:
            if self.control.stopped:
                await self._wait_for_in_flight()
                return
            wave = await self._next_wave(jobs)
            if wave is None:
                return
            if wave:
                self._launch(wave, workers)
            else:
                await self._wait_for_change()

    async def _next_wave(self, jobs: AsyncIterator[list[Job]]) -> list[tuple[Job, int]] | None:
        """Jobs to start now (as many as there are free slots), [] to wait, None when done."""
        free = self._settings.concurrency - self._in_flight
        if free <= 0:
            return []
        if not self._fresh and not self._source_done:
            self._source_done = not await self._refill(jobs)
        if not (self._fresh or self._retries or self._in_flight or not self._source_done):
            return None
        if self._pacer.resume_at > anyio.current_time():
            return []  # paused by a 429/503: wait for it (a stop can interrupt the wait)
        ready = self._fresh or (self._retries and self._retries[0].due <= anyio.current_time())
        if not ready:
            return []
        if self._pacer.limited:
            free = await self._pacer.wait_turn(free)  # the slots the rate limit allows now
        wave = self._due_retries(free)
        while self._fresh and len(wave) < free:
            wave.append((self._fresh.popleft(), 1))
        return wave

    async def _refill(self, jobs: AsyncIterator[list[Job]]) -> bool:
        try:
            batch = await anext(jobs)
        except StopAsyncIteration:
            return False
        for job in batch:
            if job.skip is not None:
                self._record(job, "failed", None, job.skip)
                self._done()
            else:
                self._fresh.append(job)
        return True

    def _due_retries(self, free: int) -> list[tuple[Job, int]]:
        now = anyio.current_time()
        wave: list[tuple[Job, int]] = []
        while self._retries and self._retries[0].due <= now and len(wave) < free:
            retry = heapq.heappop(self._retries)
            wave.append((retry.job, retry.attempt))
        return wave

    def _launch(self, wave: list[tuple[Job, int]],
                workers: MemoryObjectSendStream[tuple[Job, int]]) -> None:
        if not self._commit([job.row_id for job, _ in wave]):
            return  # not marked sending, so not sent: the rows stay pending in the ledger
        for started in wave:
            self._in_flight += 1
            workers.send_nowait(started)

    async def _worker(self, jobs: MemoryObjectReceiveStream[tuple[Job, int]]) -> None:
        async with jobs:
            async for job, attempt in jobs:
                await self._request(job, attempt)

    def _commit(self, sending: list[int]) -> bool:
        """One transaction: the results so far, then the rows about to be sent.

        False if the disk is full: the run stops, and the results stay here
        for the commit at the end of the stage to try again.
        """
        if not sending and not self._results:
            return True
        try:
            self._ledger.apply(sending, self._results)
        except StorageFull as exc:
            if self.control.storage_full is None:
                self.control.storage_full = exc
            self.control.stop(str(exc))
            return False
        self._results = []
        self.stats.commits += 1
        return True

    async def _wait_for_change(self) -> None:
        """Until a request ends, a job arrives, a retry falls due, or a stop is asked for."""
        self._commit([])  # nothing to start: make the results so far durable meanwhile
        wait = math.inf
        if self._retries:
            wait = max(0.0, self._retries[0].due - anyio.current_time())
        if self._pacer.resume_at > anyio.current_time():
            wait = min(wait, self._pacer.resume_at - anyio.current_time())
        self._changed = changed = anyio.Event()
        with self.control.also_setting(changed), anyio.move_on_after(wait):
            await changed.wait()

    async def _wait_for_in_flight(self) -> None:
        while self._in_flight:
            self._changed = anyio.Event()
            await self._changed.wait()

    async def _drain_deadline(self, requests: anyio.CancelScope) -> None:
        """After a stop request, requests in flight get drain_timeout_s to finish."""
        await self.control.stopping.wait()
        await anyio.sleep(self._settings.drain_timeout_s)
        requests.cancel()

    # -- one request ----------------------------------------------------------------------

    async def _request(self, job: Job, attempt: int) -> None:
        try:
            error = await self._attempt(job, attempt)
        finally:
            self._in_flight -= 1
            self._changed.set()
        if error is None:
            return
        delay = retry_delay(error, attempt, self._policy)
        if delay is None:
            self._finish(job, "ambiguous" if job.row_id in self._unsure else "failed", error,
                         f"gave up after {attempt} attempts: {error.message}"
                         + (_UNSURE if job.row_id in self._unsure else ""))
            return
        self._schedule_retry(job, attempt + 1, error, delay)

    async def _attempt(self, job: Job, attempt: int) -> ApiError | None:
        """One request. Returns the error if the row may be tried again, else None."""
        self.stats.requests += 1
        self.stats.retries += attempt > 1
        try:
            accepted = await self._client.create_task_note(job.emr_task_id, job.note)
        except anyio.get_cancelled_exc_class():
            self._record(job, "ambiguous", None, "cancelled while in flight (drain timeout)")
            raise
        except CredentialsRefused as exc:
            self._record(job, "pending", exc.http_status, exc.message)
            self.control.stop(f"credentials refused by Cobalt ({exc.own}); check "
                              "api.client_id, api.client_secret and api.access_token")
            return None
        except RequestRejected as exc:
            if job.row_id in self._unsure:  # refused now; an earlier attempt may have landed
                self._finish(job, "ambiguous", exc, exc.message + _UNSURE)
            else:
                self._finish(job, "api_rejected", exc, exc.message)
            return None
        except NotApplied as exc:
            self._record(job, "pending", exc.http_status, exc.message)
            return exc
        except OutcomeUnknown as exc:
            if self._settings.on_ambiguous == "resend":
                # Recorded ambiguous, not pending: if the run stops before the resend, or
                # every resend fails, the note may still be in the chart (evidence settles it).
                self._unsure.add(job.row_id)
                self._record(job, "ambiguous", exc.http_status, exc.message)
                return exc
            self._finish(job, "ambiguous", exc, exc.message)
            return None
        self._accepted(job, accepted)
        return None

    def _schedule_retry(self, job: Job, attempt: int, error: ApiError, delay: float) -> None:
        """Queue ``job``'s attempt number ``attempt`` ``delay`` seconds from now (retry_delay).

        A Retry-After is for everyone: every request start pauses that long, and
        this row comes back after it with a little jitter, so the herd does not
        return at once.
        """
        now = anyio.current_time()
        if error.retry_after is not None:
            self._pacer.pause_until(now + delay)
            delay = self._policy.backoff.delay(1)
        due = max(now + delay, self._pacer.resume_at)
        heapq.heappush(self._retries, _Retry(due, next(self._tiebreak), job, attempt))

    def _accepted(self, job: Job, accepted: NoteAccepted) -> None:
        self._results.append(Attempt(
            job.row_id, "accepted", accepted.http_status, accepted.task_note_id,
            accepted.job_id, None, utcnow(),
        ))
        self._consecutive_failures = 0
        self._done()

    def _finish(self, job: Job, status: Status, error: ApiError, message: str) -> None:
        self._record(job, status, error.http_status, message)
        self._consecutive_failures += 1
        self._done()
        limit = self._settings.max_consecutive_failures
        if self._consecutive_failures >= limit:
            # A stop reason travels far (summary.json, the run_ended log line, the
            # notification): our own words only, never Cobalt's text (a task id, a name).
            self.control.stop(f"{limit} rows in a row did not go through (last: {error.own}); "
                              "submit.max_consecutive_failures")

    def _record(self, job: Job, status: Status, http_status: int | None, error: str) -> None:
        self._results.append(Attempt(job.row_id, status, http_status, None, None, error,
                                     utcnow()))

    def _done(self) -> None:
        if self._progress is not None:
            self._progress.update(1)
