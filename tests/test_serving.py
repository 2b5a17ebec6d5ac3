"""The sink and the emulator as commands: where they cannot listen, and how much they say."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from helpers import free_port, wait_until, write_config
from pipeline.servers import CannotListen, serve_embedded


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other socket listens on for the duration of the test."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        yield int(other.getsockname()[1])


def _command(tmp_path: Path, command: str) -> list[str]:
    if command == "sink":
        return [sys.executable, "-m", "pipeline", "sink", str(write_config(tmp_path))]
    return [sys.executable, "-m", "pipeline", "emulator"]


@pytest.mark.parametrize("command", ["sink", "emulator"])
@pytest.mark.parametrize(
    ("host", "port", "reason"),
    [pytest.param("127.0.0.1", None, "Address already in use", id="port-in-use"),
     pytest.param("127.0.0.1", 99999, "a port is 0-65535", id="port-out-of-range"),
     pytest.param("10.255.255.1", 18788, "Cannot assign requested address",
                  id="not-this-machine")],
)
def test_a_server_that_cannot_listen_says_where_and_why_in_one_line(
    tmp_path: Path, taken_port: int, command: str, host: str, port: int | None, reason: str
) -> None:
    """`tasknotes sink|emulator --host H --port P` where nothing can listen: one line on
    stderr naming H:P and the reason, exit 2, no traceback."""
    port = taken_port if port is None else port
    done = subprocess.run([*_command(tmp_path, command), "--host", host, "--port", str(port)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tasknotes: cannot listen on {host}:{port}: {reason}")
    assert done.stdout == ""


async def test_an_embedded_server_that_cannot_listen_raises_cannot_listen(
    taken_port: int,
) -> None:
    """The in-process servers of a sandbox run meet the same error (exit 2), not an OSError;
    `tasknotes` finds it inside the task group's wrapper and prints its one line."""
    caught: list[BaseException] = []
    try:
        async with anyio.create_task_group() as tg, serve_embedded(
                Starlette(), tg, port=taken_port):
            pass
    except* CannotListen as group:
        caught.extend(group.exceptions)
    (error,) = caught
    assert str(error).startswith(f"cannot listen on 127.0.0.1:{taken_port}: "
                                 "Address already in use")
    assert isinstance(error, CannotListen)
    assert error.exit_code == 2


@pytest.mark.parametrize(("flags", "quiet"), [(["-q"], True), ([], False)])
def test_sink_q_prints_nothing_but_warnings(tmp_path: Path, flags: list[str],
                                            quiet: bool) -> None:
    """`tasknotes sink -q`: nothing on stderr from start to stop (uvicorn's INFO lines
    included); without -q, the one line saying where it listens, and no uvicorn chatter."""
    port = free_port()
    proc = subprocess.Popen([*_command(tmp_path, "sink"), *flags, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        def up() -> bool:
            assert proc.poll() is None
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).is_success
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=20, what="the sink to listen")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    if quiet:
        assert err == ""
    else:
        assert f"tasknotes: INFO: listening on http://127.0.0.1:{port}" in err
        assert "Uvicorn" not in err
        assert "Application startup" not in err
