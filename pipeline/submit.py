"""Rows to send -> Cobalt, under a concurrency bound, a rate limit and the retry policy.

One dispatcher starts requests in waves. Each time request slots are free it
takes that many jobs (new ones, or retries whose time has come), marks them
``sending`` in the ledger together with the results that arrived since the
last wave, in one transaction, committed on the spot, and only then starts
their requests. So a row is durably ``sending`` before its request leaves,
and one commit serves a whole wave. (Commits are not handed to a worker
thread: under a busy event loop the thread's answer waits for the loop.)
Where a commit is a round trip to a database server (PostgreSQL), a wave
gathers while requests are in flight, until an eighth of the slots are free
or GATHER_S has passed, so that one commit serves several answers.

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

Several accounts (``api.accounts``): each account is a lane with its own client
(its token), its own ``rate_per_second`` and ``concurrency`` under the global
ones, and its own pause: a 429/503 Retry-After pauses that account only. A
401/403 refuses that account only: its rows not yet answered end ``failed``
("account X: credentials refused ..."), the other accounts run to the end, and
``SubmitStats.refused`` names the refused accounts (the run then exits 3).
``submit.max_consecutive_failures`` counts each account's own streak: an account
whose rows keep failing (a 429 storm on one clinic) stops alone, its unsent rows
end ``failed`` naming it, ``SubmitStats.stopped`` names it, and the run exits 3.
With one account there is one lane, and a 401/403 stops the run as above.

Over 400 lines because the dispatcher, its lanes (one per account) and the bookkeeping
of each wave share one loop's state; split, that state would cross modules.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.config import AccountConfig, SubmitConfig
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
    account: str = ""  # api.accounts: whose token sends it ('' with a single account)


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
    refused: dict[str, str] = field(default_factory=dict)  # account -> why (api.accounts)
    # api.accounts: account -> the last error of the streak that stopped it
    stopped: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


@dataclass(order=True, slots=True)
class _Retry:
    due: float
    order: int
    job: Job = field(compare=False)
    attempt: int = field(compare=False)


# Jobs read ahead of sending at most (all lanes): a paused account's rows wait here while
# the others' are read past them; beyond this, reading waits for the pause to end.
READ_AHEAD = 10_000

# Group commit of the waves, where a commit is a round trip to a database server (the
# ledger's ``remote_commits``: PostgreSQL, 1-2 ms with the event loop waiting): with
# requests in flight, a wave starts once an eighth of the concurrency is free
# (``Submitter._min_wave``) or its first free slot has waited GATHER_S, so one commit
# serves several answers rather than one or two. The bound keeps a slow request in flight
# from holding the others' answers uncommitted. Not for SQLite: its commit costs less than
# the wait (bench/submit.py at 0 ms latency lost 10-15% with it).
GATHER_S: Final = 0.002


def remote_commits(ledger: object) -> bool:
    """Whether ``ledger``'s commits are round trips to a database server (its class says
    so with ``remote_commits = True``, as the PostgreSQL ledger does)."""
    return bool(getattr(ledger, "remote_commits", False))


@dataclass(slots=True)
class _Lane:
    """One account's queue: its jobs, retries, requests in flight, pace and refusal."""

    name: str
    pacer: Pacer
    concurrency: int
    fresh: deque[Job] = field(default_factory=deque)
    retries: list[_Retry] = field(default_factory=list)  # a heap, by due time
    in_flight: int = 0
    # set: its credentials were refused, or its rows kept failing; nothing more is sent
    refused: str | None = None
    failures: int = 0  # rows in a row that did not go through (api.accounts)

    def due(self, now: float) -> int:
        """Jobs that could start now, pace aside (fresh ones and retries fallen due)."""
        return len(self.fresh) + sum(1 for r in self.retries if r.due <= now)


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
        accounts: Mapping[str, AccountConfig] | None = None,
        clients: Mapping[str, NoteSender] | None = None,
    ) -> None:
        """``accounts`` (api.accounts): a lane per account, each job sent through
        ``clients[job.account]`` (``client`` for an account not in it)."""
        self._client = client
        self._clients = dict(clients or {})
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
        self._isolated = accounts is not None
        self._lanes: dict[str, _Lane] = {}
        if accounts is None:
            self._lanes[""] = _Lane("", self._pacer, settings.concurrency)
        for name, limits in (accounts or {}).items():
            self._lanes[name] = self._new_lane(name, limits)
        self._turn = 0  # which lane the next wave starts with: no account goes first always
        self._tiebreak = itertools.count()
        self._in_flight = 0
        self._min_wave = max(1, settings.concurrency // 8) if remote_commits(ledger) else 1
        self._gather_until: float | None = None  # while a wave gathers: until when
        self._changed = anyio.Event()
        self._source_done = False
        self._consecutive_failures = 0
        # Rows an attempt of which may have stored the note (on_ambiguous: resend): never
        # "provably not sent" again, whatever a later attempt says.
        self._unsure: set[int] = set()
        self.stats = SubmitStats()

    def _new_lane(self, name: str, limits: AccountConfig | None) -> _Lane:
        """An account's lane: its limits capped by the global ones."""
        rate = limits.rate_per_second if limits is not None else None
        concurrency = min(self._settings.concurrency,
                          (limits.concurrency if limits is not None else None)
                          or self._settings.concurrency)
        burst = min(concurrency, math.ceil(rate * 0.05)) if rate else 1
        return _Lane(name, Pacer(rate, burst=burst), concurrency)

    def _lane(self, job: Job) -> _Lane:
        lane = self._lanes.get(job.account) or self._lanes.get("")
        if lane is None:  # an account the settings did not name: the global limits only
            lane = self._lanes[job.account] = self._new_lane(job.account, None)
        return lane

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
        if self._in_flight and free < self._min_wave:  # gather (GATHER_S)
            now = anyio.current_time()
            if self._gather_until is None:
                self._gather_until = now + GATHER_S
            if now < self._gather_until:
                return []
        self._gather_until = None
        if not self._source_done and self._read_more():
            self._source_done = not await self._refill(jobs)
        lanes = list(self._lanes.values())
        if self._source_done and not self._in_flight and not any(
                lane.fresh or lane.retries for lane in lanes):
            return None
        now = anyio.current_time()
        self._turn = (self._turn + 1) % len(lanes)
        wave: list[tuple[Job, int]] = []
        for lane in lanes[self._turn:] + lanes[:self._turn]:
            room = min(free - len(wave), lane.concurrency - lane.in_flight)
            if room <= 0 or lane.refused is not None or lane.pacer.resume_at > now:
                continue  # full, refused, or paused by a 429/503 (a stop interrupts the wait)
            wanted = min(room, lane.due(now))
            if wanted:
                wave += self._take(lane, self._grant(lane, wanted), now)
        return wave

    def _grant(self, lane: _Lane, wanted: int) -> int:
        """How many of ``wanted`` starts the lane's pace and the global one allow now."""
        granted = self._pacer.take(wanted)
        if lane.pacer is self._pacer or not granted:
            return granted
        allowed = lane.pacer.take(granted)
        self._pacer.give_back(granted - allowed)
        return allowed

    def _take(self, lane: _Lane, n: int, now: float) -> list[tuple[Job, int]]:
        """Up to ``n`` of the lane's jobs: retries fallen due first, then fresh ones."""
        wave: list[tuple[Job, int]] = []
        while lane.retries and lane.retries[0].due <= now and len(wave) < n:
            retry = heapq.heappop(lane.retries)
            wave.append((retry.job, retry.attempt))
        while lane.fresh and len(wave) < n:
            wave.append((lane.fresh.popleft(), 1))
        return wave

    def _read_more(self) -> bool:
        """Read more jobs: no lane that may start one has any, and the read-ahead has room."""
        now = anyio.current_time()
        buffered = 0
        for lane in self._lanes.values():
            if lane.fresh and lane.refused is None and lane.pacer.resume_at <= now:
                return False
            buffered += len(lane.fresh)
        return buffered < READ_AHEAD

    async def _refill(self, jobs: AsyncIterator[list[Job]]) -> bool:
        """Read batches until one queues a job to send; False once the source is done.

        A batch whose jobs are all recorded without sending (skipped, or of a refused
        account) queues nothing: reading on, rather than waiting for a change that
        nothing in flight would bring, is what keeps the stage from waiting forever.
        """
        while True:
            try:
                batch = await anext(jobs)
            except StopAsyncIteration:
                return False
            queued = False
            for job in batch:
                lane = self._lane(job)
                if job.skip is not None:
                    self._record(job, "failed", None, job.skip)
                    self._done()
                elif lane.refused is not None:
                    self._record(job, "failed", None, lane.refused)
                    self._done()
                else:
                    lane.fresh.append(job)
                    queued = True
            if queued:
                return True

    def _launch(self, wave: list[tuple[Job, int]],
                workers: MemoryObjectSendStream[tuple[Job, int]]) -> None:
        if not self._commit([job.row_id for job, _ in wave]):
            return  # not marked sending, so not sent: the rows stay pending in the ledger
        for started in wave:
            self._in_flight += 1
            self._lane(started[0]).in_flight += 1
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
        """Until a request ends, a job arrives, a retry falls due, or a stop is asked for
        (or, while a wave gathers, its time is up: the results then go with that wave)."""
        if self._gather_until is None:
            self._commit([])  # nothing to start: make the results so far durable meanwhile
            wait = self._next_start() - anyio.current_time()
        else:
            wait = self._gather_until - anyio.current_time()
        self._changed = changed = anyio.Event()
        with self.control.also_setting(changed), anyio.move_on_after(wait):
            await changed.wait()

    def _next_start(self) -> float:
        """When (clock seconds) a lane may next start a job: a retry falls due, a pause or
        a rate-limit slot ends. inf: only a request's end (or a new job) can change that."""
        if self._in_flight >= self._settings.concurrency:
            return math.inf
        now = anyio.current_time()
        wake = math.inf
        for lane in self._lanes.values():
            if lane.refused is not None or lane.in_flight >= lane.concurrency:
                continue
            if lane.fresh:
                start = now
            elif lane.retries:
                start = lane.retries[0].due
            else:
                continue
            start = max(start, lane.pacer.next_at(), self._pacer.next_at())
            wake = min(wake, start)
        return max(wake, now)

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
        lane = self._lane(job)
        try:
            error = await self._attempt(job, attempt)
        finally:
            self._in_flight -= 1
            lane.in_flight -= 1
            self._changed.set()
        if error is None:
            return
        if lane.refused is not None:  # refused while this one was in flight: not sent again
            self._record(job, "failed", error.http_status, lane.refused)
            self._done()
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
        client = self._clients.get(job.account, self._client)
        try:
            accepted = await client.create_task_note(job.emr_task_id, job.note)
        except anyio.get_cancelled_exc_class():
            self._record(job, "ambiguous", None, "cancelled while in flight (drain timeout)")
            raise
        except CredentialsRefused as exc:
            self._credentials_refused(job, exc)
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
        lane = self._lane(job)
        if error.retry_after is not None:  # the account's pause (everyone's with one account)
            lane.pacer.pause_until(now + delay)
            delay = self._policy.backoff.delay(1)
        due = max(now + delay, lane.pacer.resume_at)
        heapq.heappush(lane.retries, _Retry(due, next(self._tiebreak), job, attempt))

    def _credentials_refused(self, job: Job, exc: CredentialsRefused) -> None:
        """One account: the run stops (the row stays pending). Several: that account's."""
        if self._isolated:
            self._refuse(self._lane(job), job, exc)
            return
        self._record(job, "pending", exc.http_status, exc.message)
        self.control.stop(f"credentials refused by Cobalt ({exc.own}); check "
                          "api.client_id, api.client_secret and api.access_token")

    def _refuse(self, lane: _Lane, job: Job, exc: CredentialsRefused) -> None:
        """Cobalt refused an account's credentials: this row and every row of the account
        not yet sent end ``failed`` saying so; the other accounts go on."""
        if lane.refused is None:
            self.stats.refused[lane.name] = exc.own
            log.warning("account %s: credentials refused (%s); its other rows are not sent",
                        lane.name, exc.own)
            self._close(lane, f"account {lane.name}: credentials refused by Cobalt "
                              f"({exc.own}); nothing more was sent for it; check "
                              f"api.accounts.{lane.name}.access_token")
        self._record(job, "failed", exc.http_status, lane.refused or "")
        self._done()

    def _close(self, lane: _Lane, message: str) -> None:
        """Send nothing more for ``lane``'s account: its rows not yet sent (queued, or
        waiting for a retry) end ``failed`` with ``message``."""
        lane.refused = message
        unsent = [*lane.fresh, *(r.job for r in lane.retries)]
        lane.fresh.clear()
        lane.retries.clear()
        for other in unsent:
            self._record(other, "failed", None, lane.refused)
            self._done()

    def _accepted(self, job: Job, accepted: NoteAccepted) -> None:
        self._results.append(Attempt(
            job.row_id, "accepted", accepted.http_status, accepted.task_note_id,
            accepted.job_id, None, utcnow(),
        ))
        self._consecutive_failures = 0
        self._lane(job).failures = 0
        self._done()

    def _finish(self, job: Job, status: Status, error: ApiError, message: str) -> None:
        self._record(job, status, error.http_status, message)
        self._consecutive_failures += 1
        self._done()
        limit = self._settings.max_consecutive_failures
        if self._isolated:  # each account's own streak stops that account alone
            lane = self._lane(job)
            lane.failures += 1
            if lane.failures >= limit and lane.refused is None:
                self.stats.stopped[lane.name] = error.own
                log.warning("account %s: %d rows in a row did not go through (last: %s); "
                            "its other rows are not sent", lane.name, limit, error.own)
                self._close(lane, f"account {lane.name}: {limit} rows in a row did not go "
                                  f"through (last: {error.own}); nothing more was sent for "
                                  "it; submit.max_consecutive_failures")
        elif self._consecutive_failures >= limit:
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
