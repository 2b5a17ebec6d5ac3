"""The events mirror and the join rules (rules.py) on the ledger, and a run's rows read
back for reconcile and the report."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.state import rules
from pipeline.state.records import (
    EventRecord,
    Orphan,
)
from pipeline.state.schema import TRIGGER_NAMES, TRIGGERS, clock_name

if TYPE_CHECKING:
    import pandas as pd

from pipeline.state.runs import SQLiteRuns

# The records as they are (a million per reconcile of 1M rows): outcome_clock, parameter
# 12, stored as its CLOCK_CODES code (another value as it is), by SQLite, not per record.
_INSERT_EVENT = """INSERT OR IGNORE INTO events (event_id, kind, job_id, task_note_id, created,
    emr_note_id, failure_reason, reason_codes, ekey, line, outcome_at, outcome_clock, account)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, CASE ?12 WHEN 'sink_received' THEN 'r'
        WHEN 'event_created_polled' THEN 'p' WHEN 'event_created_no_receipt' THEN 'n'
        ELSE ?12 END, ?13)"""
# Outcomes written at once from which the rows' triggers are set aside (``_write_outcomes``):
# below it the triggers' cost is small, and the schema is left alone.
QUIET_FROM = 1_000
# The share of the ledger's rows (its last row id) changed at once from which the keys
# of more than one row are read from rows_key whole, not probed per changed row (rules.py,
# SHARED_SCANNED): reading an entry costs about a sixth of a probe at a random place.
SCAN_KEYS_FROM = 0.125


class SQLiteOutcomes(SQLiteRuns):
    """Outcomes: events mirrored from the sink file, matched to rows by the join rules."""

    def sink_position(self) -> tuple[int, str]:
        """How far the sink file has been read: (byte offset, hash of its first line)."""
        found = dict(self._db.execute(
            "SELECT key, value FROM meta WHERE key IN ('sink_offset', 'sink_head')").fetchall())
        return int(found.get("sink_offset", 0)), str(found.get("sink_head", ""))

    def add_events(self, events: Sequence[EventRecord], tally: dict[str, int], *,
                   offset: int, head: str, count_repeats: bool = True,
                   others: Sequence[tuple[str, str]] = ()) -> int:
        """Store newly read events and where reading stopped, in one transaction.

        Returns how many events were new (an event already stored is left as it is, and
        counted as a repeated delivery, ``(repeated)`` in the tally, unless
        ``count_repeats`` is False: a replaced sink file read again from its start holds
        the events mirrored from the file it replaced, which are no new deliveries).
        ``others``: (event id, tally name) of events of other types, each counted under
        its name the first time its id is read (table ``tallied``), after that as a
        repeated delivery like the task_note events: a file read again is not counted
        twice.
        """
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(_INSERT_EVENT, events)
            added = self._db.total_changes - before
            if added:  # what the join rules' stamp counts (the events have no rowid)
                self._db.execute(
                    "INSERT INTO meta VALUES ('events_stored', ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value", (added,))
            repeats = len(events) - added
            if others:
                tally = dict(tally)
                for event_id, name in others:
                    if self._db.execute("INSERT OR IGNORE INTO tallied VALUES (?)",
                                        (event_id,)).rowcount:
                        tally[name] = tally.get(name, 0) + 1
                    else:
                        repeats += 1
            if count_repeats:
                tally = {**tally, "(repeated)": tally.get("(repeated)", 0) + repeats}
            self._db.executemany(
                "INSERT INTO event_tally VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET count = count + excluded.count", [(k, v) for k, v in tally.items() if v])
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [("sink_offset", str(offset)), ("sink_head", head)])
        return added

    def rows_of_jobs(self, job_ids: Iterable[str],
                     task_note_ids: Iterable[str]) -> list[tuple[Any, ...]]:
        """Sent rows with one of these job ids or task note ids, with what reading their note
        back needs: (id, job_id, task_note_id, line, emr_task_id, key, account, input path,
        input header as JSON; both None if the run never recorded its file), rows of every
        run (pipeline/reasons.py)."""
        found: dict[int, tuple[Any, ...]] = {}
        select = ("SELECT r.id, r.job_id, r.task_note_id, r.line, r.emr_task_id, r.key,"
                  " u.account, f.path, f.header FROM rows r JOIN runs u ON u.run_id = r.run_id"
                  " LEFT JOIN files f ON f.run_id = r.run_id AND f.file_no = r.file_no"
                  " WHERE r.key IS NOT NULL AND ")
        for column, wanted in (("job_id", job_ids), ("task_note_id", task_note_ids)):
            values = sorted(wanted)
            for start in range(0, len(values), 500):
                chunk = values[start:start + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"{select} r.{column} IN ({marks})"
                found.update((r[0], r) for r in self._db.execute(sql, chunk))
        return list(found.values())

    def events(self) -> list[EventRecord]:
        """The mirrored task_note events, by event id, as stored (reasons redacted)."""
        return [EventRecord(*r)._replace(outcome_clock=clock_name(str(r[11])))
                for r in self._db.execute(
            "SELECT event_id, kind, job_id, task_note_id, created, emr_note_id, failure_reason,"
            " reason_codes, ekey, line, outcome_at, outcome_clock, account FROM events"
            " ORDER BY event_id")]

    def connections(self) -> dict[str, str]:
        """access_token_reference_id -> account, as the configs using this state last named
        them (``register_connections``)."""
        try:
            return {str(r): str(a) for r, a in self._db.execute(
                "SELECT reference_id, account FROM connections")}
        except sqlite3.OperationalError:  # a ledger opened read-only from before the table
            return {}

    def register_connections(self, named: Mapping[str, str]) -> None:
        """Record the connections a config names (reference id -> account, its
        ``ApiConfig.connections``); a reference named again takes the account given now (a
        clinic renamed). Written only where it changes what is recorded."""
        recorded = self.connections()
        changed = [(r, a) for r, a in named.items() if recorded.get(r) != a]
        if changed:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO connections VALUES (?, ?, ?) ON CONFLICT (reference_id)"
                    " DO UPDATE SET account = excluded.account, since = excluded.since",
                    [(r, a, self._clock()) for r, a in changed])

    def event_tally(self) -> dict[str, int]:
        """Counts of what the sink held besides new task_note events (other types, repeats)."""
        return dict(self._db.execute("SELECT name, count FROM event_tally ORDER BY name"))

    def match_outcomes(self) -> int:
        """Apply the join rules (rules.py) to every row; returns rows changed.

        Computed from scratch into a temporary table, then written where it differs,
        so the same events always give the same outcomes, and a rerun writes nothing.
        Not run at all when no row and no event changed since the last time (the
        ``match_stamp``: rows, events and the runs' change counters of schema.TRIGGERS).
        """
        db = self._db
        if self._match_stamp() == self._stored_stamp():
            return 0
        try:
            with self._transaction():
                for statement in rules.MATCH_SQL:
                    db.execute(statement)
                if db.execute(rules.ANY_DOUBTFUL_SQL).fetchone() is not None:
                    db.execute(rules.EVIDENCE_SQL)
                # rows changed, not total_changes: that counts the trigger's runs.rev bumps
                # too (one per row: "66 rows" for 33). The two sets of rows are disjoint.
                changed = max(db.execute(rules.CLEAR_OUTCOMES_SQL).rowcount, 0)
                changed += self._write_outcomes()
                for statement in rules.ORPHANS_SQL:
                    db.execute(statement)
                if self.orphans(0)[0]:
                    db.execute(rules.ORPHAN_LIST_SQL)
                db.execute("DROP TABLE temp.owned")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('match_stamp', ?)",
                           (self._match_stamp(),))
                return changed
        finally:
            db.execute("DROP TABLE IF EXISTS temp.owned")
            db.execute("DROP TABLE IF EXISTS temp.matched")
            db.execute("DROP TABLE IF EXISTS temp.claimed")

    def _write_outcomes(self) -> int:
        """Write the outcomes of ``temp.matched`` that differ from the rows' (inside
        ``match_outcomes``'s transaction); returns rows changed. Up to ``QUIET_FROM`` rows
        through the rows' triggers; more as rules.CHANGED_OUTCOMES_SQL says: the triggers
        dropped and made again in this same transaction (no other connection ever sees
        the rows without them), each run they would have bumped bumped once (``runs.rev``
        is only compared for equality, as on PostgreSQL: postgres.py, migration 5)."""
        db = self._db
        db.execute(rules.CHANGED_OUTCOMES_SQL)
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM temp.changed").fetchone()
            if count < QUIET_FROM:
                return max(db.execute(rules.WRITE_OUTCOMES_SQL).rowcount, 0)
            for trigger in TRIGGER_NAMES:
                db.execute(f"DROP TRIGGER {trigger}")
            written = max(db.execute(rules.WRITE_CHANGED_SQL).rowcount, 0)
            (rows,) = db.execute("SELECT MAX(id) FROM rows").fetchone()
            shared = (rules.SHARED_SCANNED if count >= SCAN_KEYS_FROM * (rows or 0)
                      else rules.SHARED_PROBED)
            db.execute(rules.BUMP_CHANGED_SQL.format(shared=shared))
            for statement in TRIGGERS:
                db.execute(statement)
            return written
        finally:
            db.execute("DROP TABLE IF EXISTS temp.changed")

    def _match_stamp(self) -> str:
        """What the join rules read, in four numbers: the last row stored, how many events
        were stored (``add_events`` counts them), how many runs, and the sum of the runs'
        change counters (any row updated or deleted bumps one: schema.TRIGGERS). Indexed
        lookups and one pass over the runs."""
        found = self._db.execute(
            "SELECT (SELECT MAX(id) FROM rows),"
            " (SELECT value FROM meta WHERE key = 'events_stored'),"
            " (SELECT COUNT(*) FROM runs), (SELECT TOTAL(rev) FROM runs)").fetchone()
        return ",".join(str(v) for v in found)

    def _stored_stamp(self) -> str | None:
        found = self._db.execute("SELECT value FROM meta WHERE key = 'match_stamp'").fetchone()
        return None if found is None else str(found[0])

    def orphans(self, limit: int = 50) -> tuple[int, list[Orphan]]:
        """task_note events that no row of any run owns: how many, and the first few."""
        found = self._db.execute("SELECT value FROM meta WHERE key = 'orphans'").fetchone()
        rows = self._db.execute("SELECT event_id, kind, job_id, created FROM orphans"
                                " ORDER BY created, event_id LIMIT ?", (limit,)).fetchall()
        return int(found[0]) if found else 0, [Orphan(*r) for r in rows]

    def run_chunks(self, run_id: str, size: int = 20_000) -> Iterator[pd.DataFrame]:
        """A run's rows in input order, ``size`` at a time, with their file, the row they
        refer to (the earlier attempt of a held or already-sent row), and ``via_*``: the
        send of the same note by another run that speaks for a row whose own attempt did
        not deliver it (rule 5 in rules.py), or None."""
        import pandas as pd  # noqa: PLC0415 - not needed to send

        last = 0
        while True:
            frame = pd.read_sql_query(rules.RUN_CHUNK_SQL, self._db, params=(run_id, last, size))
            if frame.empty:
                return
            self._add_via(frame)
            for column in ("outcome_clock", "via_outcome_clock"):
                frame[column] = frame[column].map(clock_name)
            yield frame
            last = int(frame["id"].iloc[-1])
            if len(frame) < size:
                return

    def status_chunks(self, run_id: str, size: int = 100_000) -> Iterator[pd.DataFrame]:
        """A run's rows in input order, ``size`` at a time, with only what their final
        status is decided from (protocol.STATUS_CHUNK_COLUMNS: rules.RUN_STATUS_SQL's
        columns, and ``via_*`` as ``run_chunks``): for counting final statuses."""
        import pandas as pd  # noqa: PLC0415 - not needed to send

        last = 0
        while True:
            cursor = self._db.execute(rules.RUN_STATUS_SQL, (run_id, last, size))
            found = cursor.fetchall()
            if not found:
                return
            frame = pd.DataFrame.from_records(
                found, columns=[column[0] for column in cursor.description])
            self._add_via(frame)
            yield frame
            last = int(found[-1][0])
            if len(found) < size:
                return

    def _add_via(self, frame: pd.DataFrame) -> None:
        """Fill the ``via_*`` columns; looked up only for the rows that may follow a send
        (usually few: a run's rows mostly speak for themselves)."""
        for column in rules.VIA_COLUMNS:
            frame[f"via_{column}"] = None
        status = frame["status"]
        wanted = frame["key"].notna() & (
            status.isin(["pending", "failed", "already_sent", "held"])
            | ((status == "accepted") & (frame["outcome"] == "failed")))
        if not wanted.any():
            return
        ids = frame.loc[wanted, "id"].tolist()
        found: dict[int, tuple[Any, ...]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row_id, *values in self._db.execute(
                    rules.VIA_SQL.format(marks=marks), chunk):
                found[row_id] = tuple(values)
        if not found:
            return
        position = frame["id"].map(lambda i: i in found)
        values = [found[i] for i in frame.loc[position, "id"]]
        for n, column in enumerate(rules.VIA_COLUMNS):
            frame.loc[position, f"via_{column}"] = [v[n] for v in values]

    # -- frames for reconcile and report -------------------------------------------------

    def frame(self, run_id: str | None = None, *, columns: str = "*") -> pd.DataFrame:
        """Rows (of one run, or of every run) as a DataFrame, in input order."""
        import pandas as pd  # noqa: PLC0415 - not needed to send

        where, params = ("WHERE run_id=?", (run_id,)) if run_id else ("", ())
        frame = pd.read_sql_query(
            f"SELECT {columns} FROM rows {where} ORDER BY id",  # noqa: S608 - no input in the SQL
            self._db, params=params,
        )
        if "outcome_clock" in frame:
            frame["outcome_clock"] = frame["outcome_clock"].map(clock_name)
        return frame
