"""A year of history: N nights of R new rows each on ONE ledger, night by night costs.

    python bench/history.py [--nights 20] [--rows 3000] [--quick] [--nights 365] [--keep DIR]
                            [--repeat 3]

Each night, against the bench's fast loopback server (bench/_common.py, one CPU;
every request accepted), on the same ledger and sink file:

- run        `tasknotes run` of R new rows (a fresh CSV from bench/make_input.py,
             new task ids every night): wall time of the process, and its scan and
             send stages (summary.json ``timings_s``)
- webhooks   a ``task_note.created`` event (with its note, as Cobalt sends it) is
             appended to the sink file, with its receipt (the sink's receive time) to
             the receipts file beside it, for each row but ``--lost`` of them (default
             2%): those webhooks are lost, so every run stays open
- reconcile  `tasknotes reconcile` with the night's new evidence (not printed), then
             again with nothing new, ``--repeat`` times (default 3): the printed figure,
             wall time of the fastest of those processes
- status     `tasknotes status`, ``--repeat`` times: wall time of the fastest process
             (exit 1: rows are open)
- cpu s      the CPU seconds (user + system) of those processes, the least of the
             repeats: on a shared, loaded machine the steadier measure of the work done
- bytes/row  the ledger's pages (page count x page size, as a reader sees the
             database: pages still in the WAL count, free pages too) over the rows it
             holds; the WAL file itself is shown apart in MB. After the last night, where
             those bytes go: each table's and index's pages (SQLite's ``dbstat``)

At the end, the ratio of the last night's figures to the first night's. The goal
(issue #19): reconcile with nothing new and status <= 1.2x, scan <= 1.3x, at 20
or more nights. Every figure is one process's wall time, so each includes Python's
start-up (the same every night). ``--keep DIR`` works in DIR and leaves it (config,
ledger, sink file, reports), to profile a command on the ledger built.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import CLIENT_CPU, ROOT, Server, machine, median, python, table
from bench.make_input import write_csv
from pipeline.events import receipts_path

COLUMNS = ("night", "ledger rows", "run s", "scan s", "send s", "reconcile s (nothing new)",
           "status s", "reconcile cpu s", "status cpu s", "ledger B/row", "WAL MB")


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far: unlike
    wall time, hardly moved by other processes on a loaded machine."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(args: list[str], ok: tuple[int, ...] = (0, 1)) -> float:
    """Wall seconds of one `tasknotes` process pinned to the client CPU; other codes raise."""
    start = time.perf_counter()
    done = subprocess.run(["taskset", "-c", str(CLIENT_CPU), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in ok:
        raise RuntimeError(f"{' '.join(args[3:5])} exited {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return wall


def fastest(args: list[str], repeat: int) -> tuple[float, float]:
    """The least wall seconds and the least CPU seconds of ``repeat`` runs of one command
    (as ``timeit`` reports the best of its repeats: the slower ones measure whatever else
    the machine was doing)."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = cpu_seconds()
        walls.append(timed(args))
        cpus.append(cpu_seconds() - before)
    return min(walls), min(cpus)


def append_webhooks(ledger: Path, sink: Path, run_id: str, notes: dict[str, str],
                    lost_every: int) -> int:
    """Append a created event per accepted row of ``run_id`` but every ``lost_every``-th."""
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT id, job_id, emr_task_id FROM rows WHERE run_id=? AND"
                          " job_id IS NOT NULL ORDER BY id", (run_id,)).fetchall()
    lines = []
    for n, (row_id, job_id, task_id) in enumerate(rows):
        if lost_every and n % lost_every == lost_every - 1:
            continue
        lines.append(json.dumps({
            "id": f"evt_{run_id}_{row_id}", "access_token_reference_id": "user_1",
            "object": "event", "created": "2026-11-28T10:01:00Z", "type": "task_note.created",
            "job_id": str(job_id), "data": {"task_note_id": f"{row_id:024x}",
                                            "emr_note_id": f"emr-{row_id}",
                                            "emr_task_id": task_id, "note": notes[task_id]}},
            separators=(",", ":"), ensure_ascii=False) + "\n")
    # The sink's receipts first (as pipeline/events.py writes them: id, byte offset of the
    # line, receive time), then the lines: reconcile reads both.
    offset = sink.stat().st_size if sink.exists() else 0
    receipts = []
    for line in lines:
        event_id = line[len('{"id":"'):line.index('"', len('{"id":"'))]
        receipts.append(json.dumps({"id": event_id, "offset": offset,
                                    "received_at": "2026-11-28T10:01:00.123Z"},
                                   separators=(",", ":")) + "\n")
        offset += len(line.encode())
    with receipts_path(sink).open("a", encoding="utf-8") as fh:
        fh.writelines(receipts)
    with sink.open("a", encoding="utf-8") as fh:
        fh.writelines(lines)
    return len(lines)


def where_bytes_go(ledger: Path) -> list[tuple[str, int, int]]:
    """The ledger's pages by table and index (SQLite's ``dbstat``): (name, bytes, rows
    of the table or entries of the index), largest first."""
    with sqlite3.connect(ledger) as db:
        found = db.execute("SELECT name, sum(pgsize), sum(ncell) FROM dbstat"
                           " WHERE pagetype IN ('leaf', 'overflow') OR pagetype IS NULL"
                           " GROUP BY name").fetchall()
        sizes = dict(db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
    return sorted(((str(n), int(sizes[n]), int(c or 0)) for n, _, c in found),
                  key=lambda r: -r[1])


def ledger_bytes(ledger: Path) -> int:
    """The ledger database's size as a reader sees it (its WAL's newer pages included)."""
    with sqlite3.connect(ledger) as db:
        pages, size = (db.execute(f"PRAGMA {name}").fetchone()[0]
                       for name in ("page_count", "page_size"))
    return int(pages) * int(size)


def wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nights", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3000, help="new rows per night")
    parser.add_argument("--lost", type=float, default=0.02,
                        help="fraction of each night's webhooks lost (runs stay open)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 nights of 300")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of reconcile (nothing new) and of status per night; the"
                             " fastest is shown")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (a new directory) and keep it: the ledger, sink file,"
                             " reports and config, to profile a command on a built ledger")
    args = parser.parse_args()
    if args.quick:
        args.nights, args.rows = 3, 300
    lost_every = round(1 / args.lost) if args.lost > 0 else 0
    print(f"bench/history.py on {machine()}; {args.nights} nights of {args.rows:,} rows on "
          f"one ledger, {args.lost:.0%} of webhooks lost; reconcile and status: fastest of "
          f"{args.repeat}; load average {os.getloadavg()[0]:.1f}")
    results: list[list[float]] = []
    if args.keep is not None:
        args.keep.mkdir(parents=True)  # a new directory: never mixes with an older ledger
    with (contextlib.nullcontext(str(args.keep)) if args.keep is not None
          else tempfile.TemporaryDirectory()) as tmp, Server(0) as server:
        work = Path(tmp)
        ledger, sink = work / "state" / "ledger.sqlite", work / "state" / "webhooks.jsonl"
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "api": {"base_url": server.url, "account": "bench", "client_id": "c",
                    "client_secret": "s", "access_token": "t", "timeout_s": 30},
            "submit": {"concurrency": 64, "rate_per_second": None, "max_attempts": 3},
            "state": {"ledger": str(ledger)}, "webhooks": {"sink": str(sink)},
            "report": {"dir": str(work / "reports")}}))
        tasknotes = [python(), "-m", "pipeline", "-q"]
        for night in range(1, args.nights + 1):
            data = work / f"night-{night}.csv"
            write_csv(data, args.rows, seed=1000 + night)
            with data.open(encoding="utf-8", newline="") as fh:
                notes = {r["emr_task_id"]: r["note"] for r in csv.DictReader(fh)}
            run_s = timed([*tasknotes, "run", str(config), "--input", str(data),
                           "--no-progress"])
            with sqlite3.connect(ledger) as db:
                run_id, info = db.execute("SELECT run_id, info FROM runs ORDER BY started_at"
                                          " DESC, rowid DESC LIMIT 1").fetchone()
                total = db.execute("SELECT count(*) FROM rows").fetchone()[0]
            timings = json.loads(info).get("timings_s", {})
            append_webhooks(ledger, sink, run_id, notes, lost_every)
            timed([*tasknotes, "reconcile", str(config)])  # the night's new evidence
            reconcile_s, reconcile_cpu = fastest(  # nothing new: the same work each time
                [*tasknotes, "reconcile", str(config)], args.repeat)
            status_s, status_cpu = fastest([*tasknotes, "status", str(config)], args.repeat)
            data.unlink()
            results.append([night, total, run_s, timings.get("scan", float("nan")),
                            timings.get("send", float("nan")), reconcile_s, status_s,
                            reconcile_cpu, status_cpu, ledger_bytes(ledger) / total,
                            wal_bytes(ledger) / 2**20])
            if night == args.nights:
                rows_held = max(1, int(total))
                print("where the ledger's bytes go (dbstat; B/row over the ledger's rows): "
                      + ", ".join(f"{name} {size / rows_held:.0f}"
                                  for name, size, _ in where_bytes_go(ledger)
                                  if size >= rows_held), flush=True)
            print(f"night {night}: " + ", ".join(
                f"{name} {value:,.2f}" for name, value in zip(COLUMNS[1:], results[-1][1:],
                                                              strict=True)), flush=True)
    print(table(COLUMNS, [[int(r[0]), f"{int(r[1]):,}", *(f"{v:.2f}" for v in r[2:9]),
                           f"{r[9]:.0f}", f"{r[10]:.1f}"] for r in results]))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (figures from a loaded machine"
          " are not comparable night to night)")
    first, last = results[0], results[-1]
    ratios = {name: last[i] / first[i] if first[i] else float("nan")
              for i, name in enumerate(COLUMNS) if i >= 2}
    print(f"night {int(last[0])} / night 1: " + ", ".join(
        f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
    if len(results) >= 6:  # one night is one sample: on a shared machine, also medians of 3
        steady = {name: median([r[i] for r in results[-3:]]) / median([r[i] for r in results[:3]])
                  for i, name in enumerate(COLUMNS) if i >= 2}
        print("median of the last 3 nights / median of the first 3: " + ", ".join(
            f"{name} {ratio:.2f}x" for name, ratio in steady.items()))
    goals = {"reconcile s (nothing new)": 1.2, "status s": 1.2, "scan s": 1.3,
             "reconcile cpu s": 1.2, "status cpu s": 1.2}
    print("goals (issue #19, at >= 20 nights): " + "; ".join(
        f"{name} <= {goal}x: {'met' if ratios[name] <= goal else 'not met'}"
        for name, goal in goals.items()))


if __name__ == "__main__":
    main()
