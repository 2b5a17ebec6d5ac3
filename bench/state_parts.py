"""What each of a run's PostgreSQL writes costs, split into the client's and the server's CPU.

    python bench/state_parts.py [--rows 8000] [--wave 12] [--reps 3] [--quick]

On a fresh database of a throwaway local PostgreSQL 15 (tests/pg.py, fsync on, as
bench/state.py): the scan's writes of ``--rows`` new rows (``add_rows``), its lookup of
earlier runs' rows for their keys (``earlier``), then the send's group commits
(``apply``: a wave of ``--wave`` rows marked ``sending`` and the previous wave's
answers, as the submit stage commits them) over every row, and the join rules
(``match_outcomes``) once a run's answers are in. For each: wall time, the client's CPU
(this process) and the server's (the backend's utime + stime, from
/proc/<pid>/stat), medians of ``--reps`` fresh databases. Linux only (the server's CPU).
bench/state.py measures the whole run these parts make.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench._common import durable_cluster, machine, median, table
from pipeline.state import Attempt, NewRow
from pipeline.state.pg_ledger import PgLedger


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the server process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, step: Callable[[], object]) -> tuple[float, float, float]:
    """(wall, client CPU, server CPU) seconds of ``step()``."""
    server, client, wall = server_cpu(pid), time.process_time(), time.perf_counter()
    step()
    return (time.perf_counter() - wall, time.process_time() - client,
            server_cpu(pid) - server)


def one_database(url: str, rows: int, wave: int) -> dict[str, tuple[float, float, float]]:
    """Each part's (wall, client, server) seconds on the empty database at ``url``; the
    group commits' as the mean of one."""
    ledger = PgLedger(url, "bench")
    try:
        ledger.lock()
        ledger.start_run("run-1", "bench", "fp", {})
        pid = ledger._conn.info.backend_pid  # the server process of this session
        new = [NewRow(0, i + 2, f"T{i}", hashlib.sha256(f"T{i}".encode()).digest(), "pending")
               for i in range(rows)]
        got = {"add_rows": measured(pid, lambda: ledger.add_rows("run-1", new)),
               "earlier": measured(pid, lambda: ledger.earlier(
                   "run-1", [r.key for r in new if r.key is not None]))}
        ids = [row_id for row_id, *_ in ledger.rows_to_send("run-1")]
        waves = [ids[i:i + wave] for i in range(0, len(ids), wave)]

        def send() -> None:
            previous: list[int] = []
            for sending in [*waves, []]:
                ledger.apply(sending, [Attempt(i, "accepted", 202, f"tn-{i}", f"job-{i}",
                                               None, "2026-01-01T00:00:00Z")
                                       for i in previous])
                previous = sending
        wall, client, server = measured(pid, send)
        got["apply (one group commit)"] = (wall / (len(waves) + 1), client / (len(waves) + 1),
                                           server / (len(waves) + 1))
        got["match_outcomes"] = measured(pid, ledger.match_outcomes)
        return got
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--wave", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps = 300, 1
    cluster = durable_cluster("state_parts.py")
    if cluster is None:
        return
    print(f"bench/state_parts.py on {machine()}; {args.rows:,} rows, waves of {args.wave}, "
          f"{args.reps} reps")
    runs: list[dict[str, tuple[float, float, float]]] = []
    try:
        cluster.start()
        for _ in range(args.reps):
            runs.append(one_database(cluster.url(cluster.create_database()), args.rows,
                                     args.wave))
    finally:
        cluster.remove()
    print(table(["part", "wall ms", "client CPU ms", "server CPU ms"], [
        [part, *(f"{median([run[part][k] for run in runs]) * 1000:,.2f}" for k in range(3))]
        for part in runs[0]]))
    print("medians; CPU from this process and the server's backend (/proc/<pid>/stat)")


if __name__ == "__main__":
    main()
