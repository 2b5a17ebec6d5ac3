"""Shared by the benchmarks: CPU pinning, a tiny Cobalt-shaped HTTP server, tables, medians.

The server is a raw ``asyncio.Protocol`` with uvloop, far lighter than any client
measured against it, so it is never what a benchmark measures; it answers
``POST /v1/tasks/notes`` with Cobalt's success body after an optional delay, on
HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT_CPU, SERVER_CPU = 0, 1


def pin(cpu: int) -> str:
    """Pin this process to one CPU when the machine has two or more; returns what was done."""
    cpus = os.cpu_count() or 1
    if cpus < 2 or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    os.sched_setaffinity(0, {cpu % cpus})
    return f"cpu {cpu % cpus}"


def machine() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cpus ({model}), Python {sys.version.split()[0]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes] | None = None,
                  timeout_s: float = 20) -> None:
    """Poll ``url`` until it answers (any HTTP status), or raise once ``timeout_s`` has
    passed or ``proc`` has exited: a server started for a benchmark is ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            time.sleep(0.05)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def python() -> str:
    return sys.executable


def generated_input(rows: int, seed: int = 7) -> Path:
    """A realistic CSV of ``rows`` rows (bench/make_input.py), cached between runs."""
    import tempfile

    from bench.make_input import write_csv

    cache = Path(tempfile.gettempdir()) / "tasknotes-bench"
    cache.mkdir(exist_ok=True)
    path = cache / f"notes-{rows}-{seed}.csv"
    if not path.exists():
        partial = path.with_suffix(".part")
        write_csv(partial, rows, seed)
        partial.rename(path)
    return path


@dataclass(frozen=True)
class Measured:
    rss_mb: float  # the child's own peak RSS, from the kernel
    wall_s: float
    cpu_s: float  # user + system: steadier than wall time on a shared VM


def run_measured(args: Sequence[str]) -> Measured:
    """Run a command in the repository, pinned to the client CPU, to its end; what the
    kernel says it used. An exit code other than 0 or 1 (rows rejected) raises."""
    start = time.perf_counter()
    proc = subprocess.Popen(["taskset", "-c", str(CLIENT_CPU), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise RuntimeError(f"{' '.join(args[:5])} ... exited {code}")
    return Measured(usage.ru_maxrss / 1024, time.perf_counter() - start,
                    usage.ru_utime + usage.ru_stime)


def run_json(args: Sequence[str], timeout: float = 300) -> dict[str, object]:
    """Run a helper that prints one JSON object on its last line."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the server ----------------------------------------------------------------------------

_BODY = (b'{"success":true,"message":"Task note processing. A webhook event will be sent '
         b'upon completion.","task_note_id":"abc123def456789012345678","job_id":%d}')


class _Http(asyncio.Protocol):
    """Just enough HTTP/1.1: Content-Length bodies, keep-alive, one answer per request."""

    jobs = 10_000

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buffer = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            _Http.jobs += 1
            body = _BODY % _Http.jobs
            response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self._write, response)
            else:
                self._write(response)

    def _write(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)  # type: ignore[attr-defined]


def serve(port: int, delay_ms: float) -> None:
    """Serve until killed (run as ``python bench/_common.py serve PORT DELAY_MS``)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    pin(SERVER_CPU)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Http(delay_ms / 1000), "127.0.0.1", port,
                                          backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Server:
    """The bench server in its own process, pinned to the other CPU."""

    def __init__(self, delay_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([python(), __file__, "serve", str(self.port),
                                       str(delay_ms)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(int(sys.argv[2]), float(sys.argv[3]))


def durable_cluster(script: str) -> Any:
    """A throwaway local PostgreSQL server with fsync on, as production runs it (tests/pg.py;
    not started), or None after printing why there is none here (``script`` names the
    benchmark in that line)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg import PgCluster, why_no_cluster  # only the PostgreSQL benches need it

    reason = why_no_cluster()
    if reason is not None:
        print(f"bench/{script}: no PostgreSQL server to measure against: {reason}")
        return None
    return PgCluster(durable=True)
