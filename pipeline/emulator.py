"""A local Cobalt look-alike for the sandbox and the tests, faults included.

It behaves as Cobalt's public documentation (docs.usecobalt.com) says:

- ``POST /v1/tasks/notes``: 401 without the three credentials; 400 with the
  reference page's messages, byte for byte, for an unexpected or missing
  field; else ``{"success": true, ..., "task_note_id": <24 hex>, "job_id": <int>}``.
- After ``outcome_delay_ms``, a signed ``task_note.created`` or
  ``task_note.failed`` webhook (envelope and headers as docs/webhooks/receiving describes,
  ``job_id`` as a string), delivered the way Cobalt delivers: 5 s timeout,
  one retry 1 s later (2 s timeout) on a 5xx, a 429 or a network error,
  never after a timeout or another 4xx.
- ``GET /v1/webhook-events``: the same events, only those of the asking token's
  connection (its ``access_token_reference_id``; a revoked token is answered 401),
  with ``job_id``/``event_type``/date filters and pagination, in either documented shape of the list
  (``events_shape``): ``event_id`` items (``event_id``, ``event_type``,
  ``created_at``, ``delivery_status``; filter ``delivery_status``) or
  ``envelope`` items (the webhook envelope plus ``status``, ``delivered``,
  ``delivery_attempts``, ``last_delivery_attempt``, ``response_status_code``;
  filter ``status``): the two revisions of Cobalt's reference page
  (docs.usecobalt.com, api-reference/webhook-events/get).
  Its first queries can be made to answer 429 or 503 (``Faults.events_*``, faults.py).

Faults are drawn from a hash of (seed, note, attempt number), so which
request fails does not depend on the order concurrent requests arrive in.
``GET /_emulator/stats`` reports how many times each (task id, note) was
stored, so tests can prove "exactly once".

Several EHR connections (``tokens``): each access token has its
``access_token_reference_id``, which its notes' webhooks carry; a token in
``revoked`` is answered 401; faults can be limited to some connections
(``Faults.only_references``), e.g. a 429 storm on one clinic. ``stored_by``
counts the notes stored per reference id.

Over 400 lines on purpose: one module holds the whole look-alike (both endpoints, the
webhook delivery loop and every fault), so a test or a sandbox reader checks Cobalt's
documented behaviour in one place; the fault knobs themselves are defined in faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import math
import random
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.events import compact_json
from pipeline.faults import Behaviour, EventsShape, Faults  # the knobs, defined once

log = logging.getLogger(__name__)

ACCEPTED_MESSAGE = "Task note processing. A webhook event will be sent upon completion."
FIELDS = ("emr_task_id", "note")
FAILURES = (  # (code, description): what an RPA note-writer runs into
    ("emr_session_expired", "EMR session expired during note entry"),
    ("task_locked", "Task is locked by another user"),
    ("rpa_timeout", "Timed out waiting for the EMR to respond"),
)
NOT_FOUND = ("task_not_found", "Task not found in EMR")


def note_key(emr_task_id: str, note: str) -> str:
    """How the emulator names a stored note in its stats (no note text leaves it)."""
    return hashlib.sha256(f"{emr_task_id}\x1f{note}".encode()).hexdigest()


def sign(body: bytes, secret: str) -> str:
    """``cobalt-verification``: hex HMAC-SHA256 of the payload, keyed with the webhook secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class EmulatorOptions(Behaviour):
    """Everything the emulator can be told (``tasknotes emulator --help``): the
    ``Behaviour`` knobs and the ``Faults`` (faults.py, where each is defined once)."""

    faults: Faults = field(default_factory=Faults)
    other_event_every: int = 0  # every Nth note also makes an unrelated account event


@dataclass(slots=True)
class _Job:
    job_id: int
    task_note_id: str
    emr_task_id: str
    note: str
    key: bytes
    reference: str = "user_sandbox"  # access_token_reference_id of the token that sent it


class Emulator:
    """One emulated Cobalt account: its state, its Starlette app and its webhook sender."""

    def __init__(self, options: EmulatorOptions) -> None:
        self.options = options
        self._random = random.Random(options.seed)  # timings: reproducible with --seed
        # Ids are unique like Cobalt's, also across restarts of the emulator (a sandbox's
        # sink file outlives it): a seeded generator would hand out the same ids again.
        self._ids = random.SystemRandom()
        self.stored: Counter[str] = Counter()
        self.stored_by: Counter[str] = Counter()  # notes stored per reference id
        self.refused: Counter[str] = Counter()  # 401s per reference id (revoked tokens)
        self.answered_by: list[tuple[str, int]] = []  # (reference id, status), in order
        self._in_flight_by: Counter[str] = Counter()
        self.max_in_flight_by: Counter[str] = Counter()  # most requests at once, per reference
        self._references = {options.access_token: options.account_reference,
                            **dict(options.tokens)}
        self.responses: Counter[int] = Counter()
        self.disconnected = 0  # requests whose client left before the body was read
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []  # monotonic time each note request arrived
        self.arrived_by: list[tuple[float, str]] = []  # (that time, the token's reference id)
        self.answers: list[tuple[float, int]] = []  # (monotonic time, status) of each answer
        self.event_queries: list[tuple[float, int]] = []  # the same for GET /v1/webhook-events
        # (reference id of the asking token, status, the query's filters) of each such GET
        self.queried_by: list[tuple[str, int, dict[str, str]]] = []
        self.deliveries: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []  # list items, ``event_id`` shape
        self._delivery: dict[str, dict[str, Any]] = {}  # event id -> attempts, last try, code
        self._attempts: Counter[bytes] = Counter()
        self._next_job = time.time_ns() // 1000  # microseconds: grows across restarts
        self._due: list[tuple[float, int, _Job]] = []
        self._wake = anyio.Event()
        self._tokens = options.rate_limit or 0.0
        self._refilled = time.monotonic()
        self.server: uvicorn.Server | None = None  # set when served: lets a fault drop a socket
        self._pulse = anyio.Event()

    async def until(self, predicate: Callable[[Emulator], bool]) -> None:
        """Wait until ``predicate(self)`` holds; checked after every change of state."""
        while not predicate(self):
            await self._pulse.wait()

    def _changed(self) -> None:
        pulse, self._pulse = self._pulse, anyio.Event()
        pulse.set()

    # -- the app ------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/tasks/notes", self._create_note, methods=["POST"]),
                Route("/v1/webhook-events", self._list_events, methods=["GET"]),
                Route("/_emulator/stats", self._stats, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with (httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client,
                    anyio.create_task_group() as tg):
            tg.start_soon(self._dispatch, client, tg)
            yield
            tg.cancel_scope.cancel()

    async def _create_note(self, request: Request) -> Response:
        self.requests += 1
        arrived = time.monotonic()
        self.arrivals.append(arrived)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        reference = self._references.get(request.headers.get("access_token", ""), "")
        self.arrived_by.append((arrived, reference))
        self._in_flight_by[reference] += 1
        self.max_in_flight_by[reference] = max(self.max_in_flight_by[reference],
                                               self._in_flight_by[reference])
        try:
            response = await self._handle_note(request)
        except ClientDisconnect:  # the client went away before its body was read (killed)
            self.disconnected += 1
            log.info("a client went away before its request was read (not stored)")
            return Response(status_code=499)  # no one reads it; nothing was stored
        finally:
            self.in_flight -= 1
            self._in_flight_by[reference] -= 1
        self.responses[response.status_code] += 1
        self.answers.append((time.monotonic(), response.status_code))
        self.answered_by.append((reference, response.status_code))
        return response

    async def _handle_note(self, request: Request) -> Response:
        low, high = self.options.latency_ms
        if high > 0:
            await anyio.sleep(self._random.uniform(low, high) / 1000)
        if not self._authorised(request):
            return _error(401, "Unauthorized: invalid client_id, client_secret or access_token")
        reference = self._references[request.headers["access_token"]]
        if request.headers["access_token"] in self.options.revoked:
            self.refused[reference] += 1
            return _error(401, "Unauthorized: access token revoked")
        body = await request.body()
        shape = _check_body(body)
        if isinstance(shape, Response):
            return shape
        emr_task_id, note = shape
        key = bytes.fromhex(note_key(emr_task_id, note))
        attempt = self._attempts[key]
        self._attempts[key] += 1
        before = self._fault_before_store(key, attempt, emr_task_id, request, reference)
        if before is not None:
            return before
        job = self._store(emr_task_id, note, key, reference)
        return await self._answer_after_store(job, attempt, request)

    def _authorised(self, request: Request) -> bool:
        o, h = self.options, request.headers
        return (h.get("client_id") == o.client_id and h.get("client_secret") == o.client_secret
                and h.get("access_token") in self._references)

    def _fault_before_store(
        self, key: bytes, attempt: int, task_id: str, request: Request, reference: str
    ) -> Response | None:
        f = self.options.faults
        if self.options.rate_limit and not self._take_token():
            return self._busy(429, "Too many requests", max(f.retry_after_s,
                                                              1 / self.options.rate_limit))
        if f.only_references and reference not in f.only_references:
            return None
        fault = self._fault("before", key, attempt, task_id, (
            (f.rate_429, "429"), (f.rate_503, "503"),
            (f.rate_400, "400"), (f.drop_before_store, "drop"),
        ))
        if fault == "429":
            return self._busy(429, "Too many requests", f.retry_after_s)
        if fault == "503":
            return self._busy(503, "Service temporarily unavailable", f.retry_after_s)
        if fault == "400":
            return _error(400, "Invalid emr_task_id: task cannot accept notes")
        return self._drop(request) if fault == "drop" else None

    async def _answer_after_store(self, job: _Job, attempt: int, request: Request) -> Response:
        f = self.options.faults
        fault = None if f.only_references and job.reference not in f.only_references else (
            self._fault("after", job.key, attempt, job.emr_task_id, (
            (f.rate_500_after_store, "500"), (f.garbage_after_store, "garbage"),
            (f.slow_after_store, "slow"), (f.drop_after_store, "drop"),
            (f.reset_after_store, "reset"),
        )))
        if fault == "500":
            return _error(500, "Internal server error")
        if fault == "garbage":
            return Response("<html>upstream hiccup</html>", media_type="text/html")
        if fault in ("drop", "reset"):
            return self._drop(request, reset=fault == "reset")
        if fault == "slow":
            await anyio.sleep(f.slow_s)
        return JSONResponse({"success": True, "message": ACCEPTED_MESSAGE,
                             "task_note_id": job.task_note_id, "job_id": job.job_id})

    def _fault(self, stage: str, key: bytes, attempt: int, task_id: str,
               table: tuple[tuple[float, str], ...]) -> str | None:
        """The fault whose slice of [0, 1) holds this attempt's draw (slices laid end to end)."""
        f = self.options.faults
        if (f.only_first and attempt >= f.only_first) or (f.only_tasks
                                                          and task_id not in f.only_tasks):
            return None
        u = self._draw(stage, key, attempt)
        for fraction, name in table:
            if u < fraction:
                return name
            u -= fraction
        return None

    def _busy(self, status: int, message: str, after_s: float) -> Response:
        if self.options.faults.retry_after_as_date:
            # An HTTP date has whole seconds: round up, so the date is never sooner than asked.
            now = datetime.now(UTC)
            when = now.replace(microsecond=0) + timedelta(seconds=math.ceil(after_s) + 1)
            value = format_datetime(when, usegmt=True)
        else:
            value = str(math.ceil(after_s)) if after_s >= 1 or after_s == 0 else f"{after_s:g}"
        return _error(status, message, headers={"Retry-After": value})

    def _drop(self, request: Request, *, reset: bool = False) -> Response:
        """Close the client's connection without an answer (needs a real server).

        ``reset``: with SO_LINGER 0 the close sends a TCP RST instead of a FIN, so the
        client reads ECONNRESET (a reset after the request was sent) rather than a clean
        end of stream.
        """
        client = request.client
        server = self.server
        if server is not None and client is not None:
            for conn in list(server.server_state.connections):
                if getattr(conn, "client", None) == (client.host, client.port):
                    sock = conn.transport.get_extra_info("socket")
                    if reset and sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    conn.transport.abort()
        return Response(status_code=599)  # written to a closed socket: nobody reads it

    def _take_token(self) -> bool:
        rate = self.options.rate_limit or 0.0
        now = time.monotonic()
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _draw(self, kind: str, key: bytes, n: int) -> float:
        digest = hashlib.blake2b(f"{self.options.seed}|{kind}|{n}|".encode() + key,
                                 digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def _store(self, emr_task_id: str, note: str, key: bytes, reference: str) -> _Job:
        self._next_job += 1
        job = _Job(self._next_job, f"{self._ids.getrandbits(96):024x}", emr_task_id, note, key,
                   reference)
        self.stored[key.hex()] += 1
        self.stored_by[reference] += 1
        low, high = self.options.outcome_delay_ms
        due = time.monotonic() + self._random.uniform(low, high) / 1000
        heapq.heappush(self._due, (due, job.job_id, job))
        self._wake.set()
        self._changed()
        return job

    # -- outcomes and webhooks ----------------------------------------------------------

    async def _dispatch(self, client: httpx.AsyncClient, tg: anyio.abc.TaskGroup) -> None:
        limiter = anyio.CapacityLimiter(16)
        while True:
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, job = heapq.heappop(self._due)
                for event in self._outcome_events(job):
                    tg.start_soon(self._deliver, client, limiter, event, job.key)
            wait = self._due[0][0] - now if self._due else math.inf
            self._wake = anyio.Event()
            with anyio.move_on_after(wait):
                await self._wake.wait()

    def _outcome_events(self, job: _Job) -> list[dict[str, Any]]:
        events = [self._envelope(job, self._outcome(job), job.reference)]
        every = self.options.other_event_every
        if every and job.job_id % every == 0:
            events.append(self._other_event(job))
        return events

    def _outcome(self, job: _Job) -> tuple[str, dict[str, Any]]:
        if job.emr_task_id in self.options.missing_tasks:
            failure: tuple[str, str] | None = NOT_FOUND
        elif self._draw("outcome", job.key, 0) < self.options.faults.fail_rate:
            failure = FAILURES[int(self._draw("reason", job.key, 0) * len(FAILURES))]
        else:
            failure = None
        if failure is None:
            return "task_note.created", {
                "task_note_id": job.task_note_id,
                "emr_note_id": _uuid(self._ids),
                "emr_task_id": job.emr_task_id,
                "note": job.note,
            }
        return "task_note.failed", {
            "task_note_id": job.task_note_id,
            "failure_reason": failure[1],
            "reasons": [{"code": failure[0], "description": failure[1]}],
        }

    def _envelope(self, job: _Job | None, typed: tuple[str, dict[str, Any]],
                  reference: str | None = None) -> dict[str, Any]:
        event_type, data = typed
        return {
            "id": "evt_" + "".join(self._ids.choices(_ALNUM, k=24)),
            "access_token_reference_id": reference or self.options.account_reference,
            "object": "event",
            "created": _iso(datetime.now(UTC)),
            "type": event_type,
            "job_id": str(job.job_id) if job is not None else None,
            "data": data,
        }

    def _other_event(self, job: _Job) -> dict[str, Any]:
        return self._envelope(None, ("patient.updated", {"patient_id": f"pat_{job.job_id}"}),
                              job.reference)

    async def _deliver(
        self, client: httpx.AsyncClient, limiter: anyio.CapacityLimiter, event: dict[str, Any],
        key: bytes,
    ) -> None:
        record = _list_item(event, self.options.webhook_url or "")
        facts: dict[str, Any] = {"attempts": 0, "last": None, "code": None}
        self._delivery[event["id"]] = facts
        self.events.append(record)
        self._changed()
        url = self.options.webhook_url
        # Drawn from the note (and the event type), like every fault: the ids are random.
        dropped = self._draw("webhook:" + event["type"], key, 0) < self.options.faults.drop_webhooks
        if not url or dropped:
            record["delivery_status"] = "failed"
            self.deliveries["dropped" if url else "no_url"] += 1
            self._changed()
            return
        body = compact_json(event)  # the bytes Cobalt signs and sends
        async with limiter:
            delivered = await self._post(client, url, body, event["id"], attempt=1, limit_s=5.0,
                                         facts=facts)
            if delivered is None:  # a 5xx, a 429 or a network error: Cobalt tries once more
                await anyio.sleep(1.0)
                delivered = await self._post(client, url, body, event["id"], attempt=2,
                                             limit_s=2.0, facts=facts)
        record["delivery_status"] = "success" if delivered else "failed"
        self.deliveries["success" if delivered else "failed"] += 1
        self._changed()

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, event_id: str, *, attempt: int,
        limit_s: float, facts: dict[str, Any],
    ) -> bool | None:
        """True delivered, False failed for good, None worth the one retry.

        ``facts`` gets the attempt count, its time and the answer's status code (the
        ``envelope`` list shape reports them).
        """
        facts.update(attempts=attempt, last=_iso(datetime.now(UTC)), code=None)
        headers = {
            "content-type": "application/json",
            "cobalt-verification": sign(body, self.options.webhook_secret),
            "webhook-id": event_id,
            "webhook-timestamp": _iso(datetime.now(UTC)),
            "webhook-attempt": str(attempt),
        }
        try:
            response = await client.post(url, content=body, headers=headers, timeout=limit_s)
        except httpx.TimeoutException:
            return False
        except httpx.TransportError:
            return None if attempt == 1 else False
        facts["code"] = response.status_code
        if response.is_success:
            return True
        if (response.status_code >= 500 or response.status_code == 429) and attempt == 1:
            return None
        return False

    # -- polling and stats --------------------------------------------------------------

    async def _list_events(self, request: Request) -> Response:
        arrived = time.monotonic()
        response = self._events_fault(len(self.event_queries)) or self._list_page(request)
        self.event_queries.append((arrived, response.status_code))
        reference = self._references.get(request.headers.get("access_token", ""), "")
        self.queried_by.append((reference, response.status_code,
                                dict(request.query_params)))
        return response

    def _events_fault(self, n: int) -> Response | None:
        """The ``n``-th GET's fault (0-based), if any: first the 429s, then the 503s, then
        the 400s (a refusal: asking again cannot help)."""
        f = self.options.faults
        if n < f.events_429:
            return self._busy(429, "Too many requests", f.retry_after_s)
        if n < f.events_429 + f.events_503:
            return self._busy(503, "Service temporarily unavailable", f.retry_after_s)
        if n < f.events_429 + f.events_503 + f.events_400:
            return _error(400, "Invalid query parameters")
        return None

    def _list_page(self, request: Request) -> Response:
        if not self._authorised(request):
            return _error(401, "Unauthorized: invalid client_id, client_secret or access_token")
        token = request.headers["access_token"]
        reference = self._references[token]
        if token in self.options.revoked:
            self.refused[reference] += 1
            return _error(401, "Unauthorized: access token revoked")
        q = request.query_params
        try:
            page = int(q.get("page", "1"))
            size = int(q.get("page_size", "20"))
        except ValueError:
            return _error(400, "page and page_size must be integers")
        if page < 1 or not 1 <= size <= 100:
            return _error(400, "page must be >= 1 and page_size between 1 and 100")
        shape = self.options.events_shape
        # A token sees its own connection's events only, as Cobalt scopes them to it.
        found = [e for e in self.events
                 if e["access_token_reference_id"] == reference and _matches(e, q, shape)]
        found.sort(key=lambda e: (e["created_at"], e["event_id"]),
                   reverse=q.get("sort", "desc") == "desc")
        pages = max(1, math.ceil(len(found) / size))
        chunk = found[(page - 1) * size : page * size]
        if shape == "envelope":
            chunk = [_envelope_item(e, self._delivery.get(e["event_id"], {})) for e in chunk]
        return JSONResponse({
            "success": True,
            "webhook_events": chunk,
            "pagination": {"current_page": page, "total_pages": pages,
                           "total_count": len(found), "page_size": size},
        })

    async def _stats(self, request: Request) -> Response:
        arrivals = {"arrivals": self.arrivals} if request.query_params.get("arrivals") else {}
        return JSONResponse({
            **arrivals,
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "stored": dict(self.stored),
            "stored_total": sum(self.stored.values()),
            "stored_by": dict(self.stored_by),
            "refused": dict(self.refused),
            "max_in_flight": self.max_in_flight,
            "deliveries": dict(self.deliveries),
            "events": len(self.events),
            "pending_outcomes": len(self._due),
        })


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _check_body(body: bytes) -> tuple[str, str] | Response:
    """The two fields, or the 400 Cobalt gives (messages as on the reference page)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "Invalid JSON in request body")
    if not isinstance(data, dict):
        return _error(400, "Request body must be a JSON object")
    unexpected = [k for k in data if k not in FIELDS]
    if unexpected:
        return _error(400, f"Unexpected fields in request body: {', '.join(unexpected)}")
    for name in FIELDS:
        if not data.get(name):
            return _error(400, f"Missing required field: {name}")
        if not isinstance(data[name], str):
            return _error(400, f"Invalid field type: {name} must be a string")
    return data["emr_task_id"], data["note"]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"success": False, "message": message}, status_code=status,
                        headers=headers)


def _iso(when: datetime) -> str:
    """ISO 8601 UTC with milliseconds, as JavaScript's ``Date.toISOString()`` writes it."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _list_item(event: dict[str, Any], url: str) -> dict[str, Any]:
    """An envelope in ``GET /v1/webhook-events``' shape (event_id/event_type/created_at)."""
    return {
        "event_id": event["id"],
        "event_type": event["type"],
        "webhook_url": url,
        "delivery_status": "pending",
        "data": event["data"],
        "created_at": event["created"],
        "job_id": event["job_id"],
        "access_token_reference_id": event["access_token_reference_id"],
    }


def _envelope_item(item: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """A list item in the other documented shape: the webhook envelope plus delivery facts."""
    return {
        "id": item["event_id"],
        "access_token_reference_id": item["access_token_reference_id"],
        "object": "event",
        "created": item["created_at"],
        "type": item["event_type"],
        "job_id": item["job_id"],
        "status": item["delivery_status"],
        "delivered": item["delivery_status"] == "success",
        "delivery_attempts": facts.get("attempts", 0),
        "last_delivery_attempt": facts.get("last"),
        "response_status_code": facts.get("code"),
        "data": item["data"],
    }


def _matches(event: dict[str, Any], q: Any, shape: EventsShape = "event_id") -> bool:
    """Whether a list item passes the query's filters; each shape has its own status filter
    (``delivery_status`` or ``status``) and ignores the other's, as an API ignores an unknown
    query parameter."""
    day = event["created_at"][:10]
    status_filter = "delivery_status" if shape == "event_id" else "status"
    return (
        ("job_id" not in q or event["job_id"] == q["job_id"])
        and ("event_type" not in q or event["event_type"] == q["event_type"])
        and (status_filter not in q or event["delivery_status"] == q[status_filter])
        and ("start_date" not in q or day >= q["start_date"])
        and ("end_date" not in q or day <= q["end_date"])
    )
