"""Webhook sink throughput: signed events posted at concurrency 50, durable before each 2xx.

    python bench/sink.py [--seconds 10] [--reps 2] [--quick]

The real sink (uvicorn, signature check, de-duplication, group-committed fsync)
on one CPU; an aiohttp client posting distinct signed events at concurrency 50
on the other. The baseline is the same server appending without fsync, so the
ratio shows what durability costs. With PostgreSQL server binaries at hand
(tests/pg.py), the same sink also stores its events in PostgreSQL (``state.url``:
a throwaway local server with fsync on, as in production, on either CPU; a fresh
database per window). A last variant serves the same uvicorn and protocol with an
app that only reads each body and answers 200 ("HTTP alone"): the most any sink
on this stack could take at this hour. Windows rotate between the variants.
Goals (issue #7 for the file, #16 for PostgreSQL): >= 1,000 events/s durably
accepted, p99 < 50 ms, no non-2xx.

The machine is often shared, so beside the rates it prints the load average and
the sink process's CPU time per event (user + system, from /proc: what one event
costs, whatever else runs), and 1e6 / that figure: the events/s one free core
would give it. With 50 deliveries in flight, the mean latency is 50 / the rate
(Little's law): p99 < 50 ms needs well over 1,000 events/s.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import anyio

from bench._common import (
    CLIENT_CPU,
    ROOT,
    free_port,
    machine,
    median,
    pin,
    python,
    table,
    wait_until_up,
)

if TYPE_CHECKING:
    from pg import PgCluster

SECRET = b"bench-secret"
LABELS = {"fsync": "sink file (fsync)", "postgres": "PostgreSQL (state.url)",
          "nofsync": "sink file, no fsync", "bare": "HTTP alone (no check, no store)"}
NOTE = "Patient called back — café, “quoted”, 🙂; scheduled follow-up. " * 3


def body(n: int, salt: str) -> bytes:
    event = {"id": f"evt_{salt}_{n:09d}", "access_token_reference_id": "user_1",
             "object": "event", "created": "2026-06-15T12:02:40Z", "type": "task_note.created",
             "job_id": str(10_000 + n), "data": {"task_note_id": f"{n:024x}",
                                                 "emr_note_id": "f862b0a0", "emr_task_id": "T",
                                                 "note": NOTE}}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def signed(n: int, salt: str) -> tuple[bytes, dict[str, str]]:
    """Event ``n``'s body and its headers, signed as Cobalt signs it."""
    data = body(n, salt)
    return data, {"content-type": "application/json",
                  "cobalt-verification": hmac.new(SECRET, data, hashlib.sha256).hexdigest()}


# Signed before a window starts, so the client spends its CPU on sending, not on
# making events (it shares the machine with the sink): more than the sink takes in a
# window at the rates seen here; past them, events are made on the fly.
PREPARED_PER_S = 4000


def prepare(seconds: float, salt: str) -> list[tuple[bytes, dict[str, str]]]:
    """The signed events for a window, last first (``load`` pops them)."""
    return [signed(n, salt) for n in reversed(range(int(seconds * PREPARED_PER_S)))]


async def load(url: str, seconds: float, salt: str,
               ready: list[tuple[bytes, dict[str, str]]]) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    counter = iter(range(len(ready), 10**9))
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            data, headers = ready.pop() if ready else signed(next(counter), salt)
            start = time.perf_counter()
            async with session.post(f"{url}/webhooks/cobalt", data=data, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session, \
            anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(worker, session)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1e3,
            "p99": latencies[int(len(latencies) * 0.99)] * 1e3, "errors": errors,
            "events": len(latencies)}


def window(mode: str, seconds: float, workdir: Path, salt: str,
           cluster: PgCluster | None) -> dict[str, float]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(dir=workdir))
    url = ""
    if mode == "postgres":
        assert cluster is not None
        url = cluster.url(cluster.create_database())
    proc = subprocess.Popen([python(), str(ROOT / "bench" / "_sink_server.py"), str(port),
                             str(directory), mode, *([url] if url else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc)
        ready = prepare(seconds, salt)
        server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
        result = anyio.run(load, f"http://127.0.0.1:{port}", seconds, salt, ready,
                           backend_options={"use_uvloop": True})
        server_cpu, client_cpu = (cpu_seconds(proc.pid) - server_cpu,
                                  time.process_time() - client_cpu)
    finally:
        proc.terminate()
        proc.wait(10)
    events = max(result["events"], 1)
    result |= {"server_us": server_cpu / events * 1e6, "client_us": client_cpu / events * 1e6}
    if mode == "bare":
        return result
    stored = (stored_rows(url) if url else
              (directory / "webhooks.jsonl").read_bytes().count(b"\n"))
    if stored < result["events"]:
        raise RuntimeError(f"{mode}: {result['events']} events acknowledged, {stored} stored")
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_rows(url: str) -> int:
    """How many events the sink stored in the database at ``url``."""
    import psycopg

    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT count(*) FROM sink_events").fetchone()
    return int(found[0]) if found else 0


def verdict(name: str, results: list[dict[str, float]]) -> str:
    """The goals of a durable variant: >= 1,000 events/s, p99 < 50 ms, no non-2xx."""
    rate = median([x["rate"] for x in results])
    p99 = median([x["p99"] for x in results])
    errors = int(sum(x["errors"] for x in results))
    # A non-2xx is a delivery the sink did not take: any at all and the goals are not met.
    return (f"{name}: goal >= 1,000 events/s ({'met' if rate >= 1000 and not errors else 'not met'}"
            f"), p99 < 50 ms ({'met' if p99 < 50 and not errors else 'not met'}), no non-2xx "
            f"({'met' if not errors else f'not met: {errors}'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.reps = 1.0, 1
    from pg import PgCluster, why_no_cluster  # tests/pg.py: a throwaway local server

    no_pg = why_no_cluster()
    modes = ("fsync", "nofsync", "bare") if no_pg else ("fsync", "postgres", "nofsync", "bare")
    cluster = None if no_pg else PgCluster(durable=True)
    try:
        if cluster is not None:
            cluster.start()  # before pinning this process: the server may use either CPU
        pin(CLIENT_CPU)
        print(f"bench/sink.py on {machine()}; concurrency 50, {args.reps} x {args.seconds:g} s "
              "windows per variant, rotating")
        load_before = os.getloadavg()[0]
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                    results[mode].append(window(mode, args.seconds, Path(tmp), f"{mode}{rep}",
                                                cluster))
        load_after = os.getloadavg()[0]
    finally:
        if cluster is not None:
            cluster.remove()
    rows = []
    for mode in modes:
        r = results[mode]
        cpu_us = median([x["server_us"] for x in r])
        rows.append([LABELS[mode], f"{median([x['rate'] for x in r]):,.0f}",
                     f"{median([x['p50'] for x in r]):.1f}", f"{median([x['p99'] for x in r]):.1f}",
                     int(sum(x["errors"] for x in r)), f"{cpu_us:.0f}", f"{1e6 / cpu_us:,.0f}"])
    print(f"load average (1 min): {load_before:.1f} before, {load_after:.1f} after")
    print(table(["sink stores to", "events/s", "p50 ms", "p99 ms", "non-2xx",
                 "sink CPU us/event", "1 free core: events/s"], rows))
    rate = {mode: median([x["rate"] for x in results[mode]]) for mode in modes}
    client_us = median([x["client_us"] for r in results.values() for x in r])
    print(f"client CPU per event: {client_us:.0f} us (1 free core: {1e6 / client_us:,.0f}/s); "
          f"sink file/HTTP alone = {rate['fsync'] / rate['bare']:.2f}")
    print(f"durable/baseline = {rate['fsync'] / rate['nofsync']:.2f}; "
          + verdict("sink file", results["fsync"]))
    if no_pg:
        print(f"PostgreSQL: not measured: {no_pg}")
    else:
        print(f"PostgreSQL/sink file = {rate['postgres'] / rate['fsync']:.2f}; "
              + verdict("PostgreSQL", results["postgres"]))
    print("medians; events/s counts 2xx answers, each given after the event was durable")

if __name__ == "__main__":
    main()
