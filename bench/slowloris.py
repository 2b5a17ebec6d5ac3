"""Webhook deliveries while attackers hold the sink's sockets: latency, failures and RSS.

    python bench/slowloris.py [--seconds 15] [--connections 1000] [--quick]

The real sink (bench/_sink_server.py: uvicorn with the receiver's serve_options)
on one CPU; on the other, attackers and real deliveries at the same time:

- slowloris: N connections that send a request head one header line per
  second and never finish; each one the sink closes is opened again at once,
  so N stay open as far as the sink allows;
- the same with the sink's open-file limit at 1,024 (soft and hard, as a
  default ``ulimit -n``) and N + 100 connections;
- ten connections each pushing an endless header (up to 50 MB each, again
  and again) at the sink;
- pipelined slow bodies, again with the limit at 1,024 and N + 100
  connections: each sends a whole unsigned request and, in the same packet,
  the head of a 100 kB one (HTTP pipelining), reads the 401, then drips the
  second body a byte a second.

Real deliveries: distinct signed events, 20 a second, each on a new
connection (as a webhook sender opens them), with Cobalt's 5 s timeout.
Every acknowledged event must be in the sink file afterwards. Goal (issue
#13): with 1,000 slowloris connections open, p99 below 1 s and the sink's
RSS bounded (peak within 1.5x of the no-attack run). Loopback only; every
loop stops when its window ends.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anyio

from bench._common import CLIENT_CPU, ROOT, free_port, machine, pin, python, table, wait_until_up

SECRET = b"bench-secret"
HEAD = b"POST /webhooks/cobalt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def body(n: int, salt: str) -> bytes:
    event = {"id": f"evt_{salt}_{n:09d}", "access_token_reference_id": "user_1",
             "object": "event", "created": "2026-06-15T12:02:40Z", "type": "task_note.created",
             "job_id": str(10_000 + n), "data": {"task_note_id": f"{n:024x}",
                                                 "emr_note_id": "f862b0a0", "emr_task_id": "T",
                                                 "note": "Patient called back, café 🙂"}}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Attack:
    """Counters shared by the attacking tasks; ``built`` is set once ``target`` are open."""

    target: int = 0
    open_now: int = 0
    opened: int = 0
    closed_by_server: int = 0
    open_samples: list[int] = field(default_factory=list)
    built: anyio.Event | None = None

    def one_more(self) -> None:
        self.open_now += 1
        self.opened += 1
        if self.built is not None and self.open_now >= self.target:
            self.built.set()


async def slowloris(port: int, attack: Attack, stop: anyio.Event) -> None:
    """One slow client: a head that never ends, one line a second; reopened when closed."""
    while not stop.is_set():
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            await anyio.sleep(0.1)
            continue
        attack.one_more()
        try:
            async with stream:
                await stream.send(HEAD)
                line = 0
                while not stop.is_set():
                    with anyio.move_on_after(1):
                        await stop.wait()
                    line += 1
                    await stream.send(f"X-Slow-{line}: 1\r\n".encode())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            attack.closed_by_server += 1
        finally:
            attack.open_now -= 1


UNSIGNED = HEAD + b"Content-Length: 2\r\ncobalt-verification: " + b"0" * 64 + b"\r\n\r\n{}"
BIG_HEAD = HEAD + b"Content-Length: 100000\r\n\r\n"


async def pipelined(port: int, attack: Attack, stop: anyio.Event) -> None:
    """One client pipelining a whole request and a 100 kB one it drips; reopened when closed."""
    while not stop.is_set():
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            await anyio.sleep(0.1)
            continue
        attack.one_more()
        try:
            async with stream:
                await stream.send(UNSIGNED + BIG_HEAD)
                while not stop.is_set():
                    with anyio.move_on_after(1):
                        await stop.wait()
                    await stream.send(b"x")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            attack.closed_by_server += 1
        finally:
            attack.open_now -= 1


async def big_header(port: int, attack: Attack, stop: anyio.Event) -> None:
    """One client pushing an endless header, 64 KiB at a time, up to 50 MB per connection."""
    chunk = b"a" * 65536
    while not stop.is_set():
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            await anyio.sleep(0.1)
            continue
        attack.one_more()
        try:
            async with stream:
                await stream.send(HEAD + b"X-Big: ")
                for _ in range(50 * 2**20 // len(chunk)):
                    if stop.is_set():
                        break
                    await stream.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            attack.closed_by_server += 1
        finally:
            attack.open_now -= 1


async def deliver(url: str, seconds: float, salt: str, latencies: list[float],
                  failures: list[str]) -> None:
    """20 signed events a second for ``seconds``, each on a new connection, 5 s timeout."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> None:
            data = body(n, salt)
            headers = {"content-type": "application/json", "cobalt-verification":
                       hmac.new(SECRET, data, hashlib.sha256).hexdigest()}
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/webhooks/cobalt", data=data,
                                        headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(str(r.status))
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(type(exc).__name__)
                return
            latencies.append(time.perf_counter() - start)

        async with anyio.create_task_group() as tg:
            for n in range(int(seconds * 20)):
                tg.start_soon(one, n)
                await anyio.sleep(0.05)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of ``pid`` in MB, from /proc."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def start_sink(directory: Path, fd_limit: int | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    limit = [str(fd_limit)] if fd_limit is not None else []
    proc = subprocess.Popen([python(), str(ROOT / "bench" / "_sink_server.py"), str(port),
                             str(directory), "fsync", *limit], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until_up(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, port


Attacker = Callable[[int, Attack, anyio.Event], object]


def scenario(name: str, attacker: Attacker | None, count: int, seconds: float,
             workdir: Path, fd_limit: int | None = None) -> list[object]:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    proc, port = start_sink(directory, fd_limit)
    latencies: list[float] = []
    failures: list[str] = []
    attack = Attack(target=count)
    peak = 0.0

    async def run() -> None:
        nonlocal peak
        stop = anyio.Event()
        attack.built = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(count if attacker else 0):
                tg.start_soon(attacker, port, attack, stop)  # type: ignore[arg-type]
            with anyio.move_on_after(10):  # let the attack build up before delivering
                if attacker:
                    await attack.built.wait()

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    attack.open_samples.append(attack.open_now)
                    peak = max(peak, rss_mb(proc.pid)[1])
                    await anyio.sleep(0.25)

            tg.start_soon(sample)
            await deliver(f"http://127.0.0.1:{port}", seconds, name[:3], latencies, failures)
            stop.set()

    try:
        anyio.run(run)
        peak = max(peak, rss_mb(proc.pid)[1])
    finally:
        proc.terminate()
        proc.wait(10)
    stored = (directory / "webhooks.jsonl").read_bytes().count(b"\n")
    if stored < len(latencies):
        raise RuntimeError(f"{name}: {len(latencies)} events acknowledged, {stored} stored")
    # A failed delivery counts as an endless one: the percentiles are over every delivery
    # tried, so failures cannot leave a p99 that looks met.
    ranked = sorted(latencies) + [math.inf] * len(failures)
    p50 = ranked[len(ranked) // 2] * 1e3 if ranked else float("nan")
    p99 = ranked[int(len(ranked) * 0.99)] * 1e3 if ranked else float("nan")
    samples = sorted(attack.open_samples) if attacker and attack.open_samples else [0]
    held = f"{samples[len(samples) // 2]:,} / {samples[0]:,}"
    return [name, len(latencies) + len(failures), len(failures), f"{p50:.1f}", f"{p99:.1f}",
            held, f"{attack.closed_by_server:,}", f"{peak:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="delivery window per scenario (the sink's request deadline is 10 s)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s, 100 connections")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.connections = 2.0, 100
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attackers need sockets
    pin(CLIENT_CPU)
    n = args.connections
    print(f"bench/slowloris.py on {machine()}; deliveries at 20/s for {args.seconds:g} s per "
          f"scenario, each on a new connection, 5 s timeout")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [
            scenario("no attack", None, 0, args.seconds, work),
            scenario(f"{n:,} slowloris connections", slowloris, n, args.seconds, work),
            scenario(f"{n + 100:,} slowloris, ulimit -n 1024", slowloris, n + 100,
                     args.seconds, work, fd_limit=1024),
            scenario("10 endless 50 MB headers", big_header, 10, args.seconds, work),
            scenario(f"{n + 100:,} pipelined slow bodies, ulimit -n 1024", pipelined, n + 100,
                     args.seconds, work, fd_limit=1024),
        ]
    print(table(["scenario", "deliveries", "failed", "p50 ms", "p99 ms",
                 "attack sockets open (median / min)", "closed by sink", "sink peak RSS MB"],
                rows))
    p99 = float(str(rows[1][4]))  # failed deliveries count as endless (see scenario)
    ratio = max(float(str(r[7])) for r in rows[1:]) / float(str(rows[0][7]))
    failed = sum(int(str(r[2])) for r in rows)
    print(f"with {n:,} slowloris: p99 {p99:.0f} ms (goal < 1,000 ms: "
          f"{'met' if p99 < 1000 else 'not met'}); worst peak RSS / no attack = {ratio:.2f} "
          f"(goal <= 1.5: {'met' if ratio <= 1.5 else 'not met'}); failed deliveries: "
          f"{failed} (goal 0: {'met' if failed == 0 else 'not met'})")


if __name__ == "__main__":
    main()
