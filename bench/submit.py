"""Submit throughput: `tasknotes run` (the real path) against bare client loops, same server.

    python bench/submit.py [--rows 20000] [--reps 2] [--quick]

For server latency L in {0, 20 ms} and concurrency C in {16, 64}: the bench's own
minimal HTTP server on one CPU, the client on the other; each implementation
sends the same rows, alternating order between repetitions; medians in req/s.

- tasknotes   `tasknotes run` on a generated CSV: validation, ledger (fsync'ed
              'sending' before each request), limiter, retries; req/s of its
              send phase (summary.json), and of the whole command (rows over the
              wall time of the process: start-up, validation, report included)
- httpx       a bare httpx.AsyncClient loop (httpx's own pool), C workers
- httpx-aio   the same loop over tasknotes' aiohttp-backed httpx transport
- aiohttp     a bare aiohttp.ClientSession loop, C workers

Goals (issue #7): at C=64, L=20 ms, tasknotes >= 0.9 x C/L (2,880 req/s); at
0 ms, tasknotes >= 0.9 x the fastest httpx-API transport. Where the throughput
is bounded by C/L, each run sends at most ~2.5 s worth of rows, and a baseline
stops after 3 s (its rate is measured over what it sent), so the whole script
stays under three minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    CLIENT_CPU,
    ROOT,
    Server,
    machine,
    median,
    python,
    run_json,
    table,
)
from bench.make_input import write_csv

BASELINES = ("httpx", "httpx-aio", "aiohttp")
CLIENT_IMPL = {"httpx": "httpx", "httpx-aio": "httpx-aiohttp", "aiohttp": "aiohttp"}


def rows_for(rows: int, concurrency: int, latency_ms: float) -> int:
    """All rows, or ~2.5 s worth where C/L bounds the rate."""
    if latency_ms <= 0:
        return rows
    return min(rows, int(concurrency / (latency_ms / 1000) * 2.5))


def run_tasknotes(workdir: Path, data: Path, url: str, concurrency: int,
                  rows: int, state_url: str | None = None) -> dict[str, float]:
    """One ``tasknotes run`` in a fresh directory (``state_url``: state in that database,
    which must be empty); its send phase's req/s and the process's wall time in s."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    config = {
        "input": {"path": str(data)},
        "api": {"base_url": url, "account": "bench", "client_id": "c", "client_secret": "s",
                "access_token": "t", "timeout_s": 30},
        "submit": {"concurrency": concurrency, "rate_per_second": None, "max_attempts": 3},
        "state": {"ledger": str(run_dir / "ledger.sqlite"),
                  **({"url": state_url} if state_url else {})},
        "webhooks": {"sink": str(run_dir / "webhooks.jsonl")},
        "report": {"dir": str(run_dir / "reports")},
    }
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    done = subprocess.run(
        [python(), "-m", "pipeline", "-q", "run", str(path), "--no-progress", "--limit",
         str(rows)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {CLIENT_CPU}) if hasattr(
            os, "sched_setaffinity") and (os.cpu_count() or 1) > 1 else None,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"tasknotes run failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(next((run_dir / "reports").iterdir()).joinpath("summary.json")
                         .read_text())
    sent = summary["submit_status"].get("accepted", 0)
    if sent != rows:
        raise RuntimeError(f"tasknotes accepted {sent} of {rows} rows")
    return {"rps": float(summary["throughput_per_s"]), "wall": wall}


def run_baseline(impl: str, url: str, concurrency: int, rows: int) -> dict[str, float]:
    result = run_json([python(), str(ROOT / "bench" / "_clients.py"), CLIENT_IMPL[impl], url,
                       str(concurrency), str(rows), "3"])
    return {"rps": float(result["rps"])}  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps = 300, 1
    print(f"bench/submit.py on {machine()}; {args.rows:,} rows, {args.reps} reps; "
          "server and client on separate CPUs")
    impls = ("tasknotes", *BASELINES)
    results: dict[tuple[float, int, str], list[float]] = {}
    whole: dict[tuple[float, int], list[float]] = {}  # tasknotes: rows / wall s of the command
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "input.csv"
        write_csv(data, args.rows, seed=11)
        for latency in (0.0, 20.0):
            with Server(latency) as server:
                for concurrency in (16, 64):
                    rows = rows_for(args.rows, concurrency, latency)
                    for rep in range(args.reps):
                        order = impls[rep % len(impls):] + impls[:rep % len(impls)]
                        for impl in order:
                            measured = (run_tasknotes(workdir, data, server.url, concurrency, rows)
                                        if impl == "tasknotes" else
                                        run_baseline(impl, server.url, concurrency, rows))
                            results.setdefault((latency, concurrency, impl), []).append(
                                measured["rps"])
                            if impl == "tasknotes":
                                whole.setdefault((latency, concurrency), []).append(
                                    rows / measured["wall"])
    report(results, whole)


def report(results: dict[tuple[float, int, str], list[float]],
           whole: dict[tuple[float, int], list[float]]) -> None:
    rows = []
    verdicts = []
    for latency in (0.0, 20.0):
        for concurrency in (16, 64):
            med = {impl: median(results[(latency, concurrency, impl)])
                   for impl in ("tasknotes", *BASELINES)}
            best_httpx = max(med["httpx"], med["httpx-aio"])
            bound = concurrency / (latency / 1000) if latency else float("inf")
            rows.append([f"{latency:.0f} ms", concurrency, f"{med['tasknotes']:,.0f}",
                         f"{median(whole[(latency, concurrency)]):,.0f}",
                         f"{med['httpx']:,.0f}", f"{med['httpx-aio']:,.0f}",
                         f"{med['aiohttp']:,.0f}", "-" if latency == 0 else f"{bound:,.0f}",
                         f"{med['tasknotes'] / best_httpx:.2f}",
                         "-" if latency == 0 else f"{med['tasknotes'] / bound:.2f}"])
            if latency == 0:
                verdicts.append(f"L=0 ms, C={concurrency}: tasknotes/best httpx-API = "
                                f"{med['tasknotes'] / best_httpx:.2f} (goal >= 0.90)")
            elif concurrency == 64:
                verdicts.append(f"L=20 ms, C=64: tasknotes = {med['tasknotes']:,.0f} req/s = "
                                f"{med['tasknotes'] / bound:.2f} x C/L (goal >= 0.90, 2,880)")
    print(table(["latency", "C", "tasknotes", "whole cmd", "httpx", "httpx-aio", "aiohttp", "C/L",
                 "ours/httpx-best", "ours/(C/L)"], rows))
    print("\n".join(verdicts))
    print("req/s medians; tasknotes = its send phase; whole cmd = rows / wall time of the whole "
          "`tasknotes run` process (start-up, validation, ledger, report included)")


if __name__ == "__main__":
    main()
