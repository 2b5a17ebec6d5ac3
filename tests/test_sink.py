"""The webhook sink: verified, durable before 2xx, de-duplicated, bounded, quiet about PHI."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from helpers import WEBHOOK_SECRET, free_port, read_sink, wait_until_healthy, write_config
from pipeline.emulator import sign
from pipeline.events import MAX_DEPTH, SetAside, SinkFile, read_sink_from, receipts_path
from pipeline.events import compact_json as compact  # the bytes Cobalt signs and sends
from pipeline.servers import serve_embedded
from pipeline.sink import SinkLimits, WebhookReceiver

MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
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
                       limits: SinkLimits | None = None, state: Path | None = None,
                       **kwargs: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    """The receiver served as ``tasknotes sink`` serves it (its uvicorn limits included)."""
    path = (state or tmp_path / "state") / "webhooks.jsonl"
    sink = SinkFile(path, **kwargs)
    sink.open()
    receiver = WebhookReceiver(sink, [s.encode() for s in secrets], max_body_bytes=1024 * 1024,
                               limits=limits)
    try:
        async with (anyio.create_task_group() as tg,
                    serve_embedded(receiver.app(), tg, grace_s=0.2,
                                   **receiver.serve_options()) as srv,
                    httpx.AsyncClient(base_url=srv.url) as client):
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


async def test_a_repeated_event_is_stored_once_whatever_its_webhook_id_header(tmp_path: Path
                                                                            ) -> None:
    """The same delivery twice, and the same body under another webhook-id header: one line,
    all 200. The sink dedupes on the event id in the signed body; it never reads the
    webhook-id header, which is why the third post is a duplicate too."""
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


async def test_the_same_event_id_in_other_bytes_is_stored_once_in_one_process(
        tmp_path: Path) -> None:
    """The same event re-serialised (spaces after separators: other bytes, one line) in the
    same sink process: both 200, one line, the first bytes kept."""
    first = compact(event())
    again = json.dumps(event(), ensure_ascii=False, separators=(", ", ": ")).encode()
    assert first != again
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, first, signed(first)) == 200
        assert await post(client, again, signed(again)) == 200
    assert path.read_bytes() == first + b"\n"


@pytest.mark.parametrize(
    ("body", "status"),
    [pytest.param(b"{not json", 400, id="not-json"),
     pytest.param(b'["an", "array"]', 400, id="not-an-object"),
     pytest.param(b'{"type": "task_note.created"}', 400, id="no-id"),
     pytest.param(b'{"id": "", "type": "task_note.created"}', 400, id="empty-id"),
     pytest.param(b'{"id": 7, "type": "task_note.created"}', 400, id="number-id"),
     # ids no store can key on: PostgreSQL text holds no NUL, its btree ~2.7 kB at most
     pytest.param(b'{"id": "evt_\\u0000x", "type": "task_note.created"}', 400, id="nul-in-id"),
     pytest.param(b'{"id": "evt_\\nx", "type": "task_note.created"}', 400, id="newline-in-id"),
     pytest.param(b'{"id": "' + b"e" * 256 + b'", "type": "task_note.created"}', 400,
                  id="256-char-id"),
     pytest.param(b'{"id": "' + "é".encode() * 255 + b'", "type": "task_note.created"}', 200,
                  id="255-char-id")],
)
async def test_a_signed_body_that_is_not_an_event_gets_400(tmp_path: Path, body: bytes,
                                                           status: int) -> None:
    """Unparseable JSON or an event without an id a store can key on (events.check_event_id):
    a 4xx (never a 5xx), nothing written; an id at the limit is stored."""
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body)) == status
    assert path.read_bytes() == (b"" if status == 400 else body + b"\n")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"id":"evt_s","type":"task_note.failed","job_id":"2",'
                     b'"data":{"failure_reason":"locked \\ud83d"}}', id="1-lone-surrogate"),
        pytest.param(json.dumps(event(), ensure_ascii=False).encode("utf-16"), id="2-utf-16"),
        pytest.param(b'{"id":"evt_d","data":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                     id="3-nested-50000-deep"),
        pytest.param(b'{"id":"evt_d","data":' + b"{\"a\":" * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH
                     + b"}", id="3-one-level-too-deep"),
        pytest.param(b'{"id":"evt_n","n":NaN}', id="nan"),
        pytest.param(b'{"id":"evt_i","n":' + b"9" * 5000 + b"}", id="5000-digit-int"),
    ],
)
async def test_a_signed_body_a_reader_would_refuse_gets_400_and_is_not_stored(
        tmp_path: Path, body: bytes) -> None:
    """Findings 1-3: correctly signed, but unreadable by reconcile: 400 (never 200 or 5xx)."""
    async with sink_running(tmp_path) as (client, path):
        response = await client.post("/webhooks/cobalt", content=body, headers=signed(body))
        assert response.status_code == 400
        assert (await client.get("/healthz")).status_code == 200
    assert path.read_bytes() == b""


async def test_a_pretty_printed_body_is_stored_as_one_line_a_reader_reads(tmp_path: Path
                                                                          ) -> None:
    """Newlines between tokens: the line stored is the same event, compact, and reads back."""
    body = json.dumps(event(), indent=2, ensure_ascii=False).encode()
    async with sink_running(tmp_path) as (client, path):
        assert await post(client, body, signed(body)) == 200
    assert path.read_bytes() == compact(event()) + b"\n"
    assert [e for _, e in read_sink(path)] == [event()]


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


async def test_after_failed_fsyncs_the_sink_heals_and_the_file_holds_whole_lines(
        tmp_path: Path) -> None:
    """An I/O error on the batch and on the cut-back: 503 until the device works, then 200."""
    failing = {"on": False}

    def flaky_fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    bodies = [compact(event(n)) for n in range(3)]
    async with sink_running(tmp_path, fsync=flaky_fsync) as (client, path):
        assert await post(client, bodies[0], signed(bodies[0])) == 200
        failing["on"] = True
        assert await post(client, bodies[1], signed(bodies[1])) == 503
        assert (await client.get("/healthz")).status_code == 503
        failing["on"] = False
        assert (await client.get("/healthz")).status_code == 200
        assert await post(client, bodies[2], signed(bodies[2])) == 200
        assert await post(client, bodies[1], signed(bodies[1])) == 200  # Cobalt's retry
    assert path.read_bytes() == bodies[0] + b"\n" + bodies[2] + b"\n" + bodies[1] + b"\n"
    # One receipt per stored line, none for the failed batch (cut back with it), in order.
    receipts = [json.loads(line) for line in receipts_path(path).read_bytes().splitlines()]
    assert [(r["id"], r["offset"]) for r in receipts] == [
        (event(0)["id"], 0), (event(2)["id"], len(bodies[0]) + 1),
        (event(1)["id"], len(bodies[0]) + len(bodies[2]) + 2)]
    assert all(MS.fullmatch(r["received_at"]) for r in receipts)


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
    with caplog.at_level(logging.DEBUG, logger="pipeline"):
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


def test_a_bad_line_in_the_middle_is_set_aside_naming_it(tmp_path: Path) -> None:
    """Corruption that is not a torn tail comes back set aside (line, byte, code), never
    fatal, and reading goes on past it."""
    path = tmp_path / "w.jsonl"
    path.write_bytes(compact(event(1)) + b"\nGARBAGE\n" + compact(event(2)) + b"\n")
    found = list(read_sink_from(path, 0))
    assert [e["id"] for _, _, e in found if not isinstance(e, SetAside)] == [
        event(1)["id"], event(2)["id"]]
    assert [(n, e.offset, e.code) for n, _, e in found if isinstance(e, SetAside)] == [
        (2, len(compact(event(1))) + 1, "not-json")]


def test_the_torn_side_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """Finding 9 (sink half): the .torn fragment may hold note text, so it is private."""
    path = tmp_path / "state" / "webhooks.jsonl"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(compact(event(1)) + b"\n" + b'{"id": "evt_torn", "data": {"note": "Pat')
    old = os.umask(0o022)
    try:
        SinkFile(path).open()
        torn = path.with_name("webhooks.jsonl.torn")
        assert torn.read_bytes() == b'{"id": "evt_torn", "data": {"note": "Pat\n'
        assert oct(torn.stat().st_mode & 0o777) == "0o600"
        torn.chmod(0o644)  # as an older version left it
        with path.open("ab") as fh:
            fh.write(b'{"id": "evt_torn_again"')
        SinkFile(path).open()
    finally:
        os.umask(old)
    assert oct(torn.stat().st_mode & 0o777) == "0o600"
    assert torn.read_bytes().endswith(b'{"id": "evt_torn_again"\n')


# -- a real sink process ------------------------------------------------------------------------


def start_sink(tmp_path: Path, state: dict[str, Any] | None = None
               ) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``tasknotes sink`` in its own process; returns once it answers. ``state`` is the
    config's state section (``{"url": ...}``: events stored in PostgreSQL, not the file)."""
    env = dict(os.environ)
    section: dict[str, Any] = {}
    if state and state.get("url"):
        env["TASKNOTES_STATE_URL"] = state["url"]  # the URL only through the environment
        section = {"state": {"url": "${TASKNOTES_STATE_URL}"}}
    config = write_config(tmp_path, webhooks={"max_body_bytes": 1024 * 1024}, **section)
    port = free_port()
    with (tmp_path / "sink.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"

    wait_until_healthy(proc, url, tmp_path / "sink.log", timeout=20)
    return proc, url, tmp_path / "state" / "webhooks.jsonl"


def stored_event_ids(tmp_path: Path, path: Path, state: dict[str, Any]) -> set[str]:
    """The ids of the events the sink stored: read from its file, or (with ``state.url``)
    exported by ``tasknotes export-events``, the way a user reads them."""
    if not state.get("url"):
        return {e["id"] for _, e in read_sink(path)}
    out = tmp_path / "exported.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "export-events", str(tmp_path / "config.yaml"),
         "--out", str(out)], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "TASKNOTES_STATE_URL": state["url"]})
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["id"] for line in out.read_bytes().splitlines()}


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
def test_every_acknowledged_event_survives_a_sigkill(tmp_path: Path,
                                                     state: dict[str, Any]) -> None:
    """Kill -9 under load: each event that got a 2xx is stored, and the store still reads
    (the sink file, or PostgreSQL with state.url)."""
    proc, url, path = start_sink(tmp_path, state)
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
    stored = stored_event_ids(tmp_path, path, state)
    assert acknowledged <= stored


# -- a full disk heals (finding 4) -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own, so the disk can really be filled and freed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        for _ in range(10_000):  # bounded: 1 MiB / 4 KiB is far fewer writes
            try:
                fh.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        else:
            raise AssertionError("the disk never filled")
    return filler


async def test_after_a_full_disk_the_sink_stores_again_once_there_is_room(
        tmp_path: Path, small_disk: Path) -> None:
    """Finding 4: full -> 503 and an intact file; freed -> healthz 200 and the retry is 200."""
    first, second = compact(event(1)), compact(event(2, note="n" * 8192))
    async with sink_running(tmp_path, state=small_disk / "state") as (client, path):
        assert await post(client, first, signed(first)) == 200
        filler = fill(small_disk)
        assert await post(client, second, signed(second)) == 503
        assert (await client.get("/healthz")).status_code == 503
        assert path.read_bytes() == first + b"\n"  # a partial line was cut back off
        filler.unlink()
        assert (await client.get("/healthz")).status_code == 200
        assert await post(client, second, signed(second)) == 200  # Cobalt's retry
    assert path.read_bytes() == first + b"\n" + second + b"\n"
    assert [e["id"] for _, e in read_sink(path)] == [event(1)["id"], event(2)["id"]]


# -- what one client may hold (finding 7) -----------------------------------------------------


def port_of(client: httpx.AsyncClient) -> int:
    return int(client.base_url.port or 80)


async def test_a_64_kb_header_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    """A correctly signed request whose headers exceed max_header_bytes: 431, never 200."""
    body = compact(event())
    async with sink_running(tmp_path) as (client, path):
        headers = {**signed(body), "x-padding": "a" * 64 * 1024}
        assert await post(client, body, headers) == 431
    assert path.read_bytes() == b""


async def test_an_unfinished_huge_header_is_cut_off_before_it_is_buffered(tmp_path: Path
                                                                          ) -> None:
    """A header that never ends: the server closes the connection instead of buffering it."""
    limits = SinkLimits(request_timeout_s=600)  # only the size limit can end this one
    async with sink_running(tmp_path, limits=limits) as (client, path):
        stream = await anyio.connect_tcp("127.0.0.1", port_of(client))
        closed = False
        async with stream:
            await stream.send(b"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nX-Big: ")
            with anyio.fail_after(10):
                try:
                    for _ in range(64):  # up to 4 MiB, far past the 16 KiB limit
                        await stream.send(b"a" * 65536)
                    while True:
                        await stream.receive()
                except (anyio.BrokenResourceError, anyio.EndOfStream):
                    closed = True
        assert closed
    assert path.read_bytes() == b""


async def test_too_many_header_fields_get_431(tmp_path: Path) -> None:
    """More header fields than max_headers: 431 Request Header Fields Too Large."""
    body = compact(event())
    async with sink_running(tmp_path, limits=SinkLimits(max_headers=20)) as (client, path):
        headers = {**signed(body), **{f"x-h{i}": "1" for i in range(30)}}
        assert await post(client, body, headers) == 431
        assert await post(client, body, signed(body)) == 200
    assert path.read_bytes() == body + b"\n"


@pytest.mark.parametrize(
    "sent",
    [pytest.param(b"", id="silent"),
     pytest.param(b"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nX-Slow: ", id="slow-headers"),
     pytest.param(b"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
                  id="slow-body")],
)
async def test_a_request_not_finished_in_time_loses_its_connection(tmp_path: Path,
                                                                   sent: bytes) -> None:
    """Slowloris: a connection that does not complete a request is closed by the server."""
    limits = SinkLimits(request_timeout_s=0.3)
    async with sink_running(tmp_path, limits=limits) as (client, path):
        stream = await anyio.connect_tcp("127.0.0.1", port_of(client))
        async with stream:
            if sent:
                await stream.send(sent)
            with anyio.fail_after(10):  # a deadline for the server to act, not a measurement
                answer = b""
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        answer += await stream.receive()
        assert b"200 OK" not in answer
        assert await post(client, compact(event()), signed(compact(event()))) == 200
    assert path.read_bytes() == compact(event()) + b"\n"


async def read_until_closed(stream: anyio.abc.ByteStream) -> None:
    while True:
        await stream.receive()


async def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_request(
        tmp_path: Path) -> None:
    """A whole request, its 200, then a second request trickled: the connection is closed."""
    body = compact(event())
    head = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items())
    whole = (f"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
             f"{head}\r\n").encode() + body
    # The deadline starts at connect and covers the first request too: 3 s is far more than
    # the first request needs on a loaded machine; the trickled second one never completes.
    async with sink_running(tmp_path, limits=SinkLimits(request_timeout_s=3.0,
                                                        keep_alive_s=600)) as (client, path):
        stream = await anyio.connect_tcp("127.0.0.1", port_of(client))
        async with stream:
            await stream.send(whole)
            with anyio.fail_after(10):
                answer = await stream.receive()
                assert answer.startswith(b"HTTP/1.1 200")
                await stream.send(b"POST /webhooks/cobalt HTTP/1.1\r\nHo")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await read_until_closed(stream)
    assert path.read_bytes() == body + b"\n"


async def test_past_the_connection_cap_idle_sockets_make_way_for_deliveries(tmp_path: Path
                                                                           ) -> None:
    """20 idle sockets against a cap of 8: the oldest are closed and a delivery gets 200."""
    limits = SinkLimits(max_connections=8, request_timeout_s=600)
    body = compact(event())
    async with sink_running(tmp_path, limits=limits) as (client, path):
        idle = [await anyio.connect_tcp("127.0.0.1", port_of(client)) for _ in range(20)]
        try:
            assert await post(client, body, signed(body)) == 200
            with anyio.fail_after(10):
                for stream in idle[:12]:  # the 12 oldest had to go for the cap to hold
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await stream.receive()
        finally:
            for stream in idle:
                await stream.aclose()
    assert path.read_bytes() == body + b"\n"


# -- pipelined requests get the same deadline (attack review of issue 13, finding 2) -----------

UNSIGNED = (b"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"cobalt-verification: " + b"0" * 64 + b"\r\n\r\n{}")
BIG_HEAD = b"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
HALF_HEAD = b"POST /webhooks/cobalt HTTP/1.1\r\nHo"


def whole_request(body: bytes) -> bytes:
    """A complete, correctly signed delivery of ``body`` as raw HTTP/1.1 bytes."""
    head = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items())
    return (f"POST /webhooks/cobalt HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{head}\r\n").encode() + body


async def until_closed(stream: anyio.abc.ByteStream, trickle: bytes = b"",
                       *, limit_s: float = 10) -> tuple[bytes, int]:
    """What the server sent until it closed the connection, and how many trickled bytes went.

    With ``trickle``, one such chunk is sent whenever nothing arrives for 50 ms (an
    attacker dripping a body). Raises TimeoutError if the server has not closed it
    within ``limit_s``: a deadline for the server to act, not a measurement.
    """
    answer, dripped = b"", 0
    with anyio.fail_after(limit_s):
        try:
            while True:
                with anyio.move_on_after(0.05) as scope:
                    answer += await stream.receive()
                if scope.cancelled_caught and trickle:
                    await stream.send(trickle)
                    dripped += len(trickle)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return answer, dripped


@pytest.mark.parametrize(
    ("first", "then", "trickle"),
    [pytest.param(UNSIGNED, BIG_HEAD, b"", id="401-then-silent-body"),
     pytest.param(UNSIGNED, BIG_HEAD, b"x", id="401-then-trickled-body"),
     pytest.param(None, BIG_HEAD, b"x", id="200-then-trickled-body"),
     pytest.param(UNSIGNED, HALF_HEAD, b"", id="401-then-half-a-head"),
     pytest.param(UNSIGNED, HALF_HEAD, b"X", id="401-then-trickled-head"),
     pytest.param(UNSIGNED, UNSIGNED + BIG_HEAD, b"x", id="two-answered-then-trickled-body")],
)
async def test_a_pipelined_request_gets_its_own_deadline(tmp_path: Path, first: bytes | None,
                                                         then: bytes, trickle: bytes) -> None:
    """A whole request and, in the same packet, the start of the next one (HTTP pipelining),
    whose rest then never comes or only drips: the server answers what was whole and then
    closes the connection while the pipelined request is still unfinished."""
    body = compact(event())
    first = whole_request(body) if first is None else first
    limits = SinkLimits(request_timeout_s=0.3, keep_alive_s=600)  # only the deadline closes
    async with sink_running(tmp_path, limits=limits) as (client, path):
        stream = await anyio.connect_tcp("127.0.0.1", port_of(client))
        async with stream:
            await stream.send(first + then)
            answer, dripped = await until_closed(stream, trickle)
        answers = answer.count(b"HTTP/1.1 ")
        assert answers == first.count(b"POST ") + then.count(b"\r\n\r\n{}")
        assert b" 200 OK" not in answer or first == whole_request(body)
        assert dripped < 100000  # closed mid-request: not by finishing it
        assert await post(client, body, signed(body)) == 200
    assert path.read_bytes() == body + b"\n"


async def test_past_the_cap_pipelined_unfinished_requests_make_way_for_deliveries(
        tmp_path: Path) -> None:
    """20 connections each holding a pipelined request in its body against a cap of 8 (and
    no deadline to help): the oldest are closed and signed deliveries get 200."""
    limits = SinkLimits(max_connections=8, request_timeout_s=600, keep_alive_s=600)
    async with sink_running(tmp_path, limits=limits) as (client, path):
        held = []
        try:
            for _ in range(20):
                stream = await anyio.connect_tcp("127.0.0.1", port_of(client))
                held.append(stream)
                await stream.send(UNSIGNED + BIG_HEAD)
                with anyio.fail_after(10):  # the 401 is out: the server is in the next body
                    assert (await stream.receive()).startswith(b"HTTP/1.1 401")
            for n in range(3):
                body = compact(event(n))
                assert await post(client, body, signed(body)) == 200
            for stream in held[:12]:  # the 12 oldest had to go for the cap to hold
                await until_closed(stream)
        finally:
            for stream in held:
                await stream.aclose()
    assert path.read_bytes().count(b"\n") == 3


@pytest.mark.slow
def test_a_flood_of_pipelined_slow_bodies_does_not_starve_deliveries(tmp_path: Path) -> None:
    """The review's flood: the sink process under a 160 open-file limit, 300 connections that
    each send an unsigned request and the head of a 100 kB one; signed deliveries still get
    200 (the sink closes the oldest held connections instead of running out of sockets)."""
    config = write_config(tmp_path)
    port = free_port()
    with (tmp_path / "sink.log").open("wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", 'ulimit -n 160 && exec "$0" "$@"', sys.executable, "-m", "pipeline",
             "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    async def flood_then_deliver() -> list[int | str]:
        held = []
        try:
            for _ in range(300):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                held.append(stream)
                await stream.send(UNSIGNED + BIG_HEAD)
            codes: list[int | str] = []
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                for n in range(5):
                    body = compact(event(n))
                    try:
                        codes.append(await post(client, body, signed(body)))
                    except httpx.HTTPError as exc:
                        codes.append(type(exc).__name__)
            return codes
        finally:
            for stream in held:
                await stream.aclose()

    try:
        wait_until_healthy(proc, url, tmp_path / "sink.log", timeout=20)
        assert anyio.run(flood_then_deliver) == [200] * 5
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "state" / "webhooks.jsonl").read_bytes().count(b"\n") == 5


async def test_a_peer_that_never_reads_its_answers_loses_its_connection(tmp_path: Path) -> None:
    """Requests pipelined without end and no answer ever read: once the sink's output to it
    backs up, the peer gets the request deadline to read, then the connection is aborted
    (its sends fail) instead of holding a socket and a task forever."""
    limits = SinkLimits(request_timeout_s=0.3, keep_alive_s=600)
    burst = UNSIGNED * 200
    async with sink_running(tmp_path, limits=limits) as (client, path):
        port = port_of(client)

        def flood() -> str:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing
                sock.connect(("127.0.0.1", port))
                sock.settimeout(10)  # blocked this long: the sink holds the connection
                for _ in range(2000):  # 400,000 requests: far past every buffer on the way
                    try:
                        sock.sendall(burst)
                    except TimeoutError:
                        return "held"
                    except OSError:
                        return "closed"
                return "still reading"

        assert await anyio.to_thread.run_sync(flood) == "closed"
        body = compact(event())
        assert await post(client, body, signed(body)) == 200
    assert path.read_bytes() == body + b"\n"
