"""The webhook receiver: verify, de-duplicate, store durably, then (and only then) 2xx.

The one part of tasknotes exposed to a network, so it trusts nothing:

- the signature (``cobalt-verification``: hex HMAC-SHA256 of the raw body) is
  checked against every configured secret with ``hmac.compare_digest``, so a
  secret rotation loses nothing; a missing, malformed or wrong one is a 401;
- a body over ``webhooks.max_body_bytes`` is refused while it is read (413),
  never buffered whole; a body the event codec (``events.decode_event``)
  refuses is a 400 and stores nothing, so every reader can read every stored
  line: not strict UTF-8 (a UTF-16 body), a lone surrogate escape, nesting
  deeper than ``events.MAX_DEPTH``, NaN/Infinity, not an object, no id. A bad
  request never gets a 5xx (Cobalt would retry it);
- an event is acknowledged only once its line, and its receipt (the time the
  whole delivery was in, UTC with milliseconds: the row's ``outcome_at``), are
  fsync'ed (group commit in ``events.SinkFile``); if it cannot be stored the
  answer is a 503, which Cobalt retries once, and ``tasknotes poll`` can fetch it later. The next
  delivery tries storage again, so the sink heals when the disk has room;
  ``/healthz`` answers 503 until a write (or its own probe write) succeeds;
- a repeated delivery (same ``webhook-id``, or the same body under a new id)
  gets a 200 and writes nothing;
- what one client may hold is bounded (``SinkLimits``, applied by
  ``serve_options``): header count and size (431; h11 closes a connection
  whose unfinished head outgrows the size), the time to send a whole request (headers
  and body), idle keep-alive time, and the number of open connections (past
  it, the oldest connection not being answered is closed). uvicorn
  arms no timer before a request's headers arrive and its
  ``limit_concurrency`` counts idle connections too, so idle sockets alone
  would turn real deliveries away; the guard below closes them instead.

Logs carry the event id, type, size, attempt and verdict: never the body and
never a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import resource
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Final, Protocol

import anyio
import h11
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.events import (
    SinkWriteError,
    UnreadableEvent,
    Verdict,
    check_event_id,
    decode_event,
    receive_time,
)
from pipeline.redaction import safe_id

_TYPES_READ: Final = ("task_note.created", "task_note.failed")  # as poll.EVENT_TYPES

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "cobalt-verification"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

EventListener = Callable[[dict[str, Any]], None]


class EventStore(Protocol):
    """Where the receiver stores events: ``events.SinkFile`` (the default) or
    ``state.pg_events.PgEventStore`` (with ``state.url``).

    ``run()``: the group-commit loop, run in the app's task group until ``stop()``;
    ``append(body, event_id)``: "stored" once durable, "duplicate" if that id or body
    is stored already, SinkWriteError (the sink's 503) if it cannot be stored now;
    ``probe()``: None if an event could be stored now, else why not (``/healthz``);
    ``destination``: where the events go, for people (never a password); ``count()``:
    events stored there.
    """

    @property
    def destination(self) -> str: ...

    def count(self) -> int: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    async def append(self, body: bytes, event_id: str, *, received_at: str | None = None
                     ) -> Verdict: ...

    def probe(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class SinkLimits:
    """What one client may hold of the sink; every field bounds memory, sockets or time.

    ``max_header_bytes``: header names and values (431 beyond it; RFC 6585
    section 5), and what h11 buffers of an unfinished request head (400 and the
    connection closed beyond it);
    ``max_headers``: header fields (431 beyond it);
    ``request_timeout_s``: from connect (or the first byte of a kept-alive
    request, or, for a pipelined request already buffered, the moment the
    server starts on it) to the last byte of the body, else the connection is
    closed: Cobalt gives up on a delivery after 5 s, so no real one takes longer;
    also how long a peer may leave its answers unread once they back up;
    ``keep_alive_s``: idle time between requests (uvicorn ``timeout_keep_alive``);
    ``max_connections``: open connections, lowered to the process's file limit
    less 64; past it, opening one closes the oldest one that is still sending its
    request or idle between requests (never one whose request is being answered).
    """

    max_header_bytes: int = 16 * 1024
    max_headers: int = 64
    request_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 4096


def verify_signature(body: bytes, signature: str | None, secrets: Sequence[bytes]) -> bool:
    """True if ``signature`` is the hex HMAC-SHA256 of ``body`` under one of ``secrets``."""
    if not signature:
        return False
    given = signature.strip().lower()
    if not _HEX_SHA256.fullmatch(given):
        return False
    matched = False
    for secret in secrets:  # no early exit: every secret costs the same
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
        matched |= hmac.compare_digest(expected, given)
    return matched


class WebhookReceiver:
    """The receiver's state and its Starlette app."""

    def __init__(
        self,
        sink: EventStore,
        secrets: Sequence[bytes],
        *,
        path: str = "/webhooks/cobalt",
        max_body_bytes: int = 1024 * 1024,
        on_stored: EventListener | None = None,
        limits: SinkLimits | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        self.sink = sink
        self._secrets = tuple(secrets)
        self._path = path
        self._max = max_body_bytes
        self._on_stored = on_stored
        self.limits = limits or SinkLimits()

    def serve_options(self) -> dict[str, Any]:
        """``uvicorn.Config`` keyword arguments that enforce ``self.limits``.

        Raises this process's soft open-file limit to its hard limit (no privilege
        needed) and caps ``max_connections`` below it, so accept() never fails
        with EMFILE while idle sockets hold every descriptor.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        limits = self.limits
        if soft != resource.RLIM_INFINITY:
            limits = SinkLimits(**{**asdict(limits), "max_connections": max(
                1, min(limits.max_connections, soft - 64))})
        guard = type("GuardedH11Protocol", (_GuardedH11,), {"limits": limits})
        # proxy_headers off: the sink reads no client address, so uvicorn's X-Forwarded-*
        # middleware (on by default) would only cost every request its time.
        return {"http": guard, "h11_max_incomplete_event_size": limits.max_header_bytes,
                "timeout_keep_alive": limits.keep_alive_s, "proxy_headers": False}

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(self._path, self._receive, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.sink.run)
            try:
                yield
            finally:
                self.sink.stop()

    async def _health(self, request: Request) -> JSONResponse:
        problem = await anyio.to_thread.run_sync(self.sink.probe)
        return JSONResponse({"ok": problem is None}, status_code=200 if problem is None else 503)

    async def _receive(self, request: Request) -> JSONResponse:
        attempt = request.headers.get("webhook-attempt", "?")[:8]
        raw_headers = request.headers.raw
        if (len(raw_headers) > self.limits.max_headers
                or sum(len(k) + len(v) for k, v in raw_headers) > self.limits.max_header_bytes):
            return _answer(431, "header fields too many or too large", None, "-", attempt)
        body = await self._read_body(request)
        received_at = receive_time()  # the whole delivery is in: the event's receive time
        if body is None:
            return _answer(413, "body too large", None, "-", attempt)
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), self._secrets):
            return _answer(401, "bad signature", None, len(body), attempt)
        try:
            event = _parse(body)
        except UnreadableEvent as exc:
            return _answer(400, f"not an event: {exc.code}", None, len(body), attempt)
        return await self._store(body, event, attempt, received_at)

    async def _store(self, body: bytes, event: dict[str, Any], attempt: str,
                     received_at: str) -> JSONResponse:
        try:
            verdict = await self.sink.append(body, event["id"], received_at=received_at)
        except SinkWriteError:
            return _answer(503, "event not stored, retry", event, len(body), attempt)
        except UnreadableEvent as exc:  # re-encoded to one line, it no longer fits the codec
            return _answer(400, f"not an event: {exc.code}", event, len(body), attempt)
        if verdict == "stored" and self._on_stored is not None:
            self._on_stored(event)
        return _answer(200, verdict, event, len(body), attempt)

    async def _read_body(self, request: Request) -> bytes | None:
        """The raw body, or None once it is larger than allowed (checked while reading)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            return None
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self._max:
                    return None
                chunks.append(chunk)
        except ClientDisconnect:
            return b""
        return b"".join(chunks)


def _parse(body: bytes) -> dict[str, Any]:
    """The event in ``body``, as every reader will parse it; raises UnreadableEvent."""
    event = decode_event(body)
    check_event_id(event.get("id"))
    return event


def _answer(
    status: int, verdict: str, event: dict[str, Any] | None, size: int | str, attempt: str
) -> JSONResponse:
    # A line per delivery only with -v (DEBUG): thousands of rows make thousands of webhooks.
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if log.isEnabledFor(level):  # the ids are checked (safe_id) only for a line written
        event_id = str(safe_id(event.get("id")))[:64] if event else "-"
        # The types read are named as they are (three words: beyond what an id may hold);
        # any other type is upstream text, shown as an id or withheld.
        kind = event.get("type") if event else None
        event_type = kind if kind in _TYPES_READ else str(safe_id(kind))[:64] if event else "-"
        log.log(level, "webhook %s type=%s bytes=%s attempt=%s -> %d %s",
                event_id, event_type, size, attempt, status, verdict)
    return JSONResponse({"received": status == 200, "result": verdict}, status_code=status)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol plus a per-request deadline and a connection cap.

    uvicorn (0.54) arms its keep-alive timer only after a response, so a socket
    that never completes a request is never closed. Here every request must be
    whole (head and body) within ``request_timeout_s`` of its start: on
    connect, at the first byte of a request on an idle kept-alive connection,
    or, for a request already buffered behind the previous one (HTTP
    pipelining, RFC 9112 section 9.3.2), when the server starts on it after
    answering that one. The time the server takes to answer is not counted,
    but a peer that stops reading its answers (the socket's write buffer past
    its high-water mark) gets the same time to read again. Past either
    deadline the connection is aborted (unsent output dropped).
    """

    limits: ClassVar[SinkLimits]
    # closed for being too slow, and for the cap, since the last warning (once a minute)
    closed: ClassVar[dict[str, int]] = {"slow": 0, "cap": 0}
    warned_at: ClassVar[float] = float("-inf")
    _deadline: asyncio.TimerHandle | None = None
    _stall: asyncio.TimerHandle | None = None  # armed while the peer is not reading
    _since: float = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._evict_oldest()
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request on an idle kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in (or the connection is failing)

    def on_response_complete(self) -> None:
        # Both sides done: uvicorn starts the next cycle and parses what is already buffered.
        next_cycle = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        super().on_response_complete()
        if not next_cycle or self.transport.is_closing():
            return  # answered before the request was whole (413): its deadline still runs
        if self.conn.their_state is h11.SEND_BODY or (
                self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()  # a pipelined request, unfinished in the buffer: its own deadline

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.request_timeout_s, self._too_slow)

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._since = self.loop.time()
        self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._disarm()  # whichever timer fired, the other has nothing left to guard
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._count("slow")
        self.transport.abort()  # not close(): a peer that reads nothing would keep it open

    def _count(self, why: str) -> None:
        """Count a closed connection; warn at most once a minute, so an attack floods no log."""
        cls = type(self)
        cls.closed[why] += 1
        now = self.loop.time()
        if now - cls.warned_at >= 60:
            log.warning("closed %d connections with no whole request within %.0f s and %d idle"
                        " or unfinished ones past the cap of %d (since the last such warning)",
                        cls.closed["slow"], self.limits.request_timeout_s, cls.closed["cap"],
                        self.limits.max_connections)
            cls.warned_at = now
            cls.closed = {"slow": 0, "cap": 0}

    def _evictable(self) -> bool:
        """Still sending its request (head or body), or idle between requests: anything but
        a connection whose whole request is in and whose answer is being made."""
        if self.transport is None or self.transport.is_closing():
            return False
        if self.conn.their_state is h11.IDLE or self.conn.their_state is h11.SEND_BODY:
            return True
        return self.cycle is None or self.cycle.response_complete

    def _evict_oldest(self) -> None:
        if len(self.connections) < self.limits.max_connections:
            return
        waiting = [c for c in self.connections if isinstance(c, _GuardedH11) and c._evictable()]
        if waiting:
            oldest = min(waiting, key=lambda c: c._since)
            self._count("cap")
            oldest.transport.abort()
