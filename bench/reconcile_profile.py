"""Where reconcile's time goes: CPU seconds per phase, beside pandas.merge's, in one process.

    python bench/reconcile_profile.py [--rows 200000] [--quick]

The same ledger and sink file as bench/reconcile.py (made there, cached), a fresh copy
of the ledger; the reconcile stage (``Reconciler.run`` and its final-status counts)
with each phase's CPU time (``time.process_time``) taken around the functions that do
it, then pandas.merge of the same ledger rows and sink file (the baseline of
bench/reconcile.py). CPU time, not wall time: on a shared machine it moves less with
the load (it still grows when another process shares the core's caches).

Phases (nested ones are shown indented and are part of the phase above them):

- ingest          mirroring the sink file into the ledger (``reconciliation.ingest``)
  - decode        each line through the event codec (``events.decode_event``)
  - records       each event as the mirror keeps it (``reconciliation._record``):
                  every upstream id checked against the event's note (redaction.safe_id)
                  and the note's ledger key (a SHA-256, ``row_key``)
    - row_key     the note's ledger key alone
  - store         the records written to the ledger, one transaction per 10,000
                  (``add_events``; fsync'ed, as every ledger commit)
- join rules      ``match_outcomes``: the SQL of state/rules.py, outcomes written back
- counts          the run's final statuses counted (``RunResult.counts``: the rows read a
                  chunk at a time, only the columns a final status is decided from)
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine, table
from bench.reconcile import RUN_ID, build


def _timed(spent: dict[str, float], name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return func(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - start
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 rows")
    args = parser.parse_args()
    if args.quick:
        args.rows = 5_000
    cache = Path(tempfile.gettempdir()) / "tasknotes-bench" / f"reconcile-{args.rows}"
    ledger_path, sink = build(args.rows, cache)

    import pandas as pd

    import pipeline.events
    import pipeline.reconciliation as reconciliation
    from pipeline.state import Ledger

    spent: dict[str, float] = {}
    pipeline.events.decode_event = _timed(spent, "decode", pipeline.events.decode_event)
    reconciliation._record = _timed(spent, "records", reconciliation._record)
    reconciliation.row_key = _timed(spent, "row_key", reconciliation.row_key)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "ledger.sqlite"
        shutil.copy(ledger_path, copy)
        ledger = Ledger(copy)
        ledger.add_events = _timed(spent, "store", ledger.add_events)  # type: ignore[method-assign]
        ledger.match_outcomes = _timed(  # type: ignore[method-assign]
            spent, "join rules", ledger.match_outcomes)
        reconciliation.ingest = _timed(spent, "ingest", reconciliation.ingest)
        start = time.process_time()
        result = reconciliation.Reconciler(ledger, sink).run(RUN_ID)
        counted = _timed(spent, "counts", lambda: sum(result.counts.values()))()
        total = time.process_time() - start
        ledger.close()
        start = time.process_time()
        rows = pd.read_sql_query(
            "SELECT id, job_id, task_note_id, status FROM rows WHERE run_id = ?",
            sqlite3.connect(ledger_path), params=(RUN_ID,))
        events = pd.read_json(sink, lines=True, dtype=False)
        events["job_id"] = events["job_id"].astype(str)
        merged = rows.merge(events, on="job_id", how="left")
        base = time.process_time() - start
    assert counted == args.rows
    assert len(merged) >= args.rows
    print(f"bench/reconcile_profile.py on {machine()}; {args.rows:,} rows, CPU seconds")
    shown = [("ingest", ""), ("decode", "  "), ("records", "  "), ("row_key", "    "),
             ("store", "  "), ("join rules", ""), ("counts", "")]
    lines = [[indent + name, f"{spent.get(name, 0.0):.2f}", f"{spent.get(name, 0.0) / base:.2f}"]
             for name, indent in shown]
    lines.append(["reconcile (all)", f"{total:.2f}", f"{total / base:.2f}"])
    lines.append(["pandas.merge", f"{base:.2f}", "1.00"])
    print(table(["phase", "CPU s", "x pandas.merge"], lines))


if __name__ == "__main__":
    main()
