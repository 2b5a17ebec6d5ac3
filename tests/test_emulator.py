"""The emulator behaves as Cobalt's documentation says, faults included."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from helpers import (
    CREDENTIALS,
    WEBHOOK_SECRET,
    EmulatorThread,
    emulator_options,
    serving,
    wait_until,
)
from pipeline.emulator import ACCEPTED_MESSAGE, Emulator, Faults

HEADERS = {**CREDENTIALS, "content-type": "application/json"}


def asgi_client(**options: Any) -> tuple[Emulator, httpx.AsyncClient]:
    emulator = Emulator(emulator_options(**options))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app()),
                               base_url="http://emulator")
    return emulator, client


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"note": "x"}, "Missing required field: emr_task_id", id="missing-task"),
        pytest.param({"emr_task_id": "T1"}, "Missing required field: note", id="missing-note"),
        pytest.param({"emr_task_id": "T1", "note": "x", "subject": "y"},
                     "Unexpected fields in request body: subject", id="unexpected"),
    ],
)
async def test_400_messages_match_the_reference_page(body: dict[str, str], message: str) -> None:
    """The two documented 400 bodies, byte for byte: success false and the message."""
    _, client = asgi_client()
    async with client:
        response = await client.post("/v1/tasks/notes", json=body, headers=CREDENTIALS)
    assert response.status_code == 400
    assert response.json() == {"success": False, "message": message}


@pytest.mark.parametrize(
    "headers",
    [pytest.param({}, id="none"),
     pytest.param({**CREDENTIALS, "access_token": "wrong"}, id="wrong-token"),
     pytest.param({k: v for k, v in CREDENTIALS.items() if k != "client_secret"},
                  id="missing-secret")],
)
async def test_requests_without_the_three_credentials_get_401(headers: dict[str, str]) -> None:
    """All three of client_id, client_secret and access_token must match."""
    emulator, client = asgi_client()
    async with client:
        response = await client.post("/v1/tasks/notes", json={"emr_task_id": "T", "note": "n"},
                                     headers=headers)
    assert response.status_code == 401
    assert response.json()["success"] is False
    assert emulator.stored == {}


async def test_success_has_a_24_hex_task_note_id_and_an_integer_job_id() -> None:
    """The success body is the documented one."""
    _, client = asgi_client()
    async with client:
        response = await client.post("/v1/tasks/notes", json={"emr_task_id": "T", "note": "n"},
                                     headers=CREDENTIALS)
    data = response.json()
    assert response.status_code == 200
    assert data["success"] is True
    assert data["message"] == ACCEPTED_MESSAGE
    assert re.fullmatch(r"[0-9a-f]{24}", data["task_note_id"])
    assert isinstance(data["job_id"], int)


class Receiver:
    """A webhook endpoint that records what arrives and answers as told."""

    def __init__(self, answers: list[int] | None = None, *, hold_first: bool = False) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrivals: list[float] = []  # monotonic time of each request, in arrival order
        self.answers = answers or []
        self.arrived = anyio.Event()
        # hold_first: the first request is answered only once a second one has arrived
        self.second = anyio.Event() if hold_first else None

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.requests.append((dict(request.headers), await request.body()))
            self.arrivals.append(time.monotonic())
            self.arrived.set()
            status = self.answers.pop(0) if self.answers else 200
            if self.second is not None:
                if len(self.requests) == 1:
                    await self.second.wait()
                else:
                    self.second.set()
            return Response(status_code=status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


async def post_note(url: str, task_id: str = "T1", note: str = "Call back — café 🙂") -> int:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/tasks/notes", headers=CREDENTIALS,
                                     json={"emr_task_id": task_id, "note": note})
    return int(response.json()["job_id"])


async def test_an_outcome_webhook_is_signed_and_shaped_as_documented() -> None:
    """task_note.created arrives signed (HMAC-SHA256 of the exact body) with a string job_id."""
    receiver = Receiver()
    async with serving(receiver.app()) as hook:
        emulator = Emulator(emulator_options(webhook_url=f"{hook.url}/hook"))
        async with serving(emulator.app()) as api:
            job_id = await post_note(api.url)
            with anyio.fail_after(10):
                await receiver.arrived.wait()
    headers, body = receiver.requests[0]
    expected = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["cobalt-verification"] == expected
    event = json.loads(body)
    assert body == json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(event) == ["id", "access_token_reference_id", "object", "created", "type",
                           "job_id", "data"]
    assert event["type"] == "task_note.created"
    assert event["job_id"] == str(job_id)
    assert event["data"]["note"] == "Call back — café 🙂"
    assert headers["webhook-id"] == event["id"]
    assert headers["webhook-attempt"] == "1"
    # ISO 8601 with milliseconds, as JavaScript's Date.toISOString() writes it
    for when in (headers["webhook-timestamp"], event["created"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", when)


async def test_a_missing_task_fails_in_the_emr_with_a_reason() -> None:
    """A task the EMR does not have gets task_note.failed with failure_reason and reasons."""
    receiver = Receiver()
    async with serving(receiver.app()) as hook:
        emulator = Emulator(emulator_options(webhook_url=f"{hook.url}/hook",
                                             missing_tasks=frozenset({"GONE-1"})))
        async with serving(emulator.app()) as api:
            await post_note(api.url, task_id="GONE-1")
            with anyio.fail_after(10):
                await receiver.arrived.wait()
    event = json.loads(receiver.requests[0][1])
    assert event["type"] == "task_note.failed"
    assert event["data"]["failure_reason"] == "Task not found in EMR"
    assert event["data"]["reasons"] == [{"code": "task_not_found",
                                         "description": "Task not found in EMR"}]


@pytest.mark.parametrize(
    ("answers", "attempts"),
    [pytest.param([500], 2, id="5xx-retried-once"),
     pytest.param([503, 503], 2, id="only-once"),
     pytest.param([429], 2, id="429-retried"),
     pytest.param([400], 1, id="4xx-not-retried"),
     pytest.param([200], 1, id="delivered")],
)
async def test_webhook_retries_follow_cobalt(answers: list[int], attempts: int) -> None:
    """Cobalt retries once on a 5xx or 429; never on another 4xx (the delay: next test)."""
    receiver = Receiver(answers=list(answers))
    async with serving(receiver.app()) as hook:
        emulator = Emulator(emulator_options(webhook_url=f"{hook.url}/hook"))
        async with serving(emulator.app()) as api:
            await post_note(api.url)
            with anyio.fail_after(10):
                await emulator.until(lambda e: sum(e.deliveries.values()) == 1)
    assert len(receiver.requests) == attempts
    assert [h["webhook-attempt"] for h, _ in receiver.requests] == [
        str(i) for i in range(1, attempts + 1)]
    assert receiver.requests[0][1] == receiver.requests[-1][1]


async def test_a_webhook_retry_waits_a_second() -> None:
    """The retry after a 5xx comes 1 s later, and deliveries do not queue behind one another:
    the first attempt's 500 is held until a second note's webhook has arrived (order, not
    speed: deliveries one at a time would never get there), and the retry is no sooner than
    1 s after the first attempt."""
    receiver = Receiver(answers=[500], hold_first=True)
    async with serving(receiver.app()) as hook:
        emulator = Emulator(emulator_options(webhook_url=f"{hook.url}/hook"))
        async with serving(emulator.app()) as api:
            await post_note(api.url, task_id="T1", note="first")
            with anyio.fail_after(10):
                await receiver.arrived.wait()
            await post_note(api.url, task_id="T2", note="second")
            with anyio.fail_after(10):
                await emulator.until(lambda e: sum(e.deliveries.values()) == 2)
    tasks = [json.loads(body)["data"]["emr_task_id"] for _, body in receiver.requests]
    assert tasks == ["T1", "T2", "T1"]  # order: the second note overtook the retry
    # A lower bound on one clock: a loaded machine can only make the gap longer.
    assert receiver.arrivals[2] - receiver.arrivals[0] >= 1.0


async def test_events_can_be_polled_by_job_id_and_page() -> None:
    """GET /v1/webhook-events filters by job_id and pages, in the list-item shape."""
    emulator = Emulator(emulator_options())
    async with serving(emulator.app()) as api:
        jobs = [await post_note(api.url, task_id=f"T{i}", note=f"n{i}") for i in range(5)]
        with anyio.fail_after(10):
            await emulator.until(lambda e: len(e.events) == 5)
        async with httpx.AsyncClient(base_url=api.url, headers=CREDENTIALS) as client:
            one = (await client.get("/v1/webhook-events", params={"job_id": str(jobs[2])})).json()
            page = (await client.get("/v1/webhook-events",
                                     params={"page": 2, "page_size": 2})).json()
            too_big = await client.get("/v1/webhook-events", params={"page_size": 101})
    (item,) = one["webhook_events"]
    assert set(item) == {"event_id", "event_type", "webhook_url", "delivery_status", "data",
                         "created_at", "job_id", "access_token_reference_id"}
    assert item["job_id"] == str(jobs[2])
    assert page["pagination"] == {"current_page": 2, "total_pages": 3, "total_count": 5,
                                  "page_size": 2}
    assert len(page["webhook_events"]) == 2
    assert too_big.status_code == 400


async def test_faults_depend_on_the_seed_not_on_arrival_order() -> None:
    """The same seed faults the same notes, whatever order they are sent in."""
    async def faulted(order: list[int]) -> set[int]:
        _, client = asgi_client(faults=Faults(rate_503=0.5), seed=42)
        async with client:
            statuses = {}
            for i in order:
                r = await client.post("/v1/tasks/notes", headers=CREDENTIALS,
                                      json={"emr_task_id": f"T{i}", "note": "n"})
                statuses[i] = r.status_code
        return {i for i, s in statuses.items() if s == 503}

    forward = await faulted(list(range(40)))
    backward = await faulted(list(reversed(range(40))))
    assert forward == backward
    assert 5 < len(forward) < 35


async def test_429_carries_retry_after_in_seconds_or_as_a_date() -> None:
    """A 429 says when to come back, in either of the forms HTTP allows."""
    for as_date, pattern in ((False, r"\d+"), (True, r"\w{3}, \d\d \w{3} \d{4} .* GMT")):
        _, client = asgi_client(faults=Faults(rate_429=1.0, retry_after_s=2,
                                              retry_after_as_date=as_date))
        async with client:
            r = await client.post("/v1/tasks/notes", headers=CREDENTIALS,
                                  json={"emr_task_id": "T", "note": "n"})
        assert r.status_code == 429
        assert re.fullmatch(pattern, r.headers["retry-after"])


async def test_ids_stay_unique_across_restarts_with_the_same_seed() -> None:
    """A restarted emulator (same seed) never reuses a job id, task note id or event id:
    a sandbox's sink file outlives the emulator, and reused ids would match old events."""
    seen: list[dict[str, Any]] = []
    for _ in range(2):
        emulator = Emulator(emulator_options(seed=7))
        async with (serving(emulator.app()) as api,
                    httpx.AsyncClient(base_url=api.url, headers=CREDENTIALS) as client):
            r = await client.post("/v1/tasks/notes", json={"emr_task_id": "T", "note": "n"})
            with anyio.fail_after(10):
                await emulator.until(lambda e: len(e.events) == 1)
            (item,) = (await client.get("/v1/webhook-events")).json()["webhook_events"]
        seen.append({**r.json(), "event": item["event_id"]})
    assert seen[0]["job_id"] != seen[1]["job_id"]
    assert seen[0]["task_note_id"] != seen[1]["task_note_id"]
    assert seen[0]["event"] != seen[1]["event"]


@pytest.mark.parametrize(
    ("shape", "keys", "status_filter"),
    [pytest.param("event_id", {"event_id", "event_type", "webhook_url", "delivery_status",
                               "data", "created_at", "job_id", "access_token_reference_id"},
                  "delivery_status", id="event_id"),
     pytest.param("envelope", {"id", "access_token_reference_id", "object", "created", "type",
                               "job_id", "status", "delivered", "delivery_attempts",
                               "last_delivery_attempt", "response_status_code", "data"},
                  "status", id="envelope")],
)
async def test_events_are_listed_in_either_documented_shape(
    shape: str, keys: set[str], status_filter: str
) -> None:
    """GET /v1/webhook-events answers in the configured revision's shape and honours that
    revision's delivery filter name (the other name is ignored, as an unknown parameter)."""
    receiver = Receiver(answers=[200, 500, 500])  # first delivered; second fails twice
    async with serving(receiver.app()) as hook:
        emulator = Emulator(emulator_options(webhook_url=f"{hook.url}/hook",
                                             events_shape=shape))
        async with serving(emulator.app()) as api:
            await post_note(api.url, task_id="T1", note="n1")
            with anyio.fail_after(10):
                await emulator.until(lambda e: sum(e.deliveries.values()) == 1)
            await post_note(api.url, task_id="T2", note="n2")
            with anyio.fail_after(10):
                await emulator.until(lambda e: sum(e.deliveries.values()) == 2)
            async with httpx.AsyncClient(base_url=api.url, headers=CREDENTIALS) as client:
                every = (await client.get("/v1/webhook-events")).json()["webhook_events"]
                failed = (await client.get("/v1/webhook-events",
                                           params={status_filter: "failed"})).json()
                other = "status" if status_filter == "delivery_status" else "delivery_status"
                ignored = (await client.get("/v1/webhook-events",
                                            params={other: "failed"})).json()
    assert len(every) == 2
    assert all(set(item) == keys for item in every)
    (item,) = failed["webhook_events"]
    assert item["data"]["emr_task_id"] == "T2"
    assert len(ignored["webhook_events"]) == 2
    if shape == "envelope":
        delivered, missed = sorted(every, key=lambda i: i["data"]["emr_task_id"])
        assert (delivered["status"], delivered["delivered"], delivered["delivery_attempts"],
                delivered["response_status_code"]) == ("success", True, 1, 200)
        assert (missed["status"], missed["delivered"], missed["delivery_attempts"],
                missed["response_status_code"]) == ("failed", False, 2, 500)
        assert isinstance(missed["job_id"], str)
        assert missed["object"] == "event"


def test_a_client_killed_mid_request_is_one_line_not_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A client killed while its request body is on the way (a run killed with kill -9):
    the emulator stores nothing and logs no "Exception in ASGI application" traceback
    (newcomer LOW), and goes on answering."""
    import socket  # noqa: PLC0415 - this test only

    with EmulatorThread(latency_ms=(0.0, 0.0)) as api:
        host, port = api.url.removeprefix("http://").split(":")
        headers = "".join(f"{k}: {v}\r\n" for k, v in CREDENTIALS.items())
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall((f"POST /v1/tasks/notes HTTP/1.1\r\nHost: {host}\r\n{headers}"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         '{"emr_task_id": "T1", "no').encode())
            wait_until(lambda: api.emulator.requests == 1, timeout=10, what="the request")
        wait_until(lambda: api.emulator.disconnected == 1, timeout=10, what="the disconnect")
        answer = httpx.post(f"{api.url}/v1/tasks/notes", headers=CREDENTIALS,
                            json={"emr_task_id": "T2", "note": "a note"}, timeout=10)
        assert answer.status_code == 200
        assert sum(api.emulator.stored_by.values()) == 1  # T2 only
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
