"""Rate limiting: `tasknotes run` with submit.rate_per_second R holds R, bursts within a limit.

    python bench/rate.py [--seconds 30] [--quick]

For R = 5, 50 and 500 requests/s (concurrency C = 16), `tasknotes run` sends R x
seconds rows to the emulator (20 ms per request), which logs when each request
arrives. There is no baseline: each R is judged against the limits it states.
Printed per R: the achieved rate over the run (first to last arrival) and its
ratio to R (goal: within +-5%); the most requests that arrived in any 1/R-second
window and in any 1-second window, against the burst the pacer allows
(B = min(C, ceil(R x 0.05)): a late wake-up may take up to 50 ms of missed
slots at once), so the limits are B + 1 per 1/R s (two slots on the grid can
fall in one window) and R + B per second; and the most in flight at once
(goal: never above C). "yes" only when all four hold.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    free_port,
    machine,
    python,
    table,
    wait_until_up,
)
from bench.make_input import write_csv

CONCURRENCY = 16


def emulator() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), python(), "-m", "pipeline", "-q", "emulator",
         "--port", str(port), "--latency-ms", "20", "--client-id", "c", "--client-secret", "s",
         "--access-token", "t"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/_emulator/stats", proc)
    return proc, url


def measure(rate: float, seconds: float, workdir: Path) -> list[object]:
    rows = int(rate * seconds)
    data = workdir / f"in-{rate:g}.csv"
    write_csv(data, rows, seed=int(rate))
    proc, url = emulator()
    try:
        config = {
            "input": {"path": str(data)},
            "api": {"base_url": url, "account": "bench", "client_id": "c", "client_secret": "s",
                    "access_token": "t"},
            "submit": {"concurrency": CONCURRENCY, "rate_per_second": rate},
            "state": {"ledger": str(workdir / f"l-{rate:g}.sqlite")},
            "webhooks": {"sink": str(workdir / f"w-{rate:g}.jsonl")},
            "report": {"dir": str(workdir / "reports")},
        }
        path = workdir / f"c-{rate:g}.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(["taskset", "-c", str(CLIENT_CPU), python(), "-m", "pipeline", "-q", "run",
                        str(path), "--no-progress"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        stats = httpx.get(f"{url}/_emulator/stats", params={"arrivals": 1}).json()
    finally:
        proc.terminate()
        proc.wait(10)
    arrivals = sorted(stats["arrivals"])
    achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    allowed = min(CONCURRENCY, math.ceil(rate * 0.05))  # the pacer's burst (submit.py)
    in_slot, in_second = most_within(arrivals, 1 / rate), most_within(arrivals, 1.0)
    ok = (abs(achieved / rate - 1) <= 0.05 and in_slot <= allowed + 1
          and in_second <= rate + allowed and stats["max_in_flight"] <= CONCURRENCY)
    return [f"{rate:g}", len(arrivals), f"{achieved:,.2f}", f"{achieved / rate:.3f}",
            f"{in_slot} / {allowed + 1}", f"{in_second} / {rate + allowed:g}",
            stats["max_in_flight"], "yes" if ok else "NO"]


def most_within(arrivals: list[float], window: float) -> int:
    """The most arrivals (sorted times) that fall within any window of ``window`` seconds."""
    most, j = 0, 0
    for i, start in enumerate(arrivals):
        while arrivals[j] < start - window:
            j += 1
        most = max(most, i - j + 1)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per rate")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2.0
    print(f"bench/rate.py on {machine()}; {args.seconds:g} s per rate, concurrency "
          f"{CONCURRENCY}, emulator at 20 ms per request")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(rate, args.seconds, Path(tmp)) for rate in (5.0, 50.0, 500.0)]
    print(table(["R (req/s)", "requests", "achieved", "achieved/R", "max in 1/R s / limit",
                 "max in 1 s / limit", "max in flight", "within 5%, bursts, <= C"], rows))


if __name__ == "__main__":
    main()
