"""Outcomes for jobs still unresolved, fetched by ``GET /v1/webhook-events``, into the sink file.

Webhooks can be lost for good (Cobalt retries a delivery once, never after a
timeout), so ``tasknotes poll`` asks for the events of accepted rows that
still have no outcome. With few such jobs it asks per ``job_id``; with many
(a batch of thousands) it pages through ``task_note.created`` and
``task_note.failed`` by date, 100 at a time, and matches job ids locally, as
Cobalt suggests. Each event is turned back into the webhook envelope shape
and appended with the sink's de-duplication, so a later webhook or a second
poll adds nothing twice. GETs are safe to repeat (RFC 9110 §9.2.2), so any
failure but a refusal (401/403, another 4xx) is retried through stamina with
exponential backoff and jitter, up to ``submit.max_attempts`` tries, under the
same rate limit as sending; a 429's or 503's ``Retry-After`` replaces the
backoff (capped at ``submit.max_retry_after_s``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import stamina

from pipeline.client import CobaltClient, EventsPage
from pipeline.config import RunConfig
from pipeline.errors import ApiError, CredentialsRefused, RequestRejected, RunAborted
from pipeline.events import SinkFile, compact_json, envelope_from_list_item
from pipeline.submit import Pacer

log = logging.getLogger(__name__)

EVENT_TYPES = ("task_note.created", "task_note.failed")


@dataclass(slots=True)
class PollStats:
    wanted: int = 0
    requests: int = 0
    seen: int = 0
    stored: int = 0
    duplicates: int = 0
    still_missing: int = 0


class Poller:
    """Fetches the outcome events of ``job_ids`` and appends the missing ones to ``sink``."""

    def __init__(self, config: RunConfig, client: CobaltClient, sink: SinkFile) -> None:
        self._config = config
        self._client = client
        self._sink = sink
        self._pacer = Pacer(config.submit.rate_per_second)
        self.stats = PollStats()

    async def run(self, job_ids: set[str], since: str | None) -> PollStats:
        """Poll for ``job_ids``; ``since`` (ISO time) bounds the date range when paging."""
        self.stats.wanted = len(job_ids)
        found: set[str] = set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sink.run)
            try:
                async for item in self._items(job_ids, since):
                    await self._take(item, job_ids, found)
            finally:
                self._sink.stop()
        self.stats.still_missing = len(job_ids - found)
        return self.stats

    async def _items(self, job_ids: set[str], since: str | None
                     ) -> AsyncIterator[dict[str, Any]]:
        if len(job_ids) <= self._config.poll.per_job_below:
            for job_id in sorted(job_ids):
                async for item in self._pages({"job_id": job_id}):
                    yield item
            return
        start, end = _date_range(since)
        for event_type in EVENT_TYPES:
            query = {"event_type": event_type, "start_date": start, "end_date": end,
                     "sort": "asc"}
            async for item in self._pages(query):
                yield item

    async def _pages(self, query: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        page = 1
        while True:
            result = await self._get({**query, "page": page,
                                      "page_size": self._config.poll.page_size})
            for item in result.events:
                yield item
            if page >= result.total_pages or not result.events:
                return
            page += 1

    async def _get(self, query: dict[str, Any]) -> EventsPage:
        """One page, retried while retrying can help; RunAborted once it cannot."""
        settings = self._config.submit
        tries = 0
        try:
            async for attempt in stamina.retry_context(
                    on=self._worth_retrying, attempts=settings.max_attempts, timeout=None,
                    wait_initial=settings.backoff_base_s, wait_max=settings.backoff_max_s,
                    wait_jitter=settings.backoff_base_s):
                with attempt:
                    tries = attempt.num
                    await self._pacer.wait_turn()
                    self.stats.requests += 1
                    return await self._client.webhook_events(**query)
        except CredentialsRefused as exc:
            raise RunAborted(f"credentials refused by Cobalt ({exc.message})") from None
        except RequestRejected as exc:
            raise RunAborted(f"Cobalt refused the events query ({exc.message})") from None
        except ApiError as exc:
            raise RunAborted(f"polling failed after {tries} attempt{'s' * (tries != 1)}: "
                             f"{exc.message}") from None
        raise AssertionError("unreachable: stamina re-raises the last failure")

    def _worth_retrying(self, exc: Exception) -> bool | float:
        """stamina's hook: False to give up, True to back off, seconds to wait as told."""
        if not isinstance(exc, ApiError) or isinstance(exc, CredentialsRefused | RequestRejected):
            return False
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is None:
            return True  # a GET changes nothing: a 5xx, a timeout or a lost answer may be retried
        return float(min(retry_after, self._config.submit.max_retry_after_s))

    async def _take(self, item: dict[str, Any], job_ids: set[str], found: set[str]) -> None:
        self.stats.seen += 1
        job_id = None if item.get("job_id") is None else str(item["job_id"])
        if job_id not in job_ids or item.get("event_type") not in EVENT_TYPES:
            return
        envelope = envelope_from_list_item(item)
        if not isinstance(envelope["id"], str):
            return
        found.add(job_id)
        verdict = await self._sink.append(compact_json(envelope), envelope["id"])
        if verdict == "stored":
            self.stats.stored += 1
        else:
            self.stats.duplicates += 1


def _date_range(since: str | None, today: datetime | None = None) -> tuple[str, str]:
    """start_date, end_date (YYYY-MM-DD, UTC): ``since`` to today, with a day of slack."""
    today = today or datetime.now(UTC)
    start = today
    if since:
        try:
            start = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            start = today - timedelta(days=7)
    return ((start - timedelta(days=1)).strftime("%Y-%m-%d"),
            (today + timedelta(days=1)).strftime("%Y-%m-%d"))
