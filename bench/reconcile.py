"""Reconciliation: 1M ledger rows against 1M sink events, against pandas and DuckDB joins.

    python bench/reconcile.py [--rows 1000000] [--reps 2] [--again] [--quick]

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

Goal (issue #7): reconcile <= 2x pandas.merge. Against DuckDB the ratio is
printed, with no goal.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import Measured, machine, median, python, run_measured, table
from pipeline.state import Attempt, Ledger, NewRow, row_key

RUN_ID = "bench-run"
ACCOUNT = "bench"
NOTE = "Patient called back, scheduled for next week; café, “quoted”. " * 3

RECONCILE_STAGE = """
import sys
from pathlib import Path
from pipeline.state import Ledger
from pipeline.reconcile import Reconciler
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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=2,
                        help="the step order rotates between reps (1: a fixed order)")
    parser.add_argument("--again", action="store_true",
                        help="also time a second `tasknotes reconcile` of the same ledger")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps, args.again = 20_000, 2, True
    cache = Path(tempfile.gettempdir()) / "tasknotes-bench" / f"reconcile-{args.rows}"
    started = time.perf_counter()
    ledger, sink = build(args.rows, cache)
    print(f"bench/reconcile.py on {machine()}; {args.rows:,} rows, "
          f"{sink.stat().st_size / 2**20:,.0f} MiB of events (made in "
          f"{time.perf_counter() - started:.0f} s, cached), {args.reps} reps")
    measured: dict[str, list[Measured]] = {}
    with tempfile.TemporaryDirectory() as tmp:
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
        names = list(steps)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            print(f"rep {rep + 1}: " + ", ".join(order))
            for name in order:
                shutil.copy(ledger, copy)
                measured.setdefault(name, []).append(run_measured(steps[name]))
                if name == "tasknotes reconcile" and args.again:
                    measured.setdefault("tasknotes reconcile, again", []).append(
                        run_measured(full))
        if args.reps == 1:
            print("one rep: the steps ran in this one order (use --reps 2 or more to rotate)")
    wall = {name: median([m.wall_s for m in ms]) for name, ms in measured.items()}
    base, strong = wall["pandas.merge"], wall["duckdb"]
    rows = [[name, f"{wall[name]:.1f}", f"{wall[name] / base:.2f}", f"{wall[name] / strong:.2f}",
             f"{median([m.rss_mb for m in ms]):.0f}"] for name, ms in measured.items()]
    print(table(["step", "seconds", "x pandas.merge", "x duckdb", "peak RSS MB"], rows))
    stage = wall["reconcile"]
    print(f"reconcile / pandas.merge = {stage / base:.2f} (goal <= 2: "
          f"{'met' if stage / base <= 2 else 'not met'}); reconcile / duckdb = "
          f"{stage / strong:.2f} (no goal); medians of {args.reps} reps")

if __name__ == "__main__":
    main()
