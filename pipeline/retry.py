"""The one retry policy: when a failed request to Cobalt is asked again, and how soon.

Both stages that talk to Cobalt use it: submit.py (``POST /v1/tasks/notes``)
and polling.py (``GET /v1/webhook-events``). What a failure proves decides
whether it may be repeated (errors.py):

- ``CredentialsRefused`` (401/403), ``RequestRejected`` (other 4xx): never;
  asking again cannot help.
- ``NotApplied`` (connect error, 429, 503): always; the request provably did
  not take effect.
- ``OutcomeUnknown`` (timeout after sending, 5xx, lost answer, bad 2xx): only
  when repeating it is harmless, ``RetryPolicy.repeat_unknown``: a GET is
  safe to repeat (RFC 9110 §9.2.2); a POST only with ``submit.on_ambiguous:
  resend``.

How soon (``retry_delay``): a 429's or 503's ``Retry-After`` (RFC 9110
§10.2.3), capped at ``submit.max_retry_after_s``; else full-jitter
exponential backoff (``Backoff``). At most ``submit.max_attempts`` attempts.

Also here: ``Pacer`` (request starts per second, and a pause for everyone)
and ``Control`` (why and when to stop), shared by submit, poll, the sandbox
and the runner.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio

from pipeline.config import SubmitConfig
from pipeline.errors import (
    ApiError,
    CredentialsRefused,
    OutcomeUnknown,
    RequestRejected,
    StorageFull,
)

log = logging.getLogger(__name__)


class Control:
    """Why and when to stop; shared by the dispatcher, the signal handler and the runner."""

    def __init__(self) -> None:
        self.stopping = anyio.Event()
        self.reason: str | None = None
        self.fatal = False
        self.storage_full: StorageFull | None = None  # set: the stop is for a full disk
        self._also_set: set[anyio.Event] = set()

    def stop(self, reason: str, *, fatal: bool = True) -> None:
        """Start no new requests; the first reason given is the one reported."""
        if self.reason is None:
            self.reason = reason
            self.fatal = fatal
            log.warning("stopping: %s", reason)
        self.stopping.set()
        for event in self._also_set:
            event.set()

    @contextlib.contextmanager
    def also_setting(self, event: anyio.Event) -> Iterator[None]:
        """While the block runs, a stop sets ``event`` too (at once if already stopped).

        A task waiting for "this or a stop" then waits on one event, without a
        helper task to relay the stop: the dispatcher wakes in the loop iteration
        after a request ends, not three iterations later.
        """
        if self.stopping.is_set():
            event.set()
        self._also_set.add(event)
        try:
            yield
        finally:
            self._also_set.discard(event)

    @property
    def stopped(self) -> bool:
        return self.stopping.is_set()


class Pacer:
    """Request starts: at most ``rate`` per second on average, and a pause for everyone.

    Slots lie on a fixed grid (``next += 1/rate``), so waking late does not
    lower the rate: a late caller may take the slots it missed at once, up to
    ``burst`` of them (50 ms worth, never more than the concurrency bound).
    ``rate`` None: no limit. ``clock``: seconds, monotonic (anyio's by default).
    """

    def __init__(self, rate: float | None, *, burst: int = 1,
                 clock: Callable[[], float] = anyio.current_time) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._burst = max(1, burst)
        self._clock = clock
        self._next = -math.inf
        self.resume_at = -math.inf

    def pause_until(self, when: float) -> None:
        """Hold every request start until ``when`` (clock seconds; a 429/503's Retry-After)."""
        self.resume_at = max(self.resume_at, when)
        self._next = max(self._next, when)

    async def wait_turn(self, wanted: int = 1) -> int:
        """Wait for the next slot; returns how many starts may go now (1 to ``wanted``)."""
        while True:
            granted = self.take(wanted)
            if granted:
                return granted
            await anyio.sleep(max(0.0, self.next_at() - self._clock()))

    def take(self, wanted: int = 1) -> int:
        """The starts that may go now (0 to ``wanted``), without waiting; 0 while paused."""
        now = self._clock()
        if self.resume_at > now:
            return 0
        if not self._interval:
            return wanted
        earliest = now - (self._burst - 1) * self._interval  # missed slots still usable
        self._next = max(self._next, earliest)
        if self._next > now:
            return 0
        granted = min(wanted, int((now - self._next) / self._interval) + 1)
        self._next += granted * self._interval
        return granted

    def give_back(self, n: int) -> None:
        """Return ``n`` starts ``take`` granted but that were not used."""
        if n > 0 and self._interval:
            self._next -= n * self._interval

    def next_at(self) -> float:
        """When (clock seconds) ``take`` may next grant a start."""
        return max(self.resume_at, self._next)


class Backoff:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**(attempt-1))) seconds.

    ``base_s``, ``cap_s``: seconds (``submit.backoff_base_s``, ``submit.backoff_max_s``).
    ``rng``: the source of the jitter (a seeded one makes a test reproducible).
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self._base, self._cap = base_s, cap_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 = the first)."""
        return self._rng.uniform(0, min(self._cap, self._base * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What ``retry_delay`` needs: attempts, backoff, the Retry-After cap, what may repeat.

    ``max_attempts``: attempts in all, the first included. ``max_retry_after_s``:
    the longest a Retry-After is honoured, in seconds. ``repeat_unknown``: an
    ``OutcomeUnknown`` may be asked again (a safe method, or a resend asked for).
    """

    max_attempts: int
    backoff: Backoff
    max_retry_after_s: float
    repeat_unknown: bool = False

    @classmethod
    def of(cls, settings: SubmitConfig, *, repeat_unknown: bool,
           backoff: Backoff | None = None) -> RetryPolicy:
        """The policy the ``submit`` section of the config describes."""
        return cls(settings.max_attempts,
                   backoff or Backoff(settings.backoff_base_s, settings.backoff_max_s),
                   settings.max_retry_after_s, repeat_unknown)


def retry_delay(error: ApiError, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before asking again after ``attempt`` (1-based) failed with ``error``.

    None: do not ask again (the error is final, or ``policy.max_attempts`` are
    used up). Otherwise the error's Retry-After (RFC 9110 §10.2.3: the server
    says how long to wait), capped at ``policy.max_retry_after_s``; without
    one, ``policy.backoff.delay(attempt)``. Raises nothing.
    """
    if isinstance(error, CredentialsRefused | RequestRejected):
        return None
    if isinstance(error, OutcomeUnknown) and not policy.repeat_unknown:
        return None
    if attempt >= policy.max_attempts:
        return None
    if error.retry_after is not None:
        return float(min(error.retry_after, policy.max_retry_after_s))
    return policy.backoff.delay(attempt)
