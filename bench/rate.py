"""Rate limiting: `tasknotes run` with submit.rate_per_second R holds R, without bursts.

    python bench/rate.py [--seconds 30] [--quick]

For R = 5, 50 and 500 requests/s (concurrency 16), `tasknotes run` sends R x
seconds rows to the emulator (20 ms per request), which logs when each request
arrives. Printed per R: the achieved rate over the run (first to last arrival),
its ratio to R (goal: within +-5%), the most requests that arrived in any
1/R-second window (1 means evenly spaced) and the most in flight at once
(goal: never above the concurrency bound).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import CLIENT_CPU, ROOT, SERVER_CPU, free_port, machine, python, table
from bench.make_input import write_csv

CONCURRENCY = 16


def emulator() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), python(), "-m", "pipeline", "-q", "emulator",
         "--port", str(port), "--latency-ms", "20", "--client-id", "c", "--client-secret", "s",
         "--access-token", "t"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/_emulator/stats", timeout=0.5)
            return proc, url
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
    window = 1 / rate
    burst, j = 0, 0
    for i, start in enumerate(arrivals):  # most arrivals within any window of 1/R seconds
        while arrivals[j] < start - window:
            j += 1
        burst = max(burst, i - j + 1)
    ok = abs(achieved / rate - 1) <= 0.05 and stats["max_in_flight"] <= CONCURRENCY
    return [f"{rate:g}", len(arrivals), f"{achieved:,.2f}", f"{achieved / rate:.3f}", burst,
            stats["max_in_flight"], "yes" if ok else "NO"]


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
    print(table(["R (req/s)", "requests", "achieved", "achieved/R", "max in 1/R s",
                 "max in flight", "within 5%, <= C"], rows))


if __name__ == "__main__":
    main()
