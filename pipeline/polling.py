"""Outcomes for jobs still unresolved, fetched by ``GET /v1/webhook-events``, into the sink file.

Webhooks can be lost for good (Cobalt retries a delivery once, never after a
timeout), so ``tasknotes poll`` asks for the events of accepted rows that
still have no outcome. With few such jobs it asks per ``job_id``; with many
(a batch of thousands) it pages through ``task_note.created`` and
``task_note.failed`` by date, 100 at a time, and matches job ids locally, as
Cobalt suggests. An ambiguous row (no answer came back, so no job id) is
looked for the same way, by date from its send: a ``task_note.created`` event
carrying its note for its task (the same ledger key) is stored, and
reconcile's evidence rule settles the row with it.
Each event is turned back into the webhook envelope shape
and appended with the sink's de-duplication, so a later webhook or a second
poll adds nothing twice. GETs are safe to repeat (RFC 9110 §9.2.2), so any
failure but a refusal (401/403, another 4xx) is retried under the retry policy
of retry.py: full-jitter exponential backoff, up to ``submit.max_attempts``
tries, under the same rate limit as sending; a 429's or 503's ``Retry-After``
replaces the backoff (capped at ``submit.max_retry_after_s``). Each retry is
one INFO line naming the query, the failure and the wait.

Cobalt's reference page for the endpoint exists in two revisions with
different item shapes (docs.usecobalt.com, api-reference/webhook-events/get);
``read_list_item`` reads both. A page holding an item of neither shape stops
the poll with an error naming the fields found, rather than paging through
every event and recovering nothing in silence. So does a page whose
pagination numbers are not integers in range (``client.MAX_PAGES``; the
error names the field and its JSON type, never the value) or that is not
the page asked for: paging ends by itself. No status filter
(``delivery_status`` in one revision, ``status`` in the other) is sent: an
event Cobalt counts as delivered may still be missing from this sink (a
receiver that acknowledged and then lost it, another registered URL), so
every outcome event of a wanted job is read.

Several accounts (``api.accounts``): an access token sees its own EHR
connection's events only, so each account is polled with its own token for its
own jobs and ambiguous notes (``poll_accounts``), at its own
``rate_per_second`` under the global one, all accounts at once. An account
whose poll stops (credentials refused, Cobalt kept failing, a page it cannot
read) stops alone: the others are polled to the end, and
``PollStats.stopped`` names it and says why (the command then exits 3). An
event is stored as Cobalt lists it, ``access_token_reference_id`` included,
so one naming another account's connection stays a conflict for reconcile.

Over 400 lines because the two shapes of Cobalt's events list, their paging, the
retry policy's use and the per-account polling (each account's token, jobs and rate)
belong to one conversation with one endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.client import CobaltClient, EventsPage
from pipeline.config import RunConfig
from pipeline.errors import (
    ApiError,
    CredentialsRefused,
    RequestRejected,
    RunAborted,
    StorageFull,
)
from pipeline.events import UnreadableEvent, check_event_id, encode_event
from pipeline.redaction import safe_id
from pipeline.retry import Pacer, RetryPolicy, retry_delay
from pipeline.state import row_key

if TYPE_CHECKING:
    from pipeline.sink import EventStore

log = logging.getLogger(__name__)

EVENT_TYPES = ("task_note.created", "task_note.failed")


# The two documented item shapes of GET /v1/webhook-events: (event id, type, created) keys.
SHAPES: dict[str, tuple[str, str, str]] = {
    "event_id": ("event_id", "event_type", "created_at"),
    "envelope": ("id", "type", "created"),
}


class UnreadableItem(ValueError):
    """One list item of neither documented shape (the message names its fields only)."""


class UnreadableEvents(RunAborted):
    """A page of ``GET /v1/webhook-events`` holds an item of neither documented shape (exit 3)."""


def read_list_item(item: object) -> tuple[dict[str, Any], str | None]:
    """One ``GET /v1/webhook-events`` item of either documented shape, as a webhook envelope.

    Returns ``(envelope, delivery)``: the envelope has the keys and key order
    of a delivered webhook (``id, access_token_reference_id, object,
    created, type, job_id, data``; ``job_id`` a string or None) and
    ``delivery`` is Cobalt's delivery status (``success``/``failed``/
    ``pending``) or None when the item does not say. The shapes, from the two
    revisions of Cobalt's reference page (api-reference/webhook-events/get):

    - ``event_id, event_type, created_at, delivery_status, webhook_url,
      job_id, access_token_reference_id, data``;
    - ``id, type, created, status, delivered, delivery_attempts, ...,
      job_id, access_token_reference_id, object, data``.

    Raises UnreadableItem, a ValueError (message: the item's field names, never its values)
    when the item is not an object, has neither shape's id and type as
    text, or is a ``task_note.*`` event whose ``data`` is not an object.
    """
    if not isinstance(item, dict):
        raise UnreadableItem(f"an item is a JSON {type(item).__name__}, not an object")
    shape = _shape_of(item)
    if shape is None:
        raise UnreadableItem(f"an item has fields {_fields(item)}")
    id_key, type_key, created_key = SHAPES[shape]
    event_id, event_type = item[id_key], item[type_key]
    data = item.get("data")
    if event_type in EVENT_TYPES and not isinstance(data, dict):
        raise UnreadableItem(f"a {event_type} item has no data object (fields {_fields(item)})")
    job_id = item.get("job_id")
    delivery = item.get("delivery_status") if shape == "event_id" else item.get("status")
    if delivery is None and isinstance(item.get("delivered"), bool):
        delivery = "success" if item["delivered"] else "failed"
    envelope = {
        "id": event_id,
        "access_token_reference_id": item.get("access_token_reference_id"),
        "object": "event",
        "created": item.get(created_key),
        "type": event_type,
        "job_id": None if job_id is None else str(job_id),
        "data": data if isinstance(data, dict) else {},
    }
    return envelope, delivery if isinstance(delivery, str) else None


def _shape_of(item: dict[str, Any]) -> str | None:
    """The first shape whose id and type keys both hold non-empty text, else None."""
    for shape, (id_key, type_key, _) in SHAPES.items():
        event_id, event_type = item.get(id_key), item.get(type_key)
        if isinstance(event_id, str) and event_id and isinstance(event_type, str) and event_type:
            return shape
    return None


def _fields(item: dict[str, Any]) -> str:
    names = sorted(str(k)[:40] for k in item)
    shown = ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")
    return shown or "(none)"


def read_page(items: list[Any], query: dict[str, Any]) -> list[tuple[dict[str, Any], str | None]]:
    """Every item of one page through ``read_list_item``, or UnreadableEvents for the page.

    The whole page is checked before any of it is used, and the error names
    the page, the query and what was found, never an item's values.
    """
    read = []
    for number, item in enumerate(items, start=1):
        try:
            read.append(read_list_item(item))
        except UnreadableItem as exc:
            where = _where(query)
            expected = " or ".join("/".join(keys) for keys in SHAPES.values())
            raise UnreadableEvents(
                f"GET /v1/webhook-events ({where}): item {number} of {len(items)} cannot be "
                f"read: {exc}; expected {expected} (nothing taken from this page)") from None
    return read


def _where(query: dict[str, Any]) -> str:
    """The filters and page of an events query, for an error message (our values only)."""
    return ", ".join(f"{k}={v}" for k, v in query.items() if k != "page_size")


@dataclass(slots=True)
class PollStats:
    """What one poll did: jobs wanted, GETs made, events seen, stored and already there.

    ``delivered_but_missing`` counts stored events that Cobalt lists as
    delivered: a receiver acknowledged them, yet the sink did not have them.
    ``ambiguous``: notes of ambiguous rows looked for; ``ambiguous_found``: how
    many of them a ``task_note.created`` event carries (stored or already there).
    """

    wanted: int = 0
    requests: int = 0
    seen: int = 0
    stored: int = 0
    duplicates: int = 0
    still_missing: int = 0
    delivered_but_missing: int = 0
    ambiguous: int = 0
    ambiguous_found: int = 0
    # api.accounts: account -> why its poll stopped (the others were polled to the end)
    stopped: dict[str, str] = field(default_factory=dict)
    # api.accounts: account -> its jobs and ambiguous notes not asked about (credentials
    # refused before any was); not counted in ``wanted`` and ``ambiguous``
    not_polled: dict[str, int] = field(default_factory=dict)

    def add(self, other: PollStats) -> None:
        """Add ``other``'s counts (and the accounts it stopped) to these."""
        for each in fields(self):
            if each.name not in ("stopped", "not_polled"):
                setattr(self, each.name, getattr(self, each.name) + getattr(other, each.name))
        self.stopped.update(other.stopped)
        self.not_polled.update(other.not_polled)


@dataclass(frozen=True, slots=True)
class Wanted:
    """What one poll looks for: ``job_ids`` (accepted rows without an outcome), ``keys``
    (ledger keys of ambiguous rows, ``row_key``) and ``since`` (ISO 8601 time, the earliest
    send among them; None: unknown)."""

    job_ids: set[str]
    keys: frozenset[bytes] = frozenset()
    since: str | None = None


class Poller:
    """Fetches the outcome events of ``job_ids`` and appends the missing ones to ``sink``.

    ``account`` (api.accounts): the account whose jobs these are and whose token
    ``client`` sends; its ``rate_per_second`` holds too, under ``pacer`` (the global
    ``submit.rate_per_second``, shared by every account's poller; a new one if None).
    """

    def __init__(self, config: RunConfig, client: CobaltClient, sink: EventStore, *,
                 account: str | None = None, pacer: Pacer | None = None) -> None:
        self._config = config
        self._client = client
        self._sink = sink
        self._pacer = pacer or Pacer(config.submit.rate_per_second)
        limits = (config.api.accounts or {}).get(account or "")
        rate = limits.rate_per_second if limits is not None else None
        self._own_pacer = Pacer(rate) if rate else None
        self._policy = RetryPolicy.of(config.submit, repeat_unknown=True)  # a GET: safe
        self._account = account if account is not None else config.api.account_id()
        self._who = f"account {account}: " if account is not None else ""
        self.refused = False  # Cobalt refused the credentials (401/403)
        self.stats = PollStats()

    async def run(self, job_ids: set[str], since: str | None,
                  keys: frozenset[bytes] = frozenset()) -> PollStats:
        """Poll for ``job_ids`` and for ``keys``; returns what was done.

        ``keys``: ledger keys (``row_key``) of ambiguous rows, which have no job
        id: any ``task_note.created`` event whose task id and note give one of
        them is stored, and paging by date is used. ``since`` (ISO 8601 time,
        the earliest send of any of them) bounds the date range when paging.
        Raises RunAborted (exit 3) when Cobalt refuses or keeps failing, and
        UnreadableEvents for a page of neither documented shape.
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sink.run)
            try:
                await self.fetch(job_ids, since, keys)
            finally:
                self._sink.stop()
        return self.stats

    async def fetch(self, job_ids: set[str], since: str | None,
                    keys: frozenset[bytes] = frozenset()) -> PollStats:
        """As ``run``, into a sink whose ``run`` someone else started (and stops)."""
        self.stats.wanted = len(job_ids)
        self.stats.ambiguous = len(keys)
        found: set[str] = set()
        found_keys: set[bytes] = set()
        try:
            async for item in self._items(job_ids, since, paging=bool(keys)):
                await self._take(item, job_ids, found, keys, found_keys)
        finally:
            self.stats.still_missing = len(job_ids - found)
            self.stats.ambiguous_found = len(found_keys)
        return self.stats

    async def _items(self, job_ids: set[str], since: str | None, *, paging: bool = False
                     ) -> AsyncIterator[tuple[dict[str, Any], str | None]]:
        if not paging and len(job_ids) <= self._config.poll.per_job_below:
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

    async def _pages(self, query: dict[str, str]
                     ) -> AsyncIterator[tuple[dict[str, Any], str | None]]:
        page = 1
        while True:
            asked = {**query, "page": page, "page_size": self._config.poll.page_size}
            result = await self._get(asked)
            if result.page != page:  # a server ignoring `page` would be paged through forever
                raise UnreadableEvents(
                    f"GET /v1/webhook-events ({_where(asked)}): the answer's "
                    "pagination.current_page is not the page asked for (nothing taken from it)")
            for item in read_page(result.events, asked):
                yield item
            if page >= result.total_pages or not result.events:
                return
            page += 1

    async def _get(self, query: dict[str, Any]) -> EventsPage:
        """One page, retried while retrying can help (retry.py); RunAborted once it cannot."""
        attempt = 0
        while True:
            attempt += 1
            if self._own_pacer is not None:
                await self._own_pacer.wait_turn()
            await self._pacer.wait_turn()
            self.stats.requests += 1
            try:
                return await self._client.webhook_events(**query)
            except CredentialsRefused as exc:
                self.refused = True
                raise RunAborted(f"{self._who}credentials refused by Cobalt ({exc.own})"
                                 ) from None
            except RequestRejected as exc:
                raise RunAborted(f"{self._who}Cobalt refused the events query ({exc.own})"
                                 ) from None
            except ApiError as exc:
                delay = retry_delay(exc, attempt, self._policy)
                if delay is None:
                    raise RunAborted(f"{self._who}polling failed after {attempt} attempt"
                                     f"{'s' * (attempt != 1)}: {exc.own}") from None
                log.info("%sGET /v1/webhook-events (%s): %s; attempt %d of %d, asking again "
                         "in %.2f s", self._who, _where(query), exc.own, attempt,
                         self._policy.max_attempts, delay)
            await anyio.sleep(delay)

    async def _take(self, item: tuple[dict[str, Any], str | None], job_ids: set[str],
                    found: set[str], keys: frozenset[bytes] = frozenset(),
                    found_keys: set[bytes] | None = None) -> None:
        envelope, delivery = item
        self.stats.seen += 1
        job_id = envelope["job_id"]
        key = self._key_of(envelope) if keys else None
        if envelope["type"] not in EVENT_TYPES or (job_id not in job_ids and key not in keys):
            return
        try:  # the same codec and id rule as the receiver: never store what it would refuse
            line = encode_event(envelope)
            check_event_id(envelope["id"])
        except UnreadableEvent as exc:
            # Ids from Cobalt are untrusted: never logged as given (note text, a forged line).
            log.warning("event %s (job %s) not stored: %s", safe_id(envelope["id"]),
                        safe_id(job_id), exc.code)
            return
        try:
            verdict = await self._sink.append(line, envelope["id"])
        except UnreadableEvent as exc:  # the store cannot hold its values (never will)
            log.warning("event %s (job %s) not stored: %s", safe_id(envelope["id"]),
                        safe_id(job_id), exc.code)
            return
        if job_id in job_ids:
            found.add(job_id)
        if key is not None and key in keys and found_keys is not None:
            found_keys.add(key)
        if verdict == "stored":
            self.stats.stored += 1
            if delivery == "success":
                self.stats.delivered_but_missing += 1
        else:
            self.stats.duplicates += 1


    def _key_of(self, envelope: dict[str, Any]) -> bytes | None:
        """The ledger key of a ``task_note.created`` event's task id and note, else None (as
        reconcile keys the events it mirrors)."""
        data = envelope["data"]
        task_id, note = data.get("emr_task_id"), data.get("note")
        if envelope["type"] != "task_note.created" or not isinstance(task_id, str) \
                or not isinstance(note, str):
            return None
        return row_key(self._account, task_id, note)


async def poll_accounts(config: RunConfig, clients: Mapping[str, CobaltClient],
                        sink: EventStore, wanted: Mapping[str, Wanted]) -> PollStats:
    """Poll every account of ``wanted`` (api.accounts) at once, each through its own
    client (``clients[account]``, its token) for its own jobs and notes, into ``sink``.

    Returns the stats added up over the accounts. An account whose poll stops
    (RunAborted: credentials refused, Cobalt kept failing, an unreadable page) is named
    in ``stopped`` with the reason, a warning is logged, and the other accounts go on;
    what it had stored before stays stored. Raises only what the sink raises.
    """
    total = PollStats()
    shared = Pacer(config.submit.rate_per_second)

    async def one(account: str, want: Wanted) -> None:
        poller = Poller(config, clients[account], sink, account=account, pacer=shared)
        try:
            await poller.fetch(want.job_ids, want.since, want.keys)
        except RunAborted as exc:
            if isinstance(exc, StorageFull):  # the sink's disk: no account can go on
                raise
            reason = str(exc)
            if not reason.startswith(f"account {account}: "):  # a page it could not read
                reason = f"account {account}: {reason}"
            if poller.refused:
                reason += f"; its jobs were not polled; check api.accounts.{account}.access_token"
                stats = poller.stats  # none of its jobs or notes was asked about
                stats.not_polled[account] = stats.wanted + stats.ambiguous
                stats.wanted = stats.ambiguous = 0
            poller.stats.stopped[account] = reason
            log.warning("%s (the other accounts are polled to the end)", reason)
        total.add(poller.stats)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run)
        try:
            async with anyio.create_task_group() as accounts:
                for account, want in wanted.items():
                    accounts.start_soon(one, account, want)
        finally:
            sink.stop()
    return total


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
