"""Rows to send -> Cobalt, under a concurrency bound, a rate limit and the retry policy.

Structure (anyio): one task group; a producer feeding a bounded memory
stream (so memory does not grow with the number of rows); ``concurrency``
workers; the ledger's group committer. For every row:

    wait for our turn (rate limit; a 429/503 pauses every worker)
    -> ledger: ``sending``, committed            (before the request leaves)
    -> POST /v1/tasks/notes
    -> ledger: the result, queued for the next group commit

Retry policy, by what the failure proves (errors.py):
    NotApplied (connect error, 429, 503): back to ``pending``, retried with
        full-jitter backoff (honouring Retry-After) until max_attempts -> ``failed``
    OutcomeUnknown (timeout after sending, 5xx, connection lost, bad 2xx):
        ``ambiguous``, never resent unless submit.on_ambiguous is "resend"
    RequestRejected (other 4xx): ``api_rejected``, with Cobalt's message
    CredentialsRefused (401/403): back to ``pending``, and the run stops
A first stop request (signal, credentials, too many failures in a row) lets
in-flight requests finish (bounded by submit.drain_timeout_s); rows not
started stay ``pending`` for the next run.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.client import NoteAccepted
from pipeline.config import SubmitConfig
from pipeline.errors import (
    ApiError,
    CredentialsRefused,
    NotApplied,
    OutcomeUnknown,
    RequestRejected,
)
from pipeline.ledger import Attempt, Committer, Status, utcnow

log = logging.getLogger(__name__)


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


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


@dataclass(slots=True)
class SubmitStats:
    """What one submit stage did."""

    sent: int = 0
    requests: int = 0
    retries: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def count(self, status: str) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


class Control:
    """Why and when to stop; shared by workers, the signal handler and the runner."""

    def __init__(self) -> None:
        self.stopping = anyio.Event()
        self.reason: str | None = None
        self.fatal = False

    def stop(self, reason: str, *, fatal: bool = True) -> None:
        """Start no new requests; the first reason given is the one reported."""
        if self.reason is None:
            self.reason = reason
            self.fatal = fatal
            log.warning("stopping: %s", reason)
        self.stopping.set()

    @property
    def stopped(self) -> bool:
        return self.stopping.is_set()


class Pacer:
    """Request starts: at most ``rate`` per second, evenly spaced, and a pause for everyone.

    Slots are handed out on a fixed grid (``next += 1/rate``), so sleeping late
    does not accumulate into a lower rate, and no burst ever exceeds one slot.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = anyio.current_time) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._next = -math.inf
        self.resume_at = -math.inf

    def pause_until(self, when: float) -> None:
        """Hold every worker until ``when`` (a 429/503's Retry-After)."""
        self.resume_at = max(self.resume_at, when)
        self._next = max(self._next, when)

    async def wait_turn(self) -> None:
        while True:
            now = self._clock()
            if self.resume_at > now:
                await anyio.sleep(self.resume_at - now)
                continue
            slot = max(now, self._next)
            self._next = slot + self._interval
            if slot > now:
                await anyio.sleep(slot - now)
            if self.resume_at <= self._clock():
                return


class Backoff:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**(attempt-1)))."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self._base, self._cap = base_s, cap_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def delay(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self._cap, self._base * 2 ** (attempt - 1)))


class Submitter:
    """Sends jobs; every state change goes through the ledger's committer."""

    def __init__(
        self,
        client: NoteSender,
        committer: Committer,
        settings: SubmitConfig,
        *,
        control: Control | None = None,
        progress: Progress | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._client = client
        self._committer = committer
        self._settings = settings
        self.control = control or Control()
        self._progress = progress
        self._pacer = Pacer(settings.rate_per_second)
        self._backoff = backoff or Backoff(settings.backoff_base_s, settings.backoff_max_s)
        self._consecutive_failures = 0
        self.stats = SubmitStats()

    async def run(self, jobs: AsyncIterator[list[Job]]) -> SubmitStats:
        """Send every job (batches from ``jobs``) unless stopped; returns what happened."""
        self.stats.started = anyio.current_time()
        send, receive = anyio.create_memory_object_stream[Job](self._settings.concurrency * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._committer.run)
            try:
                async with anyio.create_task_group() as work:
                    work.start_soon(self._drain_deadline, work.cancel_scope)
                    work.start_soon(self._produce, jobs, send)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self._settings.concurrency):
                            workers.start_soon(self._work, receive.clone())
                        receive.close()
                    work.cancel_scope.cancel()  # every worker is done: so is the deadline
            finally:
                self._committer.close()  # commits what is queued, then its task ends
        self.stats.finished = anyio.current_time()
        return self.stats

    async def _drain_deadline(self, work: anyio.CancelScope) -> None:
        """After a stop request, requests in flight get drain_timeout_s to finish."""
        await self.control.stopping.wait()
        await anyio.sleep(self._settings.drain_timeout_s)
        work.cancel()

    async def _produce(self, jobs: AsyncIterator[list[Job]], send: ObjectSendStream[Job]) -> None:
        async with send:
            try:
                async for batch in jobs:
                    for job in batch:
                        if self.control.stopped:
                            return
                        await send.send(job)
            except anyio.BrokenResourceError:  # every worker has stopped
                return

    async def _work(self, receive: ObjectReceiveStream[Job]) -> None:
        async with receive:
            async for job in receive:
                if self.control.stopped:
                    return
                await self._send(job)

    async def _send(self, job: Job) -> None:
        if job.skip is not None:
            self._record(job, "failed", None, job.skip)
            self._done("failed")
            return
        attempt = 0
        while True:
            attempt += 1
            await self._pacer.wait_turn()
            if self.control.stopped:
                return  # the row stays pending for the next run
            outcome = await self._attempt(job, attempt)
            if outcome is None or self.control.stopped:
                return
            if attempt >= self._settings.max_attempts:
                self._finish(job, "failed", outcome, f"gave up after {attempt} attempts: "
                             f"{outcome.message}")
                return
            await self._wait_before_retry(outcome, attempt)

    async def _attempt(self, job: Job, attempt: int) -> ApiError | None:
        """One request. Returns the error if the row may be tried again, else None."""
        await self._committer.sending(job.row_id)
        self.stats.requests += 1
        self.stats.retries += attempt > 1
        try:
            accepted = await self._client.create_task_note(job.emr_task_id, job.note)
        except anyio.get_cancelled_exc_class():
            self._record(job, "ambiguous", None, "cancelled while in flight (drain timeout)")
            raise
        except CredentialsRefused as exc:
            self._record(job, "pending", exc.http_status, exc.message)
            self.control.stop(f"credentials refused by Cobalt ({exc.message}); check "
                              "api.client_id, api.client_secret and api.access_token")
            return None
        except RequestRejected as exc:
            self._finish(job, "api_rejected", exc, exc.message)
            return None
        except NotApplied as exc:
            self._record(job, "pending", exc.http_status, exc.message)
            return exc
        except OutcomeUnknown as exc:
            if self._settings.on_ambiguous == "resend":
                self._record(job, "pending", exc.http_status, exc.message)
                return exc
            self._finish(job, "ambiguous", exc, exc.message)
            return None
        self._accepted(job, accepted)
        return None

    async def _wait_before_retry(self, error: ApiError, attempt: int) -> None:
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            pause = min(retry_after, self._settings.max_retry_after_s)
            self._pacer.pause_until(anyio.current_time() + pause)
            delay = self._backoff.delay(1)  # a little jitter, so the herd does not return at once
        else:
            delay = self._backoff.delay(attempt)
        with anyio.move_on_after(delay):
            await self.control.stopping.wait()

    def _accepted(self, job: Job, accepted: NoteAccepted) -> None:
        self._committer.record(Attempt(
            job.row_id, "accepted", accepted.http_status, accepted.task_note_id,
            accepted.job_id, None, utcnow(),
        ))
        self._consecutive_failures = 0
        self._done("accepted")

    def _finish(self, job: Job, status: Status, error: ApiError, message: str) -> None:
        self._record(job, status, error.http_status, message)
        self._consecutive_failures += 1
        self._done(status)
        limit = self._settings.max_consecutive_failures
        if self._consecutive_failures >= limit:
            self.control.stop(f"{limit} rows in a row did not go through (last: {message}); "
                              "submit.max_consecutive_failures")

    def _record(self, job: Job, status: Status, http_status: int | None, error: str) -> None:
        self._committer.record(Attempt(job.row_id, status, http_status, None, None, error,
                                       utcnow()))

    def _done(self, status: str) -> None:
        self.stats.sent += 1
        self.stats.count(status)
        if self._progress is not None:
            self._progress.update(1)
