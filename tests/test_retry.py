"""The one retry policy (retry.py): what is asked again, and after how long."""

from __future__ import annotations

import random

import pytest

from pipeline.errors import (
    ApiError,
    CredentialsRefused,
    NotSent,
    RateLimited,
    RequestRejected,
    ServerError,
    Unavailable,
)
from pipeline.retry import Backoff, RetryPolicy, retry_delay


class _Longest(random.Random):
    """Jitter that always draws the top of its range: the backoff's ceiling, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _policy(*, repeat_unknown: bool = False, attempts: int = 5) -> RetryPolicy:
    return RetryPolicy(attempts, Backoff(0.5, 4.0, _Longest()), max_retry_after_s=10.0,
                       repeat_unknown=repeat_unknown)


@pytest.mark.parametrize("error", [CredentialsRefused("HTTP 401", http_status=401),
                                   RequestRejected("HTTP 400", http_status=400)])
def test_a_refusal_is_never_asked_again(error: ApiError) -> None:
    assert retry_delay(error, 1, _policy(repeat_unknown=True)) is None


def test_an_unknown_outcome_is_asked_again_only_when_repeating_is_harmless() -> None:
    """A 5xx after sending may have stored the note: a POST holds it, a GET asks again."""
    error = ServerError("HTTP 500", http_status=500)
    assert retry_delay(error, 1, _policy()) is None
    assert retry_delay(error, 1, _policy(repeat_unknown=True)) == 0.5


def test_backoff_doubles_to_its_cap_and_stops_at_max_attempts() -> None:
    error = NotSent("connect error")
    delays = [retry_delay(error, n, _policy(attempts=6)) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, None]


def test_retry_after_replaces_the_backoff_up_to_its_cap() -> None:
    """RFC 9110 §10.2.3: wait as told, but never longer than max_retry_after_s."""
    assert retry_delay(RateLimited("HTTP 429", retry_after=3.0), 4, _policy()) == 3.0
    assert retry_delay(Unavailable("HTTP 503", retry_after=86400.0), 1, _policy()) == 10.0
    assert retry_delay(RateLimited("HTTP 429", retry_after=3.0), 5, _policy()) is None
