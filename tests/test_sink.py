"""The webhook sink: verified, durable before 2xx, de-duplicated, bounded, quiet about PHI."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from helpers import WEBHOOK_SECRET, free_port, serving, wait_until, write_config
from pipeline.emulator import compact, sign
from pipeline.errors import StateError
from pipeline.events import SinkFile, read_sink
from pipeline.sink import WebhookReceiver

NOTE = "Patient called — café au lait spots 🙂 “quoted”"


def event(n: int = 1, *, event_type: str = "task_note.created", note: str = NOTE
          ) -> dict[str, Any]:
    return {"id": f"evt_{n:024d}", "access_token_reference_id": "user_1", "object": "event",
            "created": "2026-06-15T12:02:40Z", "type": event_type, "job_id": str(10000 + n),
            "data": {"task_note_id": f"{n:024x}", "emr_note_id": "f862b0a0",
                     "emr_task_id": f"T{n}", "note": note}}


def signed(body: bytes, secret: str = WEBHOOK_SECRET, event_id: str | None = None
           ) -> dict[str, str]:
    headers = {"content-type": "application/json", "cobalt-verification": sign(body, secret),
               "webhook-attempt": "1", "webhook-timestamp": "2026-06-15T12:02:41Z"}
    if event_id:
        headers["webhook-id"] = event_id
    return headers


@asynccontextmanager
async def sink_running(tmp_path: Path, secrets: tuple[str, ...] = (WEBHOOK_SECRET,),
                       **kwargs: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(path, **kwargs)
    sink.open()
    receiver = WebhookReceiver(sink, [s.encode() for s in secrets], max_body_bytes=64 * 1024)
    try:
        async with serving(receiver.app()) as srv, httpx.AsyncClient(base_url=srv.url) as client:
            yield client, path
    finally:
        sink.close()


async def post(client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> int:
    return (await client.post("/webhooks/cobalt", content=body, headers=headers)).status_code


async def test_a_cobalt_signed_body_is_stored_byte_identical(tmp_path: Path) -> None:
    """Compact JSON with non-ASCII as is, signed with the secret: 200, and the line is the body."""
    body = compact(event())
    assert "é".encode() in body
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body, event_id="evt_1")) == 200
    assert path.read_bytes() == body + b"\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda b: (b.replace(b"T1", b"T2"), signed(b)), id="tampered-byte"),
        pytest.param(lambda b: (b, signed(b, secret="wrong")), id="wrong-secret"),
        pytest.param(lambda b: (b, {"content-type": "application/json"}), id="missing-header"),
        pytest.param(lambda b: (b, {"cobalt-verification": "zz" * 32}), id="not-hex"),
        pytest.param(lambda b: (b, {"cobalt-verification": sign(b, WEBHOOK_SECRET)[:40]}),
                     id="truncated"),
    ],
)
async def test_a_bad_signature_gets_401_and_writes_nothing(tmp_path: Path, forge: Any) -> None:
    """One tampered byte, a wrong secret, a missing or malformed header: 401, file unchanged."""
    body, headers = forge(compact(event()))
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, headers) == 401
    assert path.read_bytes() == b""


async def test_either_of_two_rotated_secrets_verifies(tmp_path: Path) -> None:
    """During a rotation the new and the old secret are both accepted."""
    async with sink_running(tmp_path, secrets=("old-secret", "new-secret")) as (client, path):
        first, second = compact(event(1)), compact(event(2))
        assert await post(client, first, signed(first, "old-secret")) == 200
        assert await post(client, second, signed(second, "new-secret")) == 200
    assert len(path.read_bytes().splitlines()) == 2


async def test_a_repeated_delivery_is_stored_once(tmp_path: Path) -> None:
    """The same delivery twice, and the same body under a new webhook-id: one line, both 200."""
    body = compact(event())
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body, event_id="evt_1")) == 200
        assert await post(client, body, signed(body, event_id="evt_1")) == 200
        assert await post(client, body, signed(body, event_id="evt_replayed")) == 200
    assert path.read_bytes().count(b"\n") == 1


async def test_duplicates_are_remembered_across_restarts(tmp_path: Path) -> None:
    """After a restart the sink still knows what it stored."""
    body = compact(event())
    async with sink_running(tmp_path) as (client, _):
        assert await post(client, body, signed(body)) == 200
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body)) == 200
    assert path.read_bytes().count(b"\n") == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [pytest.param(b"{not json", 400, id="not-json"),
     pytest.param(b'["an", "array"]', 400, id="not-an-object"),
     pytest.param(b'{"type": "task_note.created"}', 400, id="no-id")],
)
async def test_a_signed_body_that_is_not_an_event_gets_400(tmp_path: Path, body: bytes,
                                                           status: int) -> None:
    """Unparseable JSON or an event without an id: a 4xx (never a 5xx), nothing written."""
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body)) == status
    assert path.read_bytes() == b""


async def test_every_event_type_is_stored(tmp_path: Path) -> None:
    """The endpoint receives all of the account's events; all are kept for reconcile to sort."""
    async with sink_running(tmp_path) as (client, path):
        for n, kind in enumerate(("appointment.created", "patient.updated", "task.completed")):
            body = compact(event(n, event_type=kind))
            assert await post(client, body, signed(body)) == 200
    assert [e["type"] for _, e in read_sink(path)] == [
        "appointment.created", "patient.updated", "task.completed"]


async def test_a_failed_fsync_never_gets_a_2xx(tmp_path: Path) -> None:
    """If the line cannot be made durable the answer is a 5xx (Cobalt retries), never a 2xx."""
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async with sink_running(tmp_path, fsync=broken_fsync) as (client, _):
        body = compact(event())
        assert await post(client, body, signed(body)) == 503
        other = compact(event(2))
        assert await post(client, other, signed(other)) == 503
        assert (await client.get("/healthz")).status_code == 503


async def test_200_concurrent_deliveries_are_200_intact_lines(tmp_path: Path) -> None:
    """Concurrent deliveries share fsyncs and every one ends up as its own whole line."""
    bodies = [compact(event(n)) for n in range(200)]
    statuses: list[int] = []
    async with sink_running(tmp_path) as (client, path), anyio.create_task_group() as tg:
        for body in bodies:
            async def one(body: bytes = body) -> None:
                statuses.append(await post(client, body, signed(body)))
            tg.start_soon(one)
    assert statuses == [200] * 200
    lines = path.read_bytes().splitlines()
    assert sorted(lines) == sorted(bodies)


async def test_logs_name_the_event_but_never_the_body_or_a_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log line carries id, type, size, attempt and verdict; no note text, no signature."""
    body = compact(event())
    with caplog.at_level(logging.INFO, logger="pipeline"):
        async with sink_running(tmp_path) as (client, _):
            await post(client, body, signed(body))
            await post(client, body, signed(body, secret="wrong"))
    text = caplog.text
    assert "evt_000000000000000000000001" in text
    assert "task_note.created" in text
    assert "café" not in text
    assert NOTE not in text
    assert sign(body, WEBHOOK_SECRET) not in text


# -- the sink file ----------------------------------------------------------------------------


def test_a_torn_tail_is_moved_aside_and_the_next_line_starts_fresh(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial line: it goes to .torn, appends start on a new line."""
    path = tmp_path / "state" / "webhooks.jsonl"
    path.parent.mkdir(mode=0o700)
    good = compact(event(1))
    path.write_bytes(good + b"\n" + b'{"id": "evt_torn", "typ')
    assert [e["id"] for _, e in read_sink(path)] == [event(1)["id"]]  # torn tail: skipped
    sink = SinkFile(path)
    sink.open()

    async def append() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            await sink.append(compact(event(2)), event(2)["id"])
            sink.stop()

    anyio.run(append)
    sink.close()
    assert path.read_bytes() == good + b"\n" + compact(event(2)) + b"\n"
    assert path.with_name("webhooks.jsonl.torn").read_bytes() == b'{"id": "evt_torn", "typ\n'


@pytest.mark.parametrize(
    ("good", "torn"),
    [pytest.param(2, b'{"id": "evt_torn", "typ', id="after-two-lines"),
     pytest.param(1, b"x" * 65_535, id="newline-at-a-64k-boundary"),
     pytest.param(1, b"x" * 100_000, id="longer-than-64k"),
     pytest.param(0, b'{"id": "evt_torn"', id="no-complete-line")],
)
def test_only_the_torn_tail_is_moved_aside(tmp_path: Path, good: int, torn: bytes) -> None:
    """Whatever its length, exactly the bytes after the last newline go to .torn: every
    complete (acknowledged) line stays."""
    path = tmp_path / "state" / "webhooks.jsonl"
    path.parent.mkdir(mode=0o700)
    lines = b"".join(compact(event(n)) + b"\n" for n in range(1, good + 1))
    path.write_bytes(lines + torn)
    sink = SinkFile(path)
    sink.open()
    sink.close()
    assert path.read_bytes() == lines
    assert path.with_name("webhooks.jsonl.torn").read_bytes() == torn + b"\n"


async def test_an_event_id_is_remembered_across_restarts_whatever_its_bytes(tmp_path: Path
                                                                            ) -> None:
    """A polled copy of an event (other bytes, same id) stored before a restart is a
    duplicate after it: the sink indexes the ids of the lines it finds on opening."""
    path = tmp_path / "state" / "webhooks.jsonl"
    first = SinkFile(path)
    first.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        assert await first.append(compact(event(1)), event(1)["id"]) == "stored"
        first.stop()
    first.close()
    again = SinkFile(path)
    again.open()
    polled = compact({**event(1), "created": "2026-06-15T12:09:00Z"})  # other bytes, same id
    assert again.seen(event(1)["id"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(again.run)
        assert await again.append(polled, event(1)["id"]) == "duplicate"
        again.stop()
    again.close()
    assert path.read_bytes().count(b"\n") == 1
    assert not path.with_name("webhooks.jsonl.torn").exists()  # a clean tail is left alone


async def test_a_body_with_carriage_returns_is_stored_as_one_compact_line(tmp_path: Path
                                                                          ) -> None:
    """A CR inside a body would split its line on reading: the body is stored re-serialised
    compactly (same content), one event per line."""
    path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(path)
    sink.open()
    body = b'{"id": "evt_cr",\r"type": "task_note.created", "data": {}}'
    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run)
        assert await sink.append(body, "evt_cr") == "stored"
        sink.stop()
    sink.close()
    assert path.read_bytes() == b'{"id":"evt_cr","type":"task_note.created","data":{}}\n'


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path: Path) -> None:
    """Corruption that is not a torn tail is not skipped silently."""
    path = tmp_path / "w.jsonl"
    path.write_bytes(compact(event(1)) + b"\nGARBAGE\n" + compact(event(2)) + b"\n")
    with pytest.raises(StateError, match=r"w.jsonl line 2: not a JSON event"):
        list(read_sink(path))


# -- a real sink process ------------------------------------------------------------------------


def start_sink(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``tasknotes sink`` in its own process; returns once it answers."""
    config = write_config(tmp_path, webhooks={"max_body_bytes": 1024 * 1024})
    port = free_port()
    with (tmp_path / "sink.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "sink.log").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=20, what="the sink to listen")
    return proc, url, tmp_path / "state" / "webhooks.jsonl"


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


@pytest.mark.slow
def test_a_10_mb_body_is_refused_without_being_buffered(tmp_path: Path) -> None:
    """10 MB with or without Content-Length: 413, and the sink process does not grow by 10 MB."""
    proc, url, path = start_sink(tmp_path)
    try:
        before = rss_peak_kb(proc.pid)
        headers = signed(b"irrelevant")
        with httpx.Client(base_url=url, timeout=10) as client:
            declared = client.post("/webhooks/cobalt", content=chunks(10 * 2**20),
                                   headers={**headers, "content-length": str(10 * 2**20)})
            chunked = client.post("/webhooks/cobalt", content=chunks(10 * 2**20),
                                  headers=headers)
        assert declared.status_code == 413
        assert chunked.status_code == 413
        assert rss_peak_kb(proc.pid) - before < 5 * 1024
        assert path.read_bytes() == b""
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_every_acknowledged_event_survives_a_sigkill(tmp_path: Path) -> None:
    """Kill -9 under load: each event that got a 2xx is in the file, and the file still reads."""
    proc, url, path = start_sink(tmp_path)
    acknowledged: set[str] = set()

    async def load() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            async def deliver(n: int) -> None:
                body = compact(event(n))
                try:
                    r = await client.post("/webhooks/cobalt", content=body, headers=signed(body))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acknowledged.add(event(n)["id"])
                if len(acknowledged) == 150:
                    os.kill(proc.pid, signal.SIGKILL)

            limiter = anyio.CapacityLimiter(30)
            async with anyio.create_task_group() as tg:
                for n in range(2000):
                    async def run(n: int = n) -> None:
                        async with limiter:
                            await deliver(n)
                    tg.start_soon(run)

    try:
        anyio.run(load)
    finally:
        proc.kill()
        proc.wait(10)
    assert len(acknowledged) >= 150
    stored = {e["id"] for _, e in read_sink(path)}
    assert acknowledged <= stored
