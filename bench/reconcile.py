"""Reconciliation: 1M ledger rows against 1M sink events, against pandas and DuckDB joins.

    python bench/reconcile.py [--rows 1000000] [--reps 2] [--again] [--no-postgres]
                              [--postgres-only] [--quick]

A generated ledger (one run, every row accepted with a job id) and a sink file
with one task_note event per row (4% failed, 1% repeated deliveries, 1% other
event types), cached between runs. Measured, each in its own process pinned to
one CPU, every step reading a fresh copy of the same ledger made just before it
(the same path, the same bytes) and the same sink file; the order of the steps
rotates from one rep to the next, so no step always runs first (with --reps 1
the order is fixed: the script says so):

- reconcile      the reconcile stage alone: read the sink into the ledger's event
                 mirror and apply the join rules (SQL), then count final statuses
- tasknotes      `tasknotes reconcile --run-id`: the same, plus results.csv (1M
                 rows), summary.json and report.html
- pandas.merge   a weak baseline: pandas.read_sql_query of the ledger rows and
                 pandas.read_json(lines=True) of the sink, merged on job_id
- duckdb         a strong baseline: the same ledger rows (pandas.read_sql_query),
                 the sink read by DuckDB's JSON Lines reader (three columns),
                 repeated deliveries dropped, joined on job_id and counted by
                 status and event type in DuckDB, one thread
- again          (--again) `tasknotes reconcile` a second time on the same ledger:
                 only what the sink gained is read

With PostgreSQL server binaries at hand (tests/pg.py; skipped with --no-postgres; with
--postgres-only only these two steps are measured),
the same ledger rows and the same events (repeated deliveries stored once, as the
sink stores them) are loaded with COPY into a database on a throwaway local server
(fsync off: the steps are reads and one commit), kept as a template; each step
below reads a fresh copy of it (CREATE DATABASE ... TEMPLATE, made just before):

- reconcile (PostgreSQL)     the reconcile stage with ``state.url``: the events read
                             from the sink's table into the mirror, the join rules
                             run by the server
- pandas.merge (PostgreSQL)  the ledger rows and the stored bodies read from the
                             database with psycopg, the bodies parsed by
                             pandas.read_json(lines=True), merged on job_id

Goals (issue #7, issue #16 for PostgreSQL): reconcile <= 2x pandas.merge, each
against the pandas.merge reading the same backend. Against DuckDB the ratio is
printed, with no goal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench._common import Measured, machine, median, python, run_measured, table
from pipeline.state import Attempt, Ledger, NewRow, row_key

if TYPE_CHECKING:
    from pg import PgCluster

RUN_ID = "bench-run"
ACCOUNT = "bench"
NOTE = "Patient called back, scheduled for next week; café, “quoted”. " * 3

RECONCILE_STAGE = """
import sys
from pathlib import Path
from pipeline.state import Ledger
from pipeline.reconciliation import Reconciler
ledger = Ledger(Path(sys.argv[1]))
result = Reconciler(ledger, Path(sys.argv[2])).run(sys.argv[3])
print(sum(result.counts.values()))
"""
PANDAS_MERGE = """
import sqlite3, sys
import pandas as pd
rows = pd.read_sql_query("SELECT id, job_id, task_note_id, status FROM rows WHERE run_id = ?",
                         sqlite3.connect(sys.argv[1]), params=(sys.argv[3],))
events = pd.read_json(sys.argv[2], lines=True, dtype=False)
events["job_id"] = events["job_id"].astype(str)
merged = rows.merge(events, on="job_id", how="left")
print(len(merged))
"""
PG_RECONCILE_STAGE = """
import sys
from pathlib import Path
from pipeline.state.pg_ledger import PgLedger
from pipeline.reconciliation import Reconciler
ledger = PgLedger(sys.argv[1], sys.argv[2])
result = Reconciler(ledger, Path(sys.argv[1])).run(sys.argv[3])  # state.url: no sink file
print(sum(result.counts.values()))
"""
PG_PANDAS_MERGE = """
import io, sys
import pandas as pd
import psycopg
with psycopg.connect(sys.argv[1]) as conn:
    cur = conn.execute("SELECT id, job_id, task_note_id, status FROM rows WHERE run_id = %s",
                       (sys.argv[3],))
    rows = pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description or ()])
    bodies = b"\\n".join(b for (b,) in conn.execute("SELECT body FROM sink_events ORDER BY seq"))
events = pd.read_json(io.BytesIO(bodies), lines=True, dtype=False)
events["job_id"] = events["job_id"].astype(str)
merged = rows.merge(events, on="job_id", how="left")
print(len(merged))
"""
DUCKDB_JOIN = """
import sqlite3, sys
import duckdb
import pandas as pd
rows = pd.read_sql_query("SELECT id, job_id, status FROM rows WHERE run_id = ?",
                         sqlite3.connect(sys.argv[1]), params=(sys.argv[3],))
con = duckdb.connect()
con.execute("SET threads = 1")
con.register("ledger_rows", rows)
counts = con.execute(\"\"\"
    WITH events AS (
        SELECT DISTINCT ON (id) id, job_id, type
        FROM read_json(?, format = 'newline_delimited',
                       columns = {'id': 'VARCHAR', 'job_id': 'VARCHAR', 'type': 'VARCHAR'})
        WHERE type LIKE 'task_note.%')
    SELECT r.status, e.type, count(*) FROM ledger_rows r LEFT JOIN events e USING (job_id)
    GROUP BY ALL\"\"\", [sys.argv[2]]).fetchall()
print(sum(n for *_, n in counts))
"""


def build(rows: int, directory: Path) -> tuple[Path, Path]:
    """The ledger and the sink file, made once per size and kept in the temp directory."""
    ledger_path, sink_path = directory / "ledger.sqlite", directory / "webhooks.jsonl"
    if ledger_path.exists() and sink_path.exists():
        return ledger_path, sink_path
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    ledger = Ledger(directory / "building.sqlite", synchronous="normal")
    ledger.start_run(RUN_ID, ACCOUNT, "bench", {})
    ledger.add_file(RUN_ID, 0, "input.csv", ["emr_task_id", "note"], sha256="0", size=0)
    with (directory / "building.jsonl").open("w", encoding="utf-8") as sink:
        for start in range(0, rows, 50_000):
            ids = range(start, min(rows, start + 50_000))
            ledger.add_rows(RUN_ID, [NewRow(0, i + 2, f"T{i}", row_key(ACCOUNT, f"T{i}", NOTE),
                                            "pending") for i in ids])
            first = start + 1  # row ids are 1-based and in input order
            ledger.apply([], [Attempt(first + i - start, "accepted", 200, f"{i:024x}",
                                      str(10_000_000 + i), None, "2026-11-28T10:00:00.000Z")
                              for i in ids])
            sink.writelines(line for i in ids for line in _events(i, rng))
    ledger.finish_run(RUN_ID, "finished", {})
    ledger.close()
    (directory / "building.jsonl").rename(sink_path)
    (directory / "building.sqlite").rename(ledger_path)
    return ledger_path, sink_path


_NOTE = json.dumps(NOTE, ensure_ascii=False)
_CREATED = ('{{"id":"evt_{i:020d}","access_token_reference_id":"user_1","object":"event",'
            '"created":"2026-11-28T10:01:00Z","type":"task_note.created","job_id":"{job}",'
            '"data":{{"task_note_id":"{i:024x}","emr_note_id":"emr-{i}","emr_task_id":"T{i}",'
            '"note":' + _NOTE.replace("{", "{{").replace("}", "}}") + '}}}}\n')
_FAILED = ('{{"id":"evt_{i:020d}","access_token_reference_id":"user_1","object":"event",'
           '"created":"2026-11-28T10:01:00Z","type":"task_note.failed","job_id":"{job}",'
           '"data":{{"task_note_id":"{i:024x}","failure_reason":"Task not found in EMR",'
           '"reasons":[{{"code":"task_not_found","description":"Task not found in EMR"}}]}}}}\n')
_OTHER = ('{{"id":"evt_other_{i}","access_token_reference_id":"user_1","object":"event",'
          '"created":"2026-11-28T10:01:00Z","type":"appointment.updated","job_id":"{job}",'
          '"data":{{"appointment_id":{i}}}}}\n')


def _events(i: int, rng: random.Random) -> list[str]:
    """The sink lines for row i (as Cobalt writes them: compact JSON, one per line)."""
    event = (_FAILED if rng.random() < 0.04 else _CREATED).format(i=i, job=10_000_000 + i)
    lines = [event]
    if rng.random() < 0.01:
        lines.append(event)  # a repeated delivery
    if rng.random() < 0.01:
        lines.append(_OTHER.format(i=i, job=10_000_000 + i))
    return lines


def build_postgres(cluster: PgCluster, ledger: Path, sink: Path) -> str:
    """A database on ``cluster`` holding the ledger's run, files and rows and the sink's
    events (each id once, as the sink stores them), loaded with COPY: its name."""
    from pipeline.state.postgres import open_state

    name = cluster.create_database()
    conn = open_state(cluster.url(name))
    source = sqlite3.connect(ledger)
    received = datetime(2026, 11, 28, 10, 2, tzinfo=UTC)
    try:
        with conn.transaction(), conn.cursor() as cur:
            for table in ("runs", "files", "rows"):
                have = {str(r[0]) for r in cur.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                    (table,))}
                listed = ", ".join(r[1] for r in source.execute(f"PRAGMA table_info({table})")
                                   if r[1] in have)
                with cur.copy(f"COPY {table} ({listed}) FROM STDIN") as copy:
                    for row in source.execute(f"SELECT {listed} FROM {table}"):
                        copy.write_row(row)
            cur.execute("SELECT setval('rows_id_seq', (SELECT max(id) FROM rows))")
            seen: set[bytes] = set()
            with cur.copy("COPY sink_events (event_id, body_sha256, body, verdict, received_at)"
                          " FROM STDIN") as copy, sink.open("rb") as lines:
                for line in lines:
                    body = line.rstrip(b"\n")
                    event_id = body[7:body.index(b'"', 7)]  # {"id":"...": as Cobalt writes it
                    if event_id not in seen:
                        seen.add(event_id)
                        copy.write_row((event_id.decode(), hashlib.sha256(body).digest(), body,
                                        "signature-verified", received))
        conn.execute("VACUUM ANALYZE")
    finally:
        conn.close()
        source.close()
    return name


@contextlib.contextmanager
def fresh_copy(cluster: PgCluster, template: str) -> Iterator[str]:
    """A new database copied from ``template`` (files copied, not replayed through the
    WAL), dropped after: its URL."""
    import psycopg

    name = f"{template}_step"
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=2,
                        help="the step order rotates between reps (1: a fixed order)")
    parser.add_argument("--again", action="store_true",
                        help="also time a second `tasknotes reconcile` of the same ledger")
    parser.add_argument("--no-postgres", action="store_true",
                        help="measure the SQLite ledger only")
    parser.add_argument("--postgres-only", action="store_true",
                        help="measure the two PostgreSQL steps only")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5k rows, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps, args.again = 5_000, 2, True  # both backends within a test timeout
    cache = Path(tempfile.gettempdir()) / "tasknotes-bench" / f"reconcile-{args.rows}"
    started = time.perf_counter()
    ledger, sink = build(args.rows, cache)
    print(f"bench/reconcile.py on {machine()}; {args.rows:,} rows, "
          f"{sink.stat().st_size / 2**20:,.0f} MiB of events (made in "
          f"{time.perf_counter() - started:.0f} s, cached), {args.reps} reps")
    measured: dict[str, list[Measured]] = {}
    from pg import PgCluster, why_no_cluster  # tests/pg.py: a throwaway local server

    no_pg = "--no-postgres" if args.no_postgres else why_no_cluster()
    if args.postgres_only and no_pg is not None:
        parser.error(f"--postgres-only: PostgreSQL cannot be measured here: {no_pg}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        cluster, template = None, ""
        if no_pg is None:
            cluster = PgCluster()
            stack.callback(cluster.remove)
            cluster.start()
            started = time.perf_counter()
            template = build_postgres(cluster, ledger, sink)
            print(f"loaded into PostgreSQL with COPY in {time.perf_counter() - started:.0f} s")
        work = Path(tmp)
        copy = work / "ledger.sqlite"  # every step reads this path, copied afresh before it
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "api": {"account": ACCOUNT}, "state": {"ledger": str(copy)},
            "webhooks": {"sink": str(sink)}, "report": {"dir": str(work / "reports")}}))
        full = [python(), "-m", "pipeline", "-q", "reconcile", str(config), "--run-id", RUN_ID]
        steps = {
            "pandas.merge": [python(), "-c", PANDAS_MERGE, str(copy), str(sink), RUN_ID],
            "duckdb": [python(), "-c", DUCKDB_JOIN, str(copy), str(sink), RUN_ID],
            "reconcile": [python(), "-c", RECONCILE_STAGE, str(copy), str(sink), RUN_ID],
            "tasknotes reconcile": full,
        }
        on_pg = {
            "pandas.merge (PostgreSQL)": PG_PANDAS_MERGE,
            "reconcile (PostgreSQL)": PG_RECONCILE_STAGE,
        } if cluster is not None else {}
        names = [*on_pg] if args.postgres_only else [*steps, *on_pg]
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            print(f"rep {rep + 1}: " + ", ".join(order))
            for name in order:
                if name in on_pg:
                    assert cluster is not None
                    with fresh_copy(cluster, template) as url:
                        measured.setdefault(name, []).append(run_measured(
                            [python(), "-c", on_pg[name], url, ACCOUNT, RUN_ID]))
                    continue
                shutil.copy(ledger, copy)
                measured.setdefault(name, []).append(run_measured(steps[name]))
                if name == "tasknotes reconcile" and args.again:
                    measured.setdefault("tasknotes reconcile, again", []).append(
                        run_measured(full))
        if args.reps == 1:
            print("one rep: the steps ran in this one order (use --reps 2 or more to rotate)")
    wall = {name: median([m.wall_s for m in ms]) for name, ms in measured.items()}
    if args.postgres_only:
        _report_postgres(measured, wall, args.reps)
        return
    base, strong = wall["pandas.merge"], wall["duckdb"]
    rows = [[name, f"{wall[name]:.1f}", f"{wall[name] / base:.2f}", f"{wall[name] / strong:.2f}",
             f"{median([m.rss_mb for m in ms]):.0f}"] for name, ms in measured.items()]
    print(table(["step", "seconds", "x pandas.merge", "x duckdb", "peak RSS MB"], rows))
    stage = wall["reconcile"]
    print(f"reconcile / pandas.merge = {stage / base:.2f} (goal <= 2: "
          f"{'met' if stage / base <= 2 else 'not met'}); reconcile / duckdb = "
          f"{stage / strong:.2f} (no goal); medians of {args.reps} reps")
    if no_pg is not None:
        print(f"PostgreSQL: not measured: {no_pg}")
        return
    on_pg_ratio = wall["reconcile (PostgreSQL)"] / wall["pandas.merge (PostgreSQL)"]
    print(f"PostgreSQL: reconcile / pandas.merge = {on_pg_ratio:.2f} (goal <= 2: "
          f"{'met' if on_pg_ratio <= 2 else 'not met'}); reconcile PostgreSQL / SQLite = "
          f"{wall['reconcile (PostgreSQL)'] / stage:.2f}")

def _report_postgres(measured: dict[str, list[Measured]], wall: dict[str, float],
                     reps: int) -> None:
    """The table and the goal of the two PostgreSQL steps alone (--postgres-only)."""
    base = wall["pandas.merge (PostgreSQL)"]
    print(table(["step", "seconds", "x pandas.merge", "client CPU s", "peak RSS MB"],
                [[name, f"{wall[name]:.1f}", f"{wall[name] / base:.2f}",
                  f"{median([m.cpu_s for m in ms]):.1f}",
                  f"{median([m.rss_mb for m in ms]):.0f}"] for name, ms in measured.items()]))
    ratio = wall["reconcile (PostgreSQL)"] / base
    print(f"PostgreSQL: reconcile / pandas.merge = {ratio:.2f} (goal <= 2: "
          f"{'met' if ratio <= 2 else 'not met'}); medians of {reps} reps")


if __name__ == "__main__":
    main()
