"""Whole-run throughput with state in PostgreSQL (``state.url``) vs the SQLite ledger.

    python bench/state.py [--rows 8000] [--reps 3] [--quick]

`tasknotes run` sends the same rows at C=64 to the bench's server answering after
20 ms (bench/_common.py), once with its ledger in SQLite (a fresh file) and once
with its state in PostgreSQL (a fresh database on a throwaway local server,
tests/pg.py, with fsync on as in production, as SQLite fsyncs its ledger;
synchronous_commit on), alternating which goes first, in the same run. Printed:
medians of the send phase's req/s (summary.json) and of rows / wall time of the
whole command, and the ratio PostgreSQL / SQLite (issue #16's goal:
whole run >= 0.85). The database server shares the machine's CPUs with the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench._common import Server, durable_cluster, machine, median, table
from bench.make_input import write_csv
from bench.submit import run_tasknotes

LATENCY_MS, CONCURRENCY = 20.0, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)  # ~2.5 s at C/L = 3,200 req/s
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps = 300, 1
    cluster = durable_cluster("state.py")
    if cluster is None:
        return
    print(f"bench/state.py on {machine()}; {args.rows:,} rows, {args.reps} reps, "
          f"C={CONCURRENCY}, L={LATENCY_MS:.0f} ms")
    send: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    whole: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    try:
        cluster.start()
        with tempfile.TemporaryDirectory() as tmp, Server(LATENCY_MS) as server:
            workdir = Path(tmp)
            data = workdir / "input.csv"
            write_csv(data, args.rows, seed=16)
            for rep in range(args.reps):
                order = ("sqlite", "postgres") if rep % 2 == 0 else ("postgres", "sqlite")
                for backend in order:
                    url = (cluster.url(cluster.create_database()) if backend == "postgres"
                           else None)
                    found = run_tasknotes(workdir, data, server.url, CONCURRENCY, args.rows,
                                          state_url=url)
                    send[backend].append(found["rps"])
                    whole[backend].append(args.rows / found["wall"])
    finally:
        cluster.remove()
    rows = [[name, f"{median(send[b]):,.0f}", f"{median(whole[b]):,.0f}"]
            for name, b in (("SQLite ledger", "sqlite"), ("PostgreSQL (state.url)", "postgres"))]
    print(table(["state", "send req/s", "whole cmd rows/s"], rows))
    ratio = median(whole["postgres"]) / median(whole["sqlite"])
    print(f"whole run: PostgreSQL/SQLite = {ratio:.2f} (goal >= 0.85); send phase: "
          f"{median(send['postgres']) / median(send['sqlite']):.2f}")
    print("medians; whole cmd = rows / wall time of the `tasknotes run` process (start-up, "
          "validation, ledger, report included)")


if __name__ == "__main__":
    main()
