"""The Cobalt client: exactly the documented request, and every failure classified."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from helpers import CREDENTIALS
from pipeline.client import CobaltClient, retry_after
from pipeline.config import ApiConfig
from pipeline.errors import (
    BadResponse,
    ConfigError,
    CredentialsRefused,
    NoResponse,
    NotSent,
    RateLimited,
    RequestRejected,
    ServerError,
    Unavailable,
)

API = ApiConfig.model_validate({"base_url": "https://api.usecobalt.test", **CREDENTIALS})
OK = {"success": True, "message": "Task note processing.", "task_note_id": "a" * 24,
      "job_id": 12345}


def client_answering(handler: httpx.MockTransport | None = None, **response: object
                     ) -> tuple[CobaltClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(**response)  # type: ignore[arg-type]

    return CobaltClient(API, transport=handler or httpx.MockTransport(answer)), seen


async def test_a_note_is_posted_with_exactly_the_documented_headers_and_body() -> None:
    """POST /v1/tasks/notes: the three auth headers, JSON of exactly emr_task_id and note."""
    client, seen = client_answering(status_code=200, json=OK)
    async with client:
        await client.create_task_note("9bef4113-e9ce", "Line one\nLine two — café")
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://api.usecobalt.test/v1/tasks/notes"
    assert request.headers["client_id"] == "test-client-id"
    assert request.headers["client_secret"] == "test-client-secret"
    assert request.headers["access_token"] == "test-access-token"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    body = json.loads(request.content)
    assert body == {"emr_task_id": "9bef4113-e9ce", "note": "Line one\nLine two — café"}
    assert list(body) == ["emr_task_id", "note"]


async def test_an_integer_job_id_is_kept_as_text() -> None:
    """job_id is an integer in the response and a string in webhooks: kept as text."""
    client, _ = client_answering(status_code=200, json=OK)
    async with client:
        accepted = await client.create_task_note("t", "n")
    assert (accepted.task_note_id, accepted.job_id, accepted.http_status) == ("a" * 24,
                                                                             "12345", 200)


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "retry"),
    [
        pytest.param(400, {"success": False, "message": "Unexpected fields in request body: x"},
                     {}, RequestRejected, None, id="400"),
        pytest.param(404, {"success": False, "message": "Task not found"}, {}, RequestRejected,
                     None, id="404"),
        pytest.param(401, {"success": False, "message": "Unauthorized"}, {}, CredentialsRefused,
                     None, id="401"),
        pytest.param(403, {"success": False, "message": "Forbidden"}, {}, CredentialsRefused,
                     None, id="403"),
        pytest.param(429, {"message": "slow down"}, {"Retry-After": "7"}, RateLimited, 7.0,
                     id="429"),
        pytest.param(503, {"message": "maintenance"}, {"Retry-After": "2"}, Unavailable, 2.0,
                     id="503"),
        pytest.param(500, {"message": "oops"}, {}, ServerError, None, id="500"),
        pytest.param(502, {"message": "bad gateway"}, {}, ServerError, None, id="502"),
        pytest.param(504, {"message": "gateway timeout"}, {}, ServerError, None, id="504"),
        pytest.param(302, {"message": "moved"}, {}, BadResponse, None, id="3xx-ambiguous"),
    ],
)
async def test_statuses_map_to_what_they_prove(
    status: int, body: dict[str, object], headers: dict[str, str], error: type[Exception],
    retry: float | None,
) -> None:
    """Each status becomes the error class that says whether the note may have landed."""
    client, _ = client_answering(status_code=status, json=body, headers=headers)
    async with client:
        with pytest.raises(error) as caught:
            await client.create_task_note("t", "n")
    assert caught.value.http_status == status  # type: ignore[attr-defined]
    assert str(body["message"]) in str(caught.value)
    assert getattr(caught.value, "retry_after", None) == retry


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"<html>ok</html>", id="not-json"),
     pytest.param(b'{"success": true, "task_note_id": "abc"}', id="no-job-id"),
     pytest.param(b'{"success": false, "message": "hm"}', id="success-false"),
     pytest.param(b"[1, 2]", id="not-an-object")],
)
async def test_a_malformed_success_is_ambiguous(content: bytes) -> None:
    """A 2xx whose body is not the documented JSON may still have created the note."""
    client, _ = client_answering(status_code=200, content=content)
    async with client:
        with pytest.raises(BadResponse):
            await client.create_task_note("t", "n")


@pytest.mark.parametrize(
    ("raised", "error"),
    [
        pytest.param(httpx.ConnectError("refused"), NotSent, id="connect-error"),
        pytest.param(httpx.ConnectTimeout("slow connect"), NotSent, id="connect-timeout"),
        pytest.param(httpx.PoolTimeout("pool"), NotSent, id="pool-timeout"),
        pytest.param(httpx.ReadTimeout("slow"), NoResponse, id="read-timeout"),
        pytest.param(httpx.WriteTimeout("slow write"), NoResponse, id="write-timeout"),
        pytest.param(httpx.RemoteProtocolError("disconnected"), NoResponse, id="dropped"),
        pytest.param(httpx.ReadError("reset"), NoResponse, id="reset"),
    ],
)
async def test_transport_failures_map_to_sent_or_not(raised: Exception,
                                                     error: type[Exception]) -> None:
    """Only failures before the request left are NotSent; the rest may have taken effect."""
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    async with CobaltClient(API, transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(error):
            await client.create_task_note("t", "n")


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After in seconds or as an HTTP date becomes seconds from now; junk is ignored."""
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)

    def of(value: str) -> float | None:
        return retry_after(httpx.Response(429, headers={"Retry-After": value}), now=now)

    assert of("12") == 12.0
    assert of(date) == 30.0
    assert of("Sat, 28 Nov 2026 12:00:30 -0000") == 30.0  # a date with no zone is UTC
    assert of(format_datetime(now - timedelta(seconds=5), usegmt=True)) == 0.0
    assert of("soon") is None
    assert retry_after(httpx.Response(429)) is None


async def test_webhook_events_are_listed_with_paging() -> None:
    """GET /v1/webhook-events passes the filters and returns items and page counts."""
    page = {"success": True, "webhook_events": [{"event_id": "evt_1"}],
            "pagination": {"current_page": 2, "total_pages": 3, "total_count": 201,
                           "page_size": 100}}
    client, seen = client_answering(status_code=200, json=page)
    async with client:
        result = await client.webhook_events(job_id="12345", page=2, page_size=100)
    assert seen[0].url.params["job_id"] == "12345"
    assert (result.page, result.total_pages, result.events) == (2, 3, [{"event_id": "evt_1"}])


def test_missing_credentials_stop_before_any_request() -> None:
    """A client cannot be built without the three credentials."""
    with pytest.raises(ConfigError, match=r"api\.client_id"):
        CobaltClient(ApiConfig())


async def test_an_events_page_is_asked_for_with_the_filters_and_read_as_documented() -> None:
    """GET /v1/webhook-events: the three auth headers, the filters as query parameters, the
    configured timeouts; every item as sent (poll, not the client, judges whether it can read
    one, so it can name what it found) and the pagination's page and total_pages come back."""
    item = {"event_id": "evt_1", "event_type": "task_note.created", "job_id": "7"}
    client, seen = client_answering(status_code=200, json={
        "success": True, "webhook_events": [item, "not an object"],
        "pagination": {"current_page": 2, "total_pages": 5, "total_count": 9, "page_size": 2}})
    async with client:
        page = await client.webhook_events(job_id="7", page=2, page_size=2)
    (request,) = seen
    assert request.method == "GET"
    assert request.url.path == "/v1/webhook-events"
    assert dict(request.url.params) == {"job_id": "7", "page": "2", "page_size": "2"}
    assert all(request.headers[k] == v for k, v in CREDENTIALS.items())
    assert request.extensions["timeout"] == {"connect": API.connect_timeout_s,
                                             "read": API.timeout_s, "write": API.timeout_s,
                                             "pool": API.connect_timeout_s}  # never unbounded
    assert (page.events, page.page, page.total_pages) == ([item, "not an object"], 2, 5)


async def test_an_events_page_without_pagination_is_page_one_of_one() -> None:
    """Missing pagination numbers default to the page asked for (else 1) of 1."""
    client, _ = client_answering(status_code=200, json={"success": True, "webhook_events": []})
    async with client:
        asked = await client.webhook_events(page=3)
        plain = await client.webhook_events()
    assert (asked.page, asked.total_pages) == (3, 1)
    assert (plain.page, plain.total_pages) == (1, 1)


@pytest.mark.parametrize(
    ("response", "error"),
    [pytest.param({"status_code": 200, "json": {"success": True}}, BadResponse, id="no-items"),
     pytest.param({"status_code": 200, "json": {"webhook_events": {}}}, BadResponse,
                  id="items-not-a-list"),
     pytest.param({"status_code": 200, "json": {"webhook_events": [], "pagination": [2, 5]}},
                  BadResponse, id="pagination-not-an-object"),
     pytest.param({"status_code": 200, "content": b"<html>"}, BadResponse, id="not-json"),
     pytest.param({"status_code": 429, "headers": {"Retry-After": "7"},
                   "json": {"success": False, "message": "Too many requests"}}, RateLimited,
                  id="429"),
     pytest.param({"status_code": 401, "json": {"success": False, "message": "no"}},
                  CredentialsRefused, id="401")],
)
async def test_a_bad_events_answer_is_classified(response: dict[str, object],
                                                 error: type[Exception]) -> None:
    """A shape the documentation does not give is BadResponse; statuses map as for POST."""
    client, _ = client_answering(**response)
    async with client:
        with pytest.raises(error) as caught:
            await client.webhook_events(page=1)
    if error is RateLimited:
        assert caught.value.retry_after == 7.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("pagination", "named"),
    [pytest.param({"current_page": 1, "total_pages": "n/a"}, "pagination.total_pages is a JSON "
                  "string, not an integer", id="total-pages-n/a"),
     pytest.param({"current_page": 1, "total_pages": "3"}, "pagination.total_pages is a JSON "
                  "string", id="total-pages-a-numeric-string"),
     pytest.param({"current_page": 1, "total_pages": 2.5}, "pagination.total_pages is a JSON "
                  "number, not an integer", id="total-pages-a-fraction"),
     pytest.param({"current_page": 1, "total_pages": True}, "pagination.total_pages is a JSON "
                  "boolean", id="total-pages-true"),
     pytest.param({"current_page": 1, "total_pages": -1}, "pagination.total_pages is an integer "
                  "outside 0..100,000", id="total-pages-negative"),
     pytest.param({"current_page": 1, "total_pages": 10**18}, "pagination.total_pages is an "
                  "integer outside 0..100,000", id="total-pages-huge"),
     pytest.param({"current_page": 1, "total_pages": 1e308}, "pagination.total_pages is a JSON "
                  "number", id="total-pages-huge-float"),
     pytest.param({"current_page": 0, "total_pages": 1}, "pagination.current_page is an integer "
                  "outside 1..100,000", id="current-page-zero"),
     pytest.param({"current_page": ["two"], "total_pages": 1}, "pagination.current_page is a "
                  "JSON array", id="current-page-an-array")],
)
async def test_odd_pagination_is_a_bad_response_naming_the_field_not_its_value(
        pagination: dict[str, object], named: str) -> None:
    """Pagination numbers that are not integers in range are BadResponse (never a ValueError
    from int()), and the message names the field and JSON type, not the upstream value."""
    client, _ = client_answering(status_code=200, json={
        "success": True, "webhook_events": [], "pagination": pagination})
    async with client:
        with pytest.raises(BadResponse) as caught:
            await client.webhook_events(page=1)
    message = str(caught.value)
    assert message == caught.value.message
    assert named in message
    assert message.startswith("HTTP 200 bad-response: ")
    odd = next(v for v in pagination.values() if not (type(v) is int and 1 <= v <= 100_000))
    assert str(odd) not in message.removeprefix("HTTP 200 bad-response: ").replace(
        "100,000", "")


@pytest.mark.parametrize(
    ("pagination", "expected"),
    [pytest.param({"current_page": 2}, (2, 1), id="no-total-pages"),
     pytest.param({"current_page": None, "total_pages": None}, (4, 1), id="nulls"),
     pytest.param({"current_page": 4, "total_pages": 0}, (4, 0), id="no-pages"),
     pytest.param({"current_page": 4, "total_pages": 100_000}, (4, 100_000), id="the-most-pages")],
)
async def test_absent_pagination_numbers_take_the_documented_defaults(
        pagination: dict[str, object], expected: tuple[int, int]) -> None:
    """An absent or null number is the page asked for, of 1; the range's ends are accepted."""
    client, _ = client_answering(status_code=200, json={
        "success": True, "webhook_events": [], "pagination": pagination})
    async with client:
        page = await client.webhook_events(page=4)
    assert (page.page, page.total_pages) == expected
