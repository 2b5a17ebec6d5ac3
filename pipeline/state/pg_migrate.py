"""Moving an embedded install's state into PostgreSQL (``tasknotes migrate-state``).

``copy_ledger`` copies a SQLite ledger (runs, input files, rows with every attempt and
outcome, the events mirror and its tally) into the database of ``state.url``, so the
history of what was sent moves with it: a run on PostgreSQL afterwards sends nothing
the SQLite ledger had sent. ``copy_sink`` copies the sink file's events (with their
receipts: when the sink received each) into ``sink_events``.

Both are idempotent: a run already in the database is left as it is with its rows
(runs are copied whole, each in the one transaction of the copy), and an event already
stored is skipped by its id or body hash. Row ids are kept (a row's ``ref_id`` names
the earlier row it follows), so rows are copied only into a database whose rows do not
use those ids already: migrate before the first run on PostgreSQL, or the copy stops
with StateError before writing anything.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import StateError
from pipeline.state.postgres import open_state, where
from pipeline.state.protocol import NO_RECEIPT, POLLED, SIGNED
from pipeline.state.schema import SCHEMA_VERSION, clock_name
from pipeline.state.sqlite import Ledger

if TYPE_CHECKING:
    from pipeline.state.pg_ledger import PgLedger

log = logging.getLogger(__name__)

_CHUNK: Final = 5000
# An event as copied: (id, SHA-256 of its body, body, verdict, receive time, and the
# byte offset just after its line in the sink file).
SinkEvent = tuple[str, bytes, bytes, str, datetime, int]
_LEDGER_TABLES: Final = ("runs", "files", "rows", "events", "event_tally")


@dataclass(frozen=True, slots=True)
class Copied:
    """What a copy added (``runs``, ``rows``, ``events``: the mirror; ``sink_events``)
    and how many runs / sink events were in the database already (``runs_there``,
    ``sink_there``)."""

    runs: int = 0
    rows: int = 0
    events: int = 0
    runs_there: int = 0
    sink_events: int = 0
    sink_there: int = 0


def copy_ledger(url: str, path: Path) -> Copied:
    """Copy the SQLite ledger at ``path`` into the database at ``url`` (module docstring).

    Raises StateError if the ledger cannot be read, the database cannot be used, or
    rows of other runs in the database already use the ids of rows to copy.
    """
    import psycopg

    ledger = _source_ledger(path)
    source = ledger._db
    try:
        locks = _lock_accounts(url, source, path)
    except BaseException:
        ledger.close()
        raise
    conn = open_state(url, application="tasknotes migrate-state")
    try:
        with conn.transaction():
            there = {str(r[0]) for r in conn.execute("SELECT run_id FROM runs").fetchall()}
            every = source.execute(
                "SELECT run_id, started_at, finished_at, state, account, config_fingerprint,"
                " info FROM runs ORDER BY started_at, rowid").fetchall()
            total = len(every)
            runs = [r for r in every if r[0] not in there]
            new = [r[0] for r in runs]
            _refuse_id_clash(conn, source, new, url)
            conn.cursor().executemany(
                "INSERT INTO runs (run_id, started_at, finished_at, state, account,"
                " config_fingerprint, info) VALUES (%s, %s, %s, %s, %s, %s, %s)", runs)
            copied_rows = 0
            for run_id in new:
                files = source.execute("SELECT * FROM files WHERE run_id=?", (run_id,))
                conn.cursor().executemany("INSERT INTO files VALUES (%s, %s, %s, %s, %s, %s)",
                                          files.fetchall())
                copied_rows += _copy_rows(conn, source, run_id)
            conn.execute("SELECT setval(pg_get_serial_sequence('rows', 'id'),"
                         " GREATEST((SELECT max(id) FROM rows), 1))")
            events = 0
            cursor = source.execute("SELECT * FROM events ORDER BY event_id")
            names = [d[0] for d in cursor.description]  # older ledgers have fewer columns
            insert = (f"INSERT INTO events ({', '.join(names)}) VALUES "  # noqa: S608
                      f"({', '.join(['%s'] * len(names))}) ON CONFLICT DO NOTHING")
            while batch := cursor.fetchmany(_CHUNK):
                cur = conn.cursor()
                cur.executemany(insert, [_named_clock(names, r) for r in batch])
                events += max(cur.rowcount, 0)
            conn.cursor().executemany(
                "INSERT INTO event_tally VALUES (%s, %s) ON CONFLICT DO NOTHING",
                source.execute("SELECT name, count FROM event_tally").fetchall())
    except psycopg.Error as exc:
        raise StateError(f"state.url: cannot copy into PostgreSQL at {where(url)}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    finally:
        conn.close()
        locks.close()  # after the commit: a run waiting for them sees the copied history
        ledger.close()
    return Copied(runs=len(new), rows=copied_rows, events=events, runs_there=total - len(new))


def _lock_accounts(url: str, source: Any, path: Path) -> PgLedger:
    """A session on ``url`` holding the run lock (pg_ledger.PgLedger.lock) of every account
    the ledger at ``path`` has runs of, until closed: no run of those accounts may scan
    while the copy is under way (it would find no history, and send again every note the
    copy then brings in) nor start before it is committed. Raises StateError naming the
    holder when a run holds one (nothing was copied)."""
    from pipeline.state.pg_ledger import PgLedger, label_locks

    row_accounts = any(r[1] == "account" for r in source.execute("PRAGMA table_info(rows)"))
    query = ("SELECT account FROM runs UNION SELECT account FROM rows" if row_accounts
             else "SELECT account FROM runs")  # a ledger before api.accounts has none
    labels = [str(r[0]) for r in source.execute(query).fetchall() if r[0]]
    names = sorted({name for label in labels for name in label_locks(label)})
    session = PgLedger(url, names[0] if names else "(migrate-state)", names)
    try:
        if names:
            session.lock(holder=f"tasknotes migrate-state of {path.name}")
    except StateError as exc:
        session.close()
        raise StateError(f"{exc}: let that run end, then migrate {path}; nothing was "
                         "copied") from None
    return session


def _source_ledger(path: Path) -> Ledger:
    """The SQLite ledger at ``path``, opened read-only, checked to be one, with its run
    lock held (so no run sends on it while it is copied: a copy of a run half-way would
    let the first run on PostgreSQL send again what the rest of it sent), all before
    anything touches the database. Raises StateError (exit 2) naming the path when it is
    missing, not an SQLite file, an SQLite file without a ledger's tables, or in use by
    a run."""
    try:
        ledger = Ledger.existing(path)
    except StateError as exc:
        raise StateError(f"--from-sqlite: {exc}") from None
    if ledger is None:
        raise StateError(f"--from-sqlite: no ledger at {path}")
    try:
        tables = {str(r[0]) for r in ledger._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
    except sqlite3.Error as exc:
        ledger.close()
        raise StateError(f"--from-sqlite: {path} cannot be read: {exc}") from None
    missing = sorted(set(_LEDGER_TABLES) - tables)
    if missing:
        ledger.close()
        raise StateError(f"--from-sqlite: {path} is not a tasknotes ledger (no table "
                         f"{', '.join(missing)}); nothing was copied")
    version = (ledger._db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
               .fetchone() if "meta" in tables else None)
    if version is not None and str(version[0]).isdigit() and int(version[0]) > SCHEMA_VERSION:
        ledger.close()  # written by a newer tasknotes: its columns mean what this one cannot know
        raise StateError(f"--from-sqlite: {path} has schema {version[0]}, newer than this "
                         f"tasknotes knows ({SCHEMA_VERSION}): upgrade tasknotes; nothing was "
                         "copied")
    try:  # held until the copy ends: no run may change the ledger while it is copied
        ledger.lock()
    except StateError as exc:
        ledger.close()
        raise StateError(f"--from-sqlite: {exc}: let that run end, then migrate; nothing "
                         "was copied") from None
    return ledger


def _refuse_id_clash(conn: Any, source: Any, runs: list[str], url: str) -> None:
    """StateError if a row to copy has an id some row in the database has already."""
    if not runs:
        return
    marks = ",".join("?" * len(runs))
    low, high = source.execute(
        f"SELECT min(id), max(id) FROM rows WHERE run_id IN ({marks})", runs).fetchone()  # noqa: S608
    if low is None:
        return
    clash = conn.execute("SELECT count(*) FROM rows WHERE id BETWEEN %s AND %s",
                         (low, high)).fetchone()[0]
    if clash:
        raise StateError(f"state.url: the database at {where(url)} already has rows with the "
                         f"ids of the ledger's rows ({clash:,} of them): migrate-state into a "
                         "database no run has written to yet; nothing was copied")


def _copy_rows(conn: Any, source: Any, run_id: str) -> int:
    """Copy one run's rows with their ids; returns how many."""
    cursor = source.execute("SELECT * FROM rows WHERE run_id=? ORDER BY id", (run_id,))
    names = [d[0] for d in cursor.description]
    sql = (f"INSERT INTO rows ({', '.join(names)}) VALUES "  # noqa: S608 - the ledger's names
           f"({', '.join(['%s'] * len(names))})")
    n = 0
    while batch := cursor.fetchmany(_CHUNK):
        conn.cursor().executemany(sql, [_named_clock(names, r) for r in batch])
        n += len(batch)
    return n


def _named_clock(names: list[str], row: Any) -> tuple[Any, ...]:
    """A ledger row or event with its ``outcome_clock`` code (schema 3) as the name
    PostgreSQL stores."""
    values = list(row)
    if "outcome_clock" in names:
        at = names.index("outcome_clock")
        values[at] = clock_name(values[at])
    return tuple(values)


def read_sink_events(sink: Path) -> list[SinkEvent]:
    """The events of the sink file ``sink`` as ``copy_sink`` stores them in
    ``sink_events`` (module docstring), each with the verdict and receive time its receipt
    gives: ``signature-verified`` and
    the time the sink received it; ``polled`` and the time poll fetched it; or
    ``migrated-no-receipt`` (no receipt: its outcome time will be its ``created``).
    Lines the event codec refuses are not copied (they stay in the file).

    Returns the events to copy (id, body hash, body, verdict, receive time, offset after
    its line), read whole
    before anything is written, so a file that is not a sink file stops the command
    before the ledger is copied. Raises StateError if the file cannot be used.
    """
    from pipeline.events import SetAside, encode_event, read_receipts, read_sink_from

    if not sink.exists():
        raise StateError(f"--sink: no sink file at {sink}")
    receipts = read_receipts(sink) or {}
    now = datetime.now(UTC)
    found: list[SinkEvent] = []
    unreadable = 0
    for _, end, event in read_sink_from(sink, 0):
        if isinstance(event, SetAside) or not isinstance(event.get("id"), str):
            unreadable += 1
            continue
        body = encode_event(event)
        receipt = receipts.get(event["id"])
        if receipt is not None and receipt.received_at is not None:
            verdict, at = SIGNED, receipt.received_at
        elif receipt is not None and receipt.fetched_at is not None:
            verdict, at = POLLED, receipt.fetched_at
        else:
            verdict, at = NO_RECEIPT, None
        when = datetime.fromisoformat(at) if at else now
        found.append((event["id"], hashlib.sha256(body).digest(), body, verdict, when, end))
    if unreadable and not found:
        raise StateError(f"--sink: none of the {unreadable:,} lines of {sink} is a webhook "
                         "event: is it the sink file (webhooks.sink)? nothing was copied")
    if unreadable:
        log.warning("--sink: %d line(s) of %s are not webhook events; not copied (they stay "
                    "in the file)", unreadable, sink)
    return found


def copy_sink(url: str, sink: Path | list[SinkEvent], *, mirrored_through: int = 0
              ) -> Copied:
    """Copy the events of the sink file ``sink`` (or those ``read_sink_events`` read from
    it) into ``sink_events`` (module docstring). ``mirrored_through``: how many bytes of
    the file the copied ledger's events mirror had read (``reconciliation.mirrored_through``):
    an event whose line ends within them, or a task_note event whose id the copied mirror
    holds (found by id, so a copy of the file or a replaced one is read right too), is in
    that mirror already and counted in its tally: its ``seq`` goes to
    ``sink_premirrored`` and the mirror on PostgreSQL reads past it (counted again, it
    would be a repeated delivery that never happened). A line repeated in the part not
    read yet is stored once (the sink's de-duplication), so not counted as repeated.
    Raises StateError if the file or the database cannot be used."""
    import psycopg

    found = read_sink_events(sink) if isinstance(sink, Path) else sink
    conn = open_state(url, application="tasknotes migrate-state")
    added = 0
    try:
        with conn.transaction():
            for start in range(0, len(found), _CHUNK):
                chunk = found[start:start + _CHUNK]
                rows = conn.execute(
                    "INSERT INTO sink_events (event_id, body_sha256, body, verdict, received_at)"
                    " SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[], %s::text[],"
                    " %s::timestamptz[]) ON CONFLICT DO NOTHING RETURNING seq, event_id",
                    [list(c) for c in zip(*(e[:5] for e in chunk), strict=True)]).fetchall()
                added += len(rows)
                mirrored: dict[str, bool] = {}
                for event in chunk:  # an id twice in the file: the first one is stored
                    mirrored.setdefault(event[0], event[5] <= mirrored_through)
                stored = [(int(str(seq)), str(event_id)) for seq, event_id in rows]
                # Read already: before the ledger's position in the file, or (whatever the
                # position says: a copy of the file, a replaced one) a task_note event
                # whose id the copied mirror holds.
                conn.execute(
                    "INSERT INTO sink_premirrored SELECT s.seq"
                    " FROM unnest(%s::bigint[], %s::text[], %s::boolean[]) AS s(seq, id, before)"
                    " WHERE s.before OR EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.id)"
                    " ON CONFLICT DO NOTHING",
                    [[seq for seq, _ in stored], [i for _, i in stored],
                     [mirrored[i] for _, i in stored]])
    except psycopg.Error as exc:
        raise StateError(f"state.url: cannot copy events into PostgreSQL at {where(url)}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    finally:
        conn.close()
    return Copied(sink_events=added, sink_there=len(found) - added)
