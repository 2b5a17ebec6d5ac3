"""The webhook receiver: verify, de-duplicate, store durably, then (and only then) 2xx.

The one part of tasknotes exposed to a network, so it trusts nothing:

- the signature (``cobalt-verification``: hex HMAC-SHA256 of the raw body) is
  checked against every configured secret with ``hmac.compare_digest``, so a
  secret rotation loses nothing; a missing, malformed or wrong one is a 401;
- a body over ``webhooks.max_body_bytes`` is refused while it is read (413),
  never buffered whole; bad JSON is a 400; a bad request never gets a 5xx;
- an event is acknowledged only once its line is fsync'ed (group commit in
  ``events.SinkFile``); if it cannot be stored the answer is a 503, which
  Cobalt retries once, and ``tasknotes poll`` can fetch it later;
- a repeated delivery (same ``webhook-id``, or the same body under a new id)
  gets a 200 and writes nothing.

Logs carry the event id, type, size, attempt and verdict: never the body and
never a header value.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.events import SinkFile, SinkWriteError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "cobalt-verification"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

EventListener = Callable[[dict[str, Any]], None]


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
        sink: SinkFile,
        secrets: Sequence[bytes],
        *,
        path: str = "/webhooks/cobalt",
        max_body_bytes: int = 1024 * 1024,
        on_stored: EventListener | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        self.sink = sink
        self._secrets = tuple(secrets)
        self._path = path
        self._max = max_body_bytes
        self._on_stored = on_stored

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
        healthy = self.sink.broken is None
        return JSONResponse({"ok": healthy}, status_code=200 if healthy else 503)

    async def _receive(self, request: Request) -> JSONResponse:
        attempt = request.headers.get("webhook-attempt", "?")[:8]
        body = await self._read_body(request)
        if body is None:
            return _answer(413, "body too large", None, "-", attempt)
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), self._secrets):
            return _answer(401, "bad signature", None, len(body), attempt)
        event = _parse(body)
        if event is None:
            return _answer(400, "body is not a JSON event with an id", None, len(body), attempt)
        try:
            verdict = await self.sink.append(body, event["id"])
        except SinkWriteError:
            return _answer(503, "event not stored, retry", event, len(body), attempt)
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


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not event["id"]:
        return None
    return event


def _answer(
    status: int, verdict: str, event: dict[str, Any] | None, size: int | str, attempt: str
) -> JSONResponse:
    event_id = str(event.get("id"))[:64] if event else "-"
    event_type = str(event.get("type"))[:64] if event else "-"
    # A line per delivery only with -v (DEBUG): thousands of rows make thousands of webhooks.
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    log.log(level, "webhook %s type=%s bytes=%s attempt=%s -> %d %s",
            event_id, event_type, size, attempt, status, verdict)
    return JSONResponse({"received": status == 200, "result": verdict}, status_code=status)
