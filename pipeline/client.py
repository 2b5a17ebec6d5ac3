"""Cobalt's HTTP API: one request -> one typed result, or one typed error.

The only module (with polling.py's callers) that knows Cobalt's URLs. Requests
carry exactly the three auth headers Cobalt documents (``client_id``,
``client_secret``, ``access_token``) and, for a note, a JSON body of exactly
``emr_task_id`` and ``note``: Cobalt answers any other field with a 400.

Failures are classified here, once, into the tree in ``errors.py``: whether a
request may have taken effect decides whether it may be sent again.

What Cobalt says is untrusted text: an error message may quote the request
(the note) or the credentials. Every error leaves this module as
``HTTP <status> <code>: <message>``, the message passed through ``redact``
(the row's note, every secret and any run of 16 or more of their characters
removed, one line, at most 300 characters; withheld whole when a re-encoded
quote remains: pipeline/redaction.py). The full upstream text is kept
nowhere: it would be a second copy of the note, outside the input file.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx

from pipeline._transport import AiohttpTransport
from pipeline._version import __version__
from pipeline.config import ApiConfig
from pipeline.errors import (
    ApiError,
    BadResponse,
    CredentialsRefused,
    NoResponse,
    NotSent,
    RateLimited,
    RequestRejected,
    ServerError,
    Unavailable,
)
from pipeline.redaction import MAX_MESSAGE, SCAN_LIMIT, looks_like_id, redact

_json_string = json.encoder.encode_basestring
NOTES_PATH = "/v1/tasks/notes"
EVENTS_PATH = "/v1/webhook-events"
_MAX_MESSAGE = MAX_MESSAGE
_SCAN_LIMIT = SCAN_LIMIT
# Our own start of an error message: kept when Cobalt's part of it is withheld.
_OWN_PREFIX = re.compile(
    r"(?:HTTP \d{3} [a-z-]+|not sent|no answer|unreadable answer|connection lost): ")
MAX_PAGES = 100_000  # pages of one events query (10 million events at 100 a page), at most


@dataclass(frozen=True, slots=True)
class NoteAccepted:
    """Cobalt queued the note: the outcome arrives later, by webhook, under ``job_id``."""

    task_note_id: str
    job_id: str  # an integer in this response, a string in webhook events: kept as text
    http_status: int
    message: str


@dataclass(frozen=True, slots=True)
class EventsPage:
    """One page of ``GET /v1/webhook-events``, items exactly as Cobalt returned them
    (whatever JSON they are: poll.read_page says which it cannot read)."""

    events: list[Any]
    page: int
    total_pages: int


class CobaltClient:
    """An async client for the endpoints tasknotes uses. Use ``async with``.

    Requests are ``httpx.Request`` objects handed to an httpx transport
    (``handle_async_request``), and answers are ``httpx.Response`` objects:
    httpx's API, without ``AsyncClient``'s per-request machinery (URL merging,
    cookie jar, auth and redirect flows), which profiling showed to cost more
    than the HTTP exchange itself and which this client has no use for.
    """

    def __init__(
        self,
        api: ApiConfig,
        *,
        max_connections: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
        more_secrets: Iterable[str] = (),
        account: str | None = None,
    ) -> None:
        """``more_secrets``: other secrets (the webhook secrets) also kept out of messages.
        ``account``: with api.accounts, whose access token to send (every account's token is
        kept out of messages)."""
        client_id, client_secret, access_token = api.credentials(account)
        tokens = [api.credentials(name)[2] for name in api.accounts or ()]
        self._secrets = tuple(s for s in (client_id, client_secret, access_token, *tokens,
                                          *more_secrets) if s)
        self._transport = transport or _make_transport(api, max_connections)
        self._notes_url = httpx.URL(api.base_url + NOTES_PATH)
        self._events_url = httpx.URL(api.base_url + EVENTS_PATH)
        self._headers = httpx.Headers([
            (b"host", self._notes_url.netloc),
            (b"client_id", client_id.encode()),
            (b"client_secret", client_secret.encode()),
            (b"access_token", access_token.encode()),
            (b"accept", b"application/json"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"user-agent", f"tasknotes/{__version__}".encode()),
        ])
        self._post_headers = httpx.Headers([*self._headers.raw,
                                            (b"content-type", b"application/json")])
        timeout = httpx.Timeout(api.timeout_s, connect=api.connect_timeout_s,
                                pool=api.connect_timeout_s)
        self._extensions = {"timeout": timeout.as_dict()}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def create_task_note(self, emr_task_id: str, note: str) -> NoteAccepted:
        """POST /v1/tasks/notes; raises an ApiError subclass unless Cobalt queued the note.

        The error's message never holds ``note`` or a secret (see ``redact``).
        """
        body = _note_body(emr_task_id, note)
        # Headers complete and normalised up front, body as a stream: httpx then skips
        # its per-request header inference, which profiling found costlier than needed.
        headers = httpx.Headers(self._post_headers)  # a copy of the prepared list
        headers["content-length"] = str(len(body))
        request = httpx.Request("POST", self._notes_url, headers=headers,
                                stream=httpx.ByteStream(body), extensions=self._extensions)
        try:
            return _accepted(await self._send(request), note)
        except ApiError as exc:
            _redact_error(exc, (note, *self._secrets))
            raise

    async def webhook_events(self, **query: str | int) -> EventsPage:
        """GET /v1/webhook-events with the given filters (job_id, event_type, dates, page...)."""
        try:
            return await self._webhook_events(query)
        except ApiError as exc:
            _redact_error(exc, self._secrets)
            raise

    async def _webhook_events(self, query: dict[str, str | int]) -> EventsPage:
        request = httpx.Request("GET", self._events_url, params=query, headers=self._headers,
                                extensions=self._extensions)
        response = await self._send(request)
        if not response.is_success:
            _raise_for_status(response)
        data = _json_object(response)
        items = data.get("webhook_events")
        paging = data.get("pagination") or {}
        if not isinstance(items, list) or not isinstance(paging, dict):
            raise BadResponse("webhook-events answer lacks webhook_events/pagination",
                              http_status=response.status_code)
        status = response.status_code
        return EventsPage(
            events=items,
            page=_page_number(paging, "current_page", int(query.get("page") or 1), 1, status),
            total_pages=_page_number(paging, "total_pages", 1, 0, status),
        )

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One exchange, read in full, with httpx's failures translated (the one place)."""
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                httpx.ProxyError, httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise NotSent(f"not sent: {_describe(exc)}") from exc
        except httpx.TimeoutException as exc:
            raise NoResponse(f"no answer: {_describe(exc)}") from exc
        except httpx.DecodingError as exc:
            raise BadResponse(f"unreadable answer: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            raise NoResponse(f"connection lost: {_describe(exc)}") from exc
        return response


def _note_body(emr_task_id: str, note: str) -> bytes:
    """``{"emr_task_id": ..., "note": ...}`` exactly, as compact UTF-8 JSON.

    The same bytes as ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)``,
    built with the C string encoder alone (the generic encoder was 4% of a request).
    """
    return (f'{{"emr_task_id":{_json_string(emr_task_id)},'
            f'"note":{_json_string(note)}}}').encode()


def _make_transport(api: ApiConfig, max_connections: int) -> httpx.AsyncBaseTransport:
    if api.transport == "aiohttp":
        return AiohttpTransport(max_connections=max_connections)
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections, keepalive_expiry=4.0)
    return httpx.AsyncHTTPTransport(limits=limits, retries=0)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE] if str(exc) else type(exc).__name__


def _accepted(response: httpx.Response, note: str) -> NoteAccepted:
    if not response.is_success:
        _raise_for_status(response)
    data = _json_object(response)
    task_note_id, job_id = data.get("task_note_id"), data.get("job_id")
    if data.get("success") is not True or not isinstance(task_note_id, str) or not task_note_id:
        raise BadResponse("a success status without success/task_note_id in the body",
                          http_status=response.status_code)
    if isinstance(job_id, bool) or not isinstance(job_id, int | str) or not str(job_id).strip():
        raise BadResponse("a success status without a job_id", http_status=response.status_code)
    if not (looks_like_id(task_note_id, [note]) and looks_like_id(str(job_id).strip(), [note])):
        # Never kept or shown: an upstream that puts text there might put a note there.
        raise BadResponse("a success status with a task_note_id or job_id that does not look"
                          " like an id", http_status=response.status_code)
    return NoteAccepted(task_note_id, str(job_id).strip(), response.status_code,
                        str(data.get("message", ""))[:_MAX_MESSAGE])


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadResponse(f"HTTP {response.status_code} with a body that is not JSON",
                          http_status=response.status_code) from None
    if not isinstance(data, dict):
        raise BadResponse(f"HTTP {response.status_code} with JSON that is not an object",
                          http_status=response.status_code)
    return data


def _page_number(paging: dict[str, Any], key: str, default: int, least: int, status: int
                 ) -> int:
    """``pagination[key]`` of an events page: a JSON integer in ``least``..``MAX_PAGES``,
    or ``default`` when the field is absent or null.

    Raises BadResponse naming the field and the JSON type found, never the value (it is
    upstream text): a string such as "n/a", a fraction, a boolean, a negative or a page
    count no poll could page through.
    """
    value = paging.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadResponse(f"HTTP {status} {BadResponse.code}: pagination.{key} is a JSON "
                          f"{_json_type(value)}, not an integer", http_status=status)
    if not least <= value <= MAX_PAGES:
        raise BadResponse(f"HTTP {status} {BadResponse.code}: pagination.{key} is an integer "
                          f"outside {least}..{MAX_PAGES:,}", http_status=status)
    return value


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type (string, number, boolean, array, object)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    kind: type[ApiError]
    if status in (401, 403):
        kind = CredentialsRefused
    elif status == 429:
        kind = RateLimited
    elif status == 503:
        kind = Unavailable
    elif 400 <= status < 500:
        kind = RequestRejected
    elif status >= 500:
        kind = ServerError
    else:  # 1xx/3xx to a POST: we cannot tell what happened
        kind = BadResponse
    own = f"HTTP {status} {kind.code}"  # ours; Cobalt's message after it is not (ApiError.own)
    message = f"{own}: {_message(response)}"
    if kind is RateLimited or kind is Unavailable:
        raise kind(message, http_status=status, retry_after=retry_after(response), own=own)
    raise kind(message, http_status=status, own=own)


def _message(response: httpx.Response) -> str:
    """Cobalt's ``message`` (untrusted: redacted by the caller), else the reason phrase."""
    try:
        data = json.loads(response.content)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"])[:_SCAN_LIMIT]
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return response.reason_phrase or "no message"


def _redact_error(exc: ApiError, private: Iterable[str]) -> None:
    """Make ``exc``'s message safe to keep (ledger, reports, logs), in place.

    Our own prefix (``HTTP <status> <code>: ``) is kept as it is; the rest goes through
    ``redact`` and may come back withheld whole (pipeline/redaction.py).
    """
    found = _OWN_PREFIX.match(exc.message)
    head = found.group() if found else ""
    exc.message = head + redact(exc.message[len(head):], private,
                                limit=_MAX_MESSAGE - len(head))
    exc.args = (exc.message,)


def retry_after(response: httpx.Response, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds from now, given as seconds or as an HTTP date."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)
