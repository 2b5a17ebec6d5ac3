"""notify.url under a hostile or broken other end: the secret URL never logged (root logger
at DEBUG), a slow answer bounded by ``timeout_s`` overall, an endless body never read, a
redirect not followed."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import pytest

from pipeline.config import NotifyConfig
from pipeline.notify import RunSummary, notify

SUMMARY = RunSummary(run_id="r1", exit_code=0, counts={"confirmed": 1}, report_dir="reports/r1")
SECRET = "URLSECRET-7f3k"
CAP = 256 * 1024 * 1024  # what the server would send at most: far above any socket buffer


class RawServer:
    """A loopback HTTP server written on a bare socket, answering each connection with
    ``answer(conn)``; counts the bytes it managed to send and the requests it got."""

    def __init__(self, answer: Callable[[socket.socket, RawServer], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.sent = 0
        self.requests: list[bytes] = []
        self.closed = threading.Event()  # the client hung up
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.requests.append(conn.recv(65536))
                try:
                    self.answer(conn, self)
                except OSError:
                    self.closed.set()

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def _trickle(conn: socket.socket, server: RawServer) -> None:
    """The status line one byte at a time, each after the client's patience for one read
    would have lapsed only if it waited for the whole answer; ends after 600 bytes."""
    for byte in (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 600):
        if server.stop.wait(0.1):  # paced, like a 10 byte/s server; not a wait in the test
            return
        conn.sendall(bytes([byte]))
        server.sent += 1


def _endless(conn: socket.socket, server: RawServer) -> None:
    """200 OK, then a chunked body that never ends (up to CAP)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    while server.sent < CAP:
        conn.sendall(chunk)
        server.sent += len(chunk)


def _redirect(conn: socket.socket, server: RawServer) -> None:
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:9/elsewhere\r\n"
                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def _ok(conn: socket.socket, server: RawServer) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def _notify_in_thread(url: str, timeout_s: float) -> list[str]:
    """``notify`` in a worker thread, given a deadline 60 times ``timeout_s`` to return."""
    out: list[list[str]] = []
    worker = threading.Thread(target=lambda: out.append(notify(
        NotifyConfig.model_validate({"url": url, "timeout_s": timeout_s}), SUMMARY)),
        daemon=True)
    worker.start()
    worker.join(60 * timeout_s)
    assert out, f"notify still running after {60 * timeout_s:g} s (timeout_s {timeout_s:g})"
    return out[0]


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The root logger at DEBUG, capturing every record of every logger (a host's
    ``logging.basicConfig(level=DEBUG)``)."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_the_secret_url_is_in_no_log_record_even_at_debug(
        everything_logged: pytest.LogCaptureFixture) -> None:
    with RawServer(_ok) as server:
        url = f"http://127.0.0.1:{server.port}/services/T0/B0/{SECRET}"
        assert notify(NotifyConfig.model_validate({"url": url}), SUMMARY) == []
        assert len(server.requests) == 1
        assert SECRET.encode() in server.requests[0]
    logged = [f"{r.name} {r.getMessage()} {r.args!r}" for r in everything_logged.records]
    assert not [line for line in logged if SECRET in line]
    # the HTTP stack still logs for everyone else (only the notification's records go)
    import httpx  # noqa: PLC0415

    everything_logged.clear()
    with RawServer(_ok) as server:
        httpx.post(f"http://127.0.0.1:{server.port}/other", timeout=10)
    assert any(r.name == "httpx" for r in everything_logged.records)


def test_a_trickling_answer_is_cut_at_timeout_s_overall(
        everything_logged: pytest.LogCaptureFixture) -> None:
    with RawServer(_trickle) as server:
        url = f"http://127.0.0.1:{server.port}/hook/{SECRET}"
        problems = _notify_in_thread(url, 0.5)
        sent = server.sent
    assert problems == ["notify.url: no answer within 0.5 s; no notification sent there"]
    assert sent < 600  # it hung up before the answer's end (60 s of trickle)
    assert not [r for r in everything_logged.records if SECRET in r.getMessage()]


def test_an_endless_body_is_not_read() -> None:
    with RawServer(_endless) as server:
        url = f"http://127.0.0.1:{server.port}/hook"
        problems = _notify_in_thread(url, 5)
        assert server.closed.wait(30)  # the client hung up: the server's next send failed
        sent = server.sent
    assert problems == []  # 200: delivered; what follows the headers does not matter
    assert sent < CAP // 8  # socket buffers, not the body: reading it all would be CAP


def test_a_redirect_is_not_followed() -> None:
    with RawServer(_redirect) as server:
        url = f"http://127.0.0.1:{server.port}/hook/{SECRET}"
        problems = _notify_in_thread(url, 5)
        assert len(server.requests) == 1
    assert problems == ["notify.url: answered HTTP 302; no notification sent there"]
