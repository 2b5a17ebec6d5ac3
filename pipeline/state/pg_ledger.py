"""The ledger on PostgreSQL (``state.url``): the same ``StateStore`` as the SQLite ``Ledger``.

``PgLedger`` runs the SQLite ledger's own statements (rows.py, runs.py, outcomes.py,
rules.py) through ``PgSession`` (pg_session.py), which gives a psycopg 3 connection the call surface
the ledger uses (``execute``, ``executemany``) and rewrites SQLite's dialect where it
differs (``?`` placeholders, ``INDEXED BY`` hints, ``IS NOT`` between values, ``temp.``
names); the few statements PostgreSQL needs written differently (upserts, a grouping
SQLite allows with bare columns, the insertion order of runs) are methods here. So the
two backends cannot drift apart: one set of rules, checked by the same tests.

Guarantees, as with SQLite:

- a row is ``sending`` in a committed transaction before its request leaves: the
  session runs with ``synchronous_commit=on`` (postgres.connect), so COMMIT returns
  only when the WAL is flushed on the server;
- one sending run per account: ``lock`` takes a session-level advisory lock per
  account the run may send for (``pg_try_advisory_lock``), keyed by the account as the
  ledger key spells it (NFC, records.row_key): every account of ``api.accounts``, or
  the one account, in sorted order. So two configs naming the same account (another
  order of ``api.accounts``, one clinic of a several-clinic config, another Unicode
  form of its name) take the same lock. A second run on an account, on any
  host, is refused (StateError, exit 2) naming the holder from ``run_locks`` (host,
  pid, run id). A lock rather than row claims: the scan decides ``already_sent`` and
  ``held`` from what earlier runs did, and that decision is only sound if no other run
  of the account is sending meanwhile; a lock keeps the SQLite semantics exactly and
  costs nothing per row. The lock belongs to the database session, so a worker killed
  with ``kill -9`` (or a lost network) loses it when the server drops the session;
  the next run of the account, on any host, takes it and ``recover`` turns that
  worker's ``sending`` rows into ``ambiguous``;
- the database going away mid-run is RunAborted (exit 3): the requests in flight stay
  ``sending`` in the database, and the next run recovers them as ambiguous;
- a transaction PostgreSQL aborts for a conflict with another process's (a deadlock,
  40P01: a run's send and another clinic's match both bump ``runs.rev``, the send's
  and the match's statements each after the rows they write; a serialization failure,
  40001) runs again from its start, a few
  times with backoff (pg_session.py ``retrying``): every write method here is one
  transaction with no effect outside the database, and the send's requests leave only
  after ``apply`` returns. A conflict that persists is RunAborted (exit 3), as above.

Over 600 lines because the statements PostgreSQL needs written its own way (among them
the join rules' steps PostgreSQL plans badly as SQLite spells them, and the mirror's
COPY), the per-account run locks, the pipelined commit of a send wave and the reads
ahead on a second connection sit next to the SQLite ledger's rules they mirror.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, cast

from pipeline.errors import RunAborted, StateError
from pipeline.state import rules
from pipeline.state.pg_session import PgSession, lock_key, retried
from pipeline.state.postgres import open_state, where
from pipeline.state.records import (
    Attempt,
    Earlier,
    EventRecord,
    NewRow,
    RunInfoChanges,
    RunRecord,
    RunState,
    utcnow,
)
from pipeline.state.rows import ADOPT_KEY_SQL
from pipeline.state.runs import WRITE_OFF_SQL
from pipeline.state.sqlite import Ledger

if TYPE_CHECKING:
    import sqlite3

    import pandas as pd

# Key of the transaction lock that serialises match_outcomes across processes.
_MATCH_LOCK: Final = 0x746E6D6174636800  # "tnmatch"

# add_events: the records COPYed into a table of the transaction, then kept where new.
_EVENT_COLUMNS: Final = ("event_id, kind, job_id, task_note_id, created, emr_note_id,"
                         " failure_reason, reason_codes, ekey, line, outcome_at, outcome_clock,"
                         " account")
_EVENTS_IN_SQL: Final = (
    "CREATE TEMP TABLE events_in (n bigint, event_id text, kind text, job_id text,"
    " task_note_id text, created text, emr_note_id text, failure_reason text,"
    " reason_codes text, ekey bytea, line bigint, outcome_at text, outcome_clock text,"
    " account text) ON COMMIT DROP")
_COPY_EVENTS_IN_SQL: Final = f"COPY events_in (n, {_EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_EVENTS_IN_TYPES: Final = ("bigint", "text", "text", "text", "text", "text", "text", "text",
                           "text", "bytea", "bigint", "text", "text", "text")
_EVENTS_FROM_IN_SQL: Final = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS}"  # noqa: S608 - constants
    " FROM events_in ORDER BY n ON CONFLICT DO NOTHING")
# add_rows: a batch of new rows, COPYed in input order.
_COPY_ROWS_SQL: Final = ("COPY rows (run_id, file_no, line, emr_task_id, key, status, error,"
                         " ref_id, passthrough, account) FROM STDIN (FORMAT BINARY)")
_ROWS_IN_TYPES: Final = ("text", "bigint", "bigint", "text", "bytea", "text", "text", "bigint",
                         "text", "text")
_SINK_EVENTS_AFTER_SQL: Final = (
    "SELECT seq, body, verdict, to_char(received_at AT TIME ZONE 'UTC',"
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM sink_events s"
    " WHERE seq > %s AND seq <= %s"
    " AND NOT EXISTS (SELECT 1 FROM sink_premirrored p WHERE p.seq = s.seq)"
    " ORDER BY seq LIMIT %s")


class PgLedger(Ledger):
    """The ledger in the PostgreSQL database at ``url`` (module docstring), for the runs
    of ``account`` (whose run lock ``lock`` takes). Not thread-safe: one caller at a time.

    Raises StateError (exit 2, one line, never the password) if the database cannot be
    reached or its schema is newer than this tasknotes.
    """

    # Each commit is a round trip to the server: the submit stage gathers its waves
    # (submit.GATHER_S) so that one commit serves several answers.
    remote_commits: Final = True

    def __init__(self, url: str, account: str, accounts: Sequence[str] = (), *,
                 clock: Callable[[], str] = utcnow) -> None:
        """``clock``: the time the ledger writes (ISO 8601 UTC, as ``utcnow``), as
        ``Ledger``'s."""
        self.url = url
        self.account = account
        self.lock_names = lock_names(accounts or (account,))
        self.path = Path(f"PostgreSQL {where(url)}")
        self._clock = clock
        self._lock_fd = None
        self._locked = False
        self._conn = open_state(url, application="tasknotes")
        self._pg = PgSession(self._conn, url)
        self._db = cast("sqlite3.Connection", self._pg)  # the surface the statements use

    def reader(self) -> PgLedger:
        """A second connection to the same database (the send reads pending rows on it).

        Opened once the run is under way (its record and rows are written): a database
        gone by then is RunAborted (exit 3, as when it goes while sending), not the
        StateError (exit 2) of one that could not be reached before anything started.
        """
        try:
            return PgLedger(self.url, self.account, self.lock_names)
        except StateError as exc:
            raise RunAborted(f"{exc}; the run stops here: its rows not sent stay pending "
                             "for the next run") from None

    @contextlib.contextmanager
    def events_writer(self) -> Iterator[PgLedger]:
        """A second connection to the same database while the block runs, for
        ``add_events`` on another thread while this session reads ``sink_events``
        (ingest_postgres). Opened once the reconcile is under way: a database gone by
        then is RunAborted (exit 3), as with ``reader``."""
        writer = self.reader()
        try:
            yield writer
        finally:
            writer.close()

    def close(self) -> None:
        """Close the session; the run lock (held by the session) goes with it."""
        with contextlib.suppress(Exception):
            self._conn.close()
        self._locked = False

    @contextlib.contextmanager
    def trace(self, out: IO[str]) -> Iterator[None]:
        """While the block runs, write libpq's trace of this session's protocol messages to
        ``out`` (a real file: libpq writes to its descriptor; PostgreSQL's ``PQtrace``),
        without timestamps: one line per message, ``F`` sent by the client, ``B`` by the
        server. A diagnostic of what a step costs: each ``F ... Sync`` is one round trip
        that waits for the server. The statements' parameters appear in it (keys, task
        and job ids; the ledger holds no note text). Needs libpq 14 or later."""
        from psycopg import pq

        pgconn = self._conn.pgconn
        pgconn.trace(out.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield
        finally:
            pgconn.untrace()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (a savepoint inside another); psycopg's errors as the package's
        (PgSession.errors). An outermost one that commits is counted (``commits``)."""
        outermost = self._pg.idle()
        with self._pg.errors(), self._conn.transaction():
            yield
        if outermost:  # what retrying must not run again (pg_session.PgSession.retrying)
            self._pg.commits += 1

    def synchronous(self) -> str:
        """The session's ``synchronous_commit`` ("on": a commit waits for the WAL flush)."""
        row = self._pg.execute("SHOW synchronous_commit").fetchone()
        return str(row[0]) if row else "?"

    # -- the run lock --------------------------------------------------------------------

    def lock(self, holder: str | None = None) -> None:
        """Hold the run lock of every account of this store (``lock_names``, in order), or
        StateError naming the holder of the first one held elsewhere (none kept then).
        ``holder``: what holds it, for that message until a run records its id
        (``start_run``): "run <id>", or e.g. "tasknotes migrate-state of <file>"."""
        taken: list[str] = []
        for name in self.lock_names:
            got = self._pg.execute("SELECT pg_try_advisory_lock(?)",
                                   (lock_key(name),)).fetchone()
            if got and got[0]:
                taken.append(name)
                continue
            for mine in taken:
                self._pg.execute("SELECT pg_advisory_unlock(?)", (lock_key(mine),))
            held = self._pg.execute(
                "SELECT host, pid, run_id, since, holder FROM run_locks WHERE account = ?",
                (name,)).fetchone()
            what = (f"run {held[2]}" if held is not None and held[2]
                    else held[4] if held is not None and held[4] else "run (starting)")
            who = ("pid ?" if held is None else
                   f"pid {held[1]} on host {held[0]}, {what}, "
                   f"since {held[3]:%Y-%m-%dT%H:%M:%SZ}")
            raise StateError(f"another tasknotes run ({who}) holds the run lock of account "
                             f"{name} in {self.path}")
        self._locked = True
        with self._transaction():
            self._pg.executemany(
                "INSERT INTO run_locks (account, backend_pid, host, pid, run_id, since, holder)"
                " VALUES (?, pg_backend_pid(), ?, ?, NULL, now(), ?) ON CONFLICT (account) DO"
                " UPDATE SET backend_pid = excluded.backend_pid, host = excluded.host,"
                " pid = excluded.pid, run_id = NULL, since = now(), holder = excluded.holder",
                [(name, socket.gethostname(), os.getpid(), holder)
                 for name in self.lock_names])

    def _holder_backend(self, account: str) -> int | None:
        """The server pid of the session holding ``account``'s run lock, or None."""
        key = lock_key(account) & 0xFFFFFFFFFFFFFFFF
        row = self._pg.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = ?::bigint::oid AND objid = ?::bigint::oid AND objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF)).fetchone()
        return None if row is None else int(row[0])

    def lock_holder(self) -> int | None:
        """The pid (on its host) of the run holding a run lock of this store's accounts,
        or None if no run is; -1 when the holder has not recorded itself yet."""
        if self._locked:
            return os.getpid()
        for name in self.lock_names:
            backend = self._holder_backend(name)
            if backend is None:
                continue
            row = self._pg.execute(
                "SELECT pid FROM run_locks WHERE account = ? AND backend_pid = ?",
                (name, backend)).fetchone()
            return -1 if row is None else int(row[0])
        return None

    @retried("recovering crashed runs")
    def recover(self) -> int:
        """After a crash: the rows left ``sending`` by runs that are provably dead become
        ``ambiguous``, and those runs left ``running`` ``crashed``; returns how many rows.

        A run is dead when this store holds the run lock of one of its accounts: a live
        run would hold it. All its ``sending`` rows are then ambiguous, whichever account
        each row was for (only their own run sends rows)."""
        assert self._locked, "recover() only under the run lock"
        with self._transaction():
            found = self._pg.execute(
                "SELECT run_id, account FROM runs WHERE state = 'running' UNION SELECT"
                " u.run_id, u.account FROM rows r JOIN runs u ON u.run_id = r.run_id"
                " WHERE r.status = 'sending'").fetchall()
            mine = set(self.lock_names)
            dead = [str(run) for run, label in found if mine & set(label_locks(str(label)))]
            if not dead:
                return 0
            changed = self._changed(
                "UPDATE rows SET status='ambiguous', error=? WHERE status='sending'"
                " AND run_id = ANY(?)",
                ("the process stopped while this request was in flight", dead))
            self._pg.execute("UPDATE runs SET state='crashed' WHERE state='running'"
                             " AND run_id = ANY(?)", (dead,))
        return int(changed)

    @retried("recording a run's start")
    def start_run(self, run_id: str, account: str, fingerprint: str,
                  info: RunInfoChanges) -> None:
        """As ``Ledger.start_run``; the run lock's record names the run from now on."""
        super().start_run(run_id, account, fingerprint, info)
        if self._locked:
            with self._transaction():
                self._pg.execute("UPDATE run_locks SET run_id = ? WHERE account = ANY(?)"
                                 " AND backend_pid = pg_backend_pid()",
                                 (run_id, list(self.lock_names)))

    @retried("recording a run's end")
    def finish_run(self, run_id: str, state: RunState, info: RunInfoChanges) -> None:
        """As ``Ledger.finish_run``; run again from its start on a conflict (as every
        transaction of this store: pg_session.PgSession.retrying)."""
        super().finish_run(run_id, state, info)

    @retried("updating a run's record")
    def update_run_info(self, run_id: str, info: RunInfoChanges) -> None:
        """As ``Ledger.update_run_info`` (it reads the record first: a try reads it again)."""
        super().update_run_info(run_id, info)

    @retried("forgetting a refused run's rows")
    def refuse_run(self, run_id: str, info: RunInfoChanges) -> int:
        """As ``Ledger.refuse_run``."""
        return super().refuse_run(run_id, info)

    @retried("writing off rows")
    def write_off(self, run_id: str, at: str) -> int:
        """As ``Ledger.write_off`` (runs.py), its UPDATE bumping ``runs.rev`` (``bumping``)."""
        with self._transaction():  # the date shows in the run's own report only
            changed = self._changed(WRITE_OFF_SQL, (at, run_id), others=False)
        if changed:
            self.update_run_info(run_id, {"report_final": False})
        return int(changed)

    @retried("taking former names' keys")
    def adopt_keys(self, run_id: str, pairs: Sequence[tuple[bytes, bytes]]) -> int:
        """As ``Ledger.adopt_keys``, each UPDATE bumping ``runs.rev`` (``bumping``)."""
        if not pairs:
            return 0
        with self._transaction():
            return sum(self._changed(ADOPT_KEY_SQL, (new, old, run_id)) for old, new in pairs)

    def _changed(self, update: str, params: Sequence[Any] = (), *, others: bool = True) -> int:
        """Run ``update`` (an UPDATE of rows) through ``bumping``; how many rows changed."""
        row = self._pg.execute(bumping(update, others=others), params).fetchone()
        return int(row[0]) if row is not None else 0

    def runs_in_progress(self) -> list[str]:
        """Runs (of any account) left ``running`` whose account's run lock is held now."""
        found = self._pg.execute("SELECT run_id, account FROM runs WHERE state='running'"
                                 " ORDER BY started_at, run_id").fetchall()
        live = {a for a in {a for _, a in found} if self._live(a)}
        return [r for r, a in found if a in live]

    def _live(self, label: str) -> bool:
        """Whether the run whose ``runs.account`` is ``label`` may be alive: some run lock
        of its accounts is held (by this store, or by another session)."""
        names = label_locks(label)
        if self._locked and set(names) & set(self.lock_names):
            return True
        return any(self._holder_backend(name) is not None for name in names)

    def effective_state(self, record: RunRecord) -> RunState:
        """A run record's state as it is now: ``running`` only while its account's run lock
        is held (the holder's session lives)."""
        if record.state == "running" and not self._live(record.account):
            return "crashed"
        return record.state

    # -- statements PostgreSQL needs written its own way ----------------------------------

    @retried("recording an input file")
    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None:
        """As ``Ledger.add_file``."""
        with self._transaction():
            self._pg.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, file_no)"
                " DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,"
                " size = excluded.size, header = excluded.header",
                (run_id, file_no, path, sha256, size, json.dumps(list(header))))

    def earlier(self, run_id: str, keys: Sequence[bytes]) -> dict[bytes, Earlier]:
        """As ``Ledger.earlier``, in one statement per 20,000 keys (an array, probed in
        rows_key) rather than one per 500 (SQLite's limit on a statement's parameters):
        a scan of 8,000 new rows asked 16 round trips of the server."""
        found: dict[bytes, Earlier] = {}
        for start in range(0, len(keys), 20_000):
            # %b: the keys go in binary (as bytes), not hex-escaped one by one as text
            with self._pg.errors():
                got: list[tuple[Any, ...]] = self._conn.execute(
                    "SELECT key, id, run_id, status, job_id, outcome FROM rows"
                    " WHERE key = ANY(%b) AND run_id <> %s ORDER BY id",
                    (list(keys[start:start + 20_000]), run_id)).fetchall()
            for key, *rest in got:
                candidate = Earlier(*rest)
                if rules.rank(candidate) > rules.rank(found.get(key)):
                    found[key] = candidate
        return found

    @retried("recording input rows")
    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        """As ``Ledger.add_rows``: one binary COPY a batch, in input order (so the rows'
        ids follow it, as SQLite's do). An INSERT from arrays of the batch's columns cost
        twice the server's time and the client's adaptation of nine lists."""
        batch = list(rows)
        if not batch:
            return
        with (self._transaction(), self._conn.cursor() as cur,
              cur.copy(_COPY_ROWS_SQL) as copy):
            copy.set_types(_ROWS_IN_TYPES)
            for r in batch:
                copy.write_row((
                    run_id, r.file_no, r.line, r.emr_task_id, r.key, r.status, r.error,
                    r.ref_id,
                    json.dumps(r.passthrough, ensure_ascii=False) if r.passthrough else None,
                    r.account))

    def mark_sending(self, row_ids: Sequence[int]) -> None:
        """As ``Ledger.mark_sending``, in one statement (bumping ``runs.rev``: ``bumping``)."""
        self._pg.execute(bumping("UPDATE rows SET status='sending', attempts=attempts+1,"
                                 " submitted_at=? WHERE id = ANY(?::bigint[])"),
                         (self._clock(), list(row_ids)))

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        """As ``Ledger.record_attempts``, in one statement (bumping ``runs.rev``)."""
        self._pg.execute(bumping(
            "UPDATE rows SET status=u.status, http_status=u.http_status,"
            " task_note_id=u.task_note_id, job_id=u.job_id, error=u.error,"
            " answered_at=u.answered_at FROM unnest(?::bigint[], ?::text[], ?::bigint[],"
            " ?::text[], ?::text[], ?::text[], ?::text[]) AS u(id, status, http_status,"
            " task_note_id, job_id, error, answered_at) WHERE rows.id = u.id"),
            [[getattr(a, f) for a in attempts] for f in (
                "row_id", "status", "http_status", "task_note_id", "job_id", "error",
                "answered_at")])

    @retried("a send's group commit")
    def apply(self, sending: Sequence[int], attempts: Sequence[Attempt]) -> None:
        """As ``Ledger.apply``: one group commit of the send (results first, then the rows
        about to be sent), in one round trip to the server.

        The two statements go out in psycopg's pipeline mode with one Sync after them. On
        this autocommit session, what runs between two Syncs is one implicit transaction
        (PostgreSQL's protocol docs, "Pipelining"): committed at the Sync, WAL flushed
        (``synchronous_commit=on``) before the server answers it, or rolled back whole if
        a statement fails. The pipeline's exit waits for that answer, so a row is
        ``sending`` durably before this returns and its request leaves, as with SQLite;
        an explicit BEGIN/COMMIT would cost three more round trips per commit, each a
        wait for the server's process to be scheduled on a busy machine
        (bench/state.py). Raises StateError, or RunAborted if the connection is lost
        (nothing of the batch then counts as sent: the rows stay ``pending``).

        An error the server reports at the Sync itself (the implicit COMMIT: a deferred
        trigger, or a serialization failure had a session run SERIALIZABLE) leaves
        psycopg's pipeline unusable, its answer lost: the session is closed and the
        group commit is RunAborted (exit 3), as when the database goes away. No request
        of its rows has left; the rows it would have recorded stay ``sending``, and the
        next run holds them as ambiguous.
        """
        if not sending and not attempts:
            return
        from psycopg import pq

        try:
            with self._pg.errors(), self._conn.pipeline():
                if attempts:
                    self.record_attempts(attempts)
                if sending:
                    self.mark_sending(sending)
        except StateError as exc:
            if self._conn.closed or self._conn.pgconn.pipeline_status == pq.PipelineStatus.OFF:
                raise
            self.close()  # stuck in pipeline mode: nothing more can be asked of it
            raise RunAborted(f"{exc}; the answer to a send's group commit was lost, so the "
                             "connection was closed: requests in flight are ambiguous until "
                             "the next run") from None

    def latest_run(self) -> str | None:
        """The id of the run started last, or None if there is none."""
        found = self._pg.execute(
            "SELECT run_id FROM runs ORDER BY started_at DESC, seq DESC LIMIT 1").fetchone()
        return None if found is None else str(found[0])

    def _match_stamp(self) -> str:
        """As ``Ledger._match_stamp`` (PostgreSQL has no rowid: events only ever grow, so
        their count stands for the last one stored)."""
        found = self._pg.execute(
            "SELECT (SELECT MAX(id) FROM rows), (SELECT COUNT(*) FROM events),"
            " (SELECT COUNT(*) FROM runs), (SELECT COALESCE(SUM(rev), 0) FROM runs)"
        ).fetchone()
        return ",".join(str(v) for v in found or ())

    def sink_position(self) -> tuple[int, str]:
        """How far ``sink_events`` has been mirrored: (its last ``seq`` read, "")."""
        found = self._pg.execute("SELECT value FROM meta WHERE key = 'sink_seq'").fetchone()
        return (int(found[0]) if found else 0), ""

    @retried("mirroring events")
    def add_events(self, events: Sequence[EventRecord], tally: dict[str, int], *,
                   offset: int, head: str, count_repeats: bool = True,
                   others: Sequence[tuple[str, str]] = ()) -> int:
        """As ``Ledger.add_events``; ``offset`` is the last ``sink_events.seq`` read; each of
        ``others`` counted under its name (``sink_events`` holds an event id once, and
        each is read once).

        The records go to the server by binary COPY into a temporary table of this
        transaction (dropped at its commit), then into ``events`` by one INSERT ... ON
        CONFLICT DO NOTHING in the order given (``n``): the first of two records with
        one event id is the one kept, as with SQLite's INSERT OR IGNORE. COPY sends each
        value as it is (no text to build or parse: a tenth of the client's time of an
        INSERT from arrays)."""
        if others:
            tally = dict(tally)
            for _, name in others:
                tally[name] = tally.get(name, 0) + 1
        with self._transaction():
            added = 0
            if events:
                added = self._copy_events(events)
            if count_repeats:
                tally = {**tally, "(repeated)": tally.get("(repeated)", 0) + len(events) - added}
            self._pg.executemany(
                "INSERT INTO event_tally VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET count = event_tally.count + excluded.count",
                [(k, v) for k, v in tally.items() if v])
            self._pg.execute(
                "INSERT INTO meta VALUES ('sink_seq', ?) ON CONFLICT (key) DO UPDATE"
                " SET value = GREATEST(meta.value::bigint, excluded.value::bigint)::text",
                (str(offset),))
        return added

    def _copy_events(self, events: Sequence[EventRecord]) -> int:
        """Store ``events`` (inside ``add_events``'s transaction); returns how many were new."""
        with self._conn.cursor() as cur:
            cur.execute(_EVENTS_IN_SQL)
            with cur.copy(_COPY_EVENTS_IN_SQL) as copy:
                copy.set_types(_EVENTS_IN_TYPES)
                for n, record in enumerate(events):
                    copy.write_row((n, *record))
            cur.execute(_EVENTS_FROM_IN_SQL)
            added = max(cur.rowcount, 0)
            cur.execute("DROP TABLE pg_temp.events_in")  # gone even inside an outer transaction
            return added

    @retried("reading sink events")
    def sink_events_after(self, seq: int, limit: int
                          ) -> list[tuple[int, bytes, str, str]]:
        """Up to ``limit`` stored sink events after ``seq``, in ``seq`` order, every one of
        them committed: (seq, body, verdict, received_at as ISO 8601 UTC with ms). The
        events a migrated ledger had mirrored already (``sink_premirrored``, migration 9)
        are left out.

        Waits for the inserts in progress first (a SHARE lock, released at once), so no
        event with a smaller ``seq`` can still commit after this read: nothing is skipped.
        """
        with self._transaction():
            self._pg.execute("LOCK TABLE sink_events IN SHARE MODE")
            top = self._pg.execute("SELECT max(seq) FROM sink_events").fetchone()
        upper = int(top[0]) if top and top[0] is not None else 0
        # Binary results: the bodies as they are (no hex to encode and decode), the time
        # formatted by the server (to_char's MS truncates to the millisecond).
        with self._pg.errors(), self._conn.cursor(binary=True) as cur:
            cur.execute(_SINK_EVENTS_AFTER_SQL, (seq, upper, limit))
            return cast("list[tuple[int, bytes, str, str]]", cur.fetchall())

    @retried("matching outcomes")
    def match_outcomes(self) -> int:
        """As ``Ledger.match_outcomes`` (the join rules of rules.py), one process at a time."""
        pg = self._pg
        with self._transaction():
            pg.execute("SELECT pg_advisory_xact_lock(?)", (_MATCH_LOCK,))
            # Hash tables of every row and event: in memory, not spilled in batches to disk.
            pg.execute("SET LOCAL work_mem = '64MB'")
            for statement in _match_sql():
                pg.execute(statement)
            if pg.execute(rules.ANY_DOUBTFUL_SQL).fetchone() is not None:
                pg.execute(rules.EVIDENCE_SQL)
            changed = self._changed(_CLEAR_OUTCOMES_SQL)
            changed += self._write_outcomes()
            for statement in _ORPHANS_SQL:
                pg.execute(statement)
            pg.execute("DROP TABLE pg_temp.matched")
            pg.execute("DROP TABLE pg_temp.claimed")
        return changed

    def _write_outcomes(self) -> int:
        """Write the outcomes of ``pg_temp.matched`` that differ from the rows' (inside
        ``match_outcomes``'s transaction, as rules.WRITE_OUTCOMES_SQL); returns rows
        changed. The runs to bump (``bumping``) are found by one set-based statement of
        their own: a hash join of rows on key where many rows moved, rather than a probe of
        rows_key per changed row."""
        pg = self._pg
        pg.execute(_CHANGED_OUTCOMES_SQL)
        written = max(pg.execute(rules.WRITE_CHANGED_SQL).rowcount, 0)
        pg.execute(_BUMP_CHANGED_SQL)
        pg.execute("DROP TABLE pg_temp.changed")
        return written

    def run_chunks(self, run_id: str, size: int = 20_000) -> Iterator[pd.DataFrame]:
        """As ``Ledger.run_chunks``. After a full first chunk, each next chunk's rows are
        read on a second connection (by a thread) while the caller works on the one
        given: the server's reading of one overlaps the client's work on the other (a
        fifth of reading back 1M rows). Each chunk is one statement, as before."""
        names, rows = _chunk_rows(self._pg, run_id, 0, size)
        if len(rows) < size:
            if rows:
                yield self._chunk_frame(names, rows)
            return
        ahead = self.reader()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="tasknotes-chunks") as pool:
                while rows:
                    last = int(rows[-1][names.index("id")])
                    coming = (pool.submit(_chunk_rows, ahead._pg, run_id, last, size)
                              if len(rows) == size else None)
                    yield self._chunk_frame(names, rows)
                    names, rows = coming.result() if coming is not None else (names, [])
        finally:
            ahead.close()

    def _chunk_frame(self, names: list[str], rows: list[tuple[Any, ...]]) -> pd.DataFrame:
        """One chunk of ``run_chunks`` as a DataFrame, with its ``via_*`` columns."""
        import pandas as pd

        frame = pd.DataFrame.from_records(rows, columns=names, coerce_float=True)
        self._add_via(frame)
        return frame

    def frame(self, run_id: str | None = None, *, columns: str = "*") -> pd.DataFrame:
        """Rows (of one run, or of every run) as a DataFrame, in input order."""
        where_, params = ("WHERE run_id=?", (run_id,)) if run_id else ("", ())
        return self._frame(f"SELECT {columns} FROM rows {where_} ORDER BY id",  # noqa: S608
                           params)

    def _frame(self, sql: str, params: Sequence[Any]) -> pd.DataFrame:
        import pandas as pd

        cur = self._pg.execute(sql, params)
        names = [c.name for c in cur.description or ()]
        return pd.DataFrame.from_records(cur.fetchall(), columns=names, coerce_float=True)


def _chunk_rows(pg: PgSession, run_id: str, last: int, size: int
                ) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and rows of one chunk of ``run_chunks`` (rules.RUN_CHUNK_SQL)."""
    cur = pg.execute(rules.RUN_CHUNK_SQL, (run_id, last, size))
    return [c.name for c in cur.description or ()], cur.fetchall()


def _match_sql() -> tuple[str, ...]:
    """rules.MATCH_SQL, with the one-event rows chosen without SQLite's bare columns, and
    the temporary tables ANALYZEd once filled.

    A group of one row is that row: each column's min() is its value (NULL too), read
    in one grouping pass. ``row_id IN (SELECT ... HAVING COUNT(*) = 1)`` was planned
    for the 1,000 rows PostgreSQL assumes a HAVING leaves, as a probe of claimed_row
    per row (1 s of 200,000 rows). A temporary table has no statistics until ANALYZEd
    (autovacuum never sees it): without them the later joins are planned on guesses."""
    columns = ("kind", "event_id", "emr_note_id", "failure_reason", "reason_codes",
               "outcome_at", "settled_by", "outcome_clock")
    picked = ", ".join(f"min({c}) AS {'outcome' if c == 'kind' else c}" for c in columns)
    one = ("CREATE TEMP TABLE matched AS SELECT row_id, "  # noqa: S608 - constants
           f"{picked} FROM claimed GROUP BY row_id HAVING COUNT(*) = 1")
    statements = list(rules.MATCH_SQL)
    assert "HAVING COUNT(*) = 1" in statements[3]
    assert statements[2].startswith("INSERT INTO claimed")
    assert statements[5].startswith("INSERT INTO matched")
    return (*statements[:3], "ANALYZE pg_temp.claimed", one, *statements[4:6],
            "ANALYZE pg_temp.matched", *statements[6:])


def bumping(update: str, *, others: bool = True) -> str:
    """``update``, an UPDATE of ``rows`` (``?`` placeholders, no RETURNING), as one statement
    that also bumps ``runs.rev`` of every run its changed rows show in, and whose one result
    row is ``(count of rows changed,)``. ``others=False``: the rows' own runs only, for a
    change no other run's report shows (a write-off date), as SQLite's triggers do.

    ``runs.rev`` counts changes to what a run's report shows (schema.py, TRIGGERS): a
    change to a row bumps the row's run, every other run holding a row of the same key
    (rule 5 of rules.py: a report follows the later send of its note) and every other
    run with a row referring to it (``ref_id``: a held or already-sent row, whose key
    may differ: ``formerly``, NFC; found by a probe of rows_ref). SQLite keeps
    it by triggers; on PostgreSQL every UPDATE of rows in this module bumps by itself,
    through this function or, for the join rules' write of outcomes, by the set-based
    ``_BUMP_CHANGED_SQL`` (postgres.py, migrations 10 and 12): a trigger over transition tables
    made the server fill them and plan two more statements for each UPDATE of a send's
    group commit, most of its work there. Each run is bumped once per statement. The
    other runs of each changed row's key are found by a probe of rows_key per row
    (``OFFSET 0`` keeps the probe a subquery of its own, not a scan of rows), after the
    rows are written: the same lock order as the trigger had (rows, then runs), which
    the deadlock tests of tests/test_pg_conflicts.py rely on. Bumping a run a change did
    not show in costs one extra rewrite of its report; missing one would leave it stale.
    """
    followed = """
        UNION
        SELECT f.run_id FROM changed c CROSS JOIN LATERAL (
            SELECT r.run_id FROM rows r WHERE r.key = c.key AND r.run_id <> c.run_id
            OFFSET 0) f
         WHERE c.key IS NOT NULL
        UNION
        SELECT l.run_id FROM changed c CROSS JOIN LATERAL (
            SELECT r.run_id FROM rows r WHERE r.ref_id = c.id AND r.run_id <> c.run_id
            OFFSET 0) l""" if others else ""
    return f"""WITH changed AS ({update} RETURNING rows.id, rows.run_id, rows.key),
bumped AS (
    UPDATE runs SET rev = rev + 1 WHERE run_id IN (
        SELECT run_id FROM changed{followed}))
SELECT COUNT(*) FROM changed"""  # noqa: S608 - ``update``: one of the package's constants


# ``x NOT IN (SELECT ...)`` is planned by PostgreSQL as a hashed subplan only while the
# subquery's rows fit in work_mem; past that (a million event ids, a million matched rows)
# it is a plain subplan re-read for every outer row: quadratic (reconcile of 1M x 1M was
# still in the orphans statement after 9 minutes). NOT EXISTS is an anti-join; the same
# rows, as neither side is ever NULL (event ids and row ids are keys).
_CLEAR_OUTCOMES_SQL: Final = """
UPDATE rows SET outcome = NULL, event_id = NULL, emr_note_id = NULL, failure_reason = NULL,
       outcome_at = NULL, settled_by = NULL, outcome_clock = NULL
 WHERE outcome IS NOT NULL AND NOT EXISTS (SELECT 1 FROM matched m WHERE m.row_id = rows.id)"""
# rules.WRITE_OUTCOMES_SQL in three steps (``_write_outcomes``): the rows it changes, with
# their new values and whether their outcome moved (what bumps the other runs of their
# key); the write; the bumps (``bumping``'s, found by a join rather than probes):
# every run of a changed row, and every other run holding the key of a moved row, found by
# one join (a hash join of rows on key when many moved, rows_key probes when few).
_CHANGED_OUTCOMES_SQL: Final = """CREATE TEMP TABLE changed AS
SELECT r.id AS row_id, r.run_id, r.key,
       r.outcome IS DISTINCT FROM m.outcome OR r.event_id IS DISTINCT FROM m.event_id
       OR r.emr_note_id IS DISTINCT FROM m.emr_note_id
       OR r.outcome_at IS DISTINCT FROM m.outcome_at
       OR r.outcome_clock IS DISTINCT FROM m.outcome_clock AS moved,
       m.outcome, m.event_id, m.emr_note_id, m.failure_reason, m.outcome_at, m.settled_by,
       m.reason_codes, m.outcome_clock
  FROM matched m JOIN rows r ON r.id = m.row_id
 WHERE r.outcome IS DISTINCT FROM m.outcome OR r.event_id IS DISTINCT FROM m.event_id
       OR r.failure_reason IS DISTINCT FROM m.failure_reason
       OR r.settled_by IS DISTINCT FROM m.settled_by
       OR r.emr_note_id IS DISTINCT FROM m.emr_note_id
       OR r.outcome_at IS DISTINCT FROM m.outcome_at
       OR r.outcome_clock IS DISTINCT FROM m.outcome_clock"""
_BUMP_CHANGED_SQL: Final = """
UPDATE runs SET rev = rev + 1
  FROM (SELECT run_id FROM changed
        UNION
        SELECT o.run_id FROM changed c JOIN rows o ON o.key = c.key
         WHERE c.moved AND c.key IS NOT NULL AND o.run_id <> c.run_id
        UNION
        SELECT o.run_id FROM changed c JOIN rows o ON o.ref_id = c.row_id
         WHERE c.moved AND o.ref_id IS NOT NULL AND o.run_id <> c.run_id) b
 WHERE runs.run_id = b.run_id"""
# The events no row owns (claimed by job or task note id, or settled by evidence) found
# once, by two anti-joins, then counted and the first listed: not an ``owned`` set made
# by a UNION of a million ids (sorted or hashed) and then anti-joined twice (3 s of 1M).
_ORPHANS_SQL: Final = (
    "DELETE FROM orphans",
    """CREATE TEMP TABLE orphaned AS
    SELECT event_id, kind, job_id, created FROM events e
     WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.event_id = e.event_id)
       AND NOT EXISTS (SELECT 1 FROM matched m
                        WHERE m.settled_by = 'evidence' AND m.event_id = e.event_id)""",
    """INSERT INTO meta SELECT 'orphans', COUNT(*)::text FROM orphaned
    ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
    """INSERT INTO orphans SELECT event_id, kind, job_id, created FROM orphaned
     ORDER BY created, event_id LIMIT 50""",
    "DROP TABLE pg_temp.orphaned",
)


def lock_names(accounts: Iterable[str]) -> tuple[str, ...]:
    """The names of the run locks a run takes for ``accounts`` (each account it may send
    for): in NFC, the form the ledger key uses (records.row_key, UAX #15), without
    repeats, sorted, so every run takes its locks in one order."""
    return tuple(sorted({unicodedata.normalize("NFC", a) for a in accounts}))


def label_locks(label: str) -> tuple[str, ...]:
    """The run locks a run recorded with ``runs.account`` = ``label`` holds while alive:
    the label itself (one account) and, for a several-clinic run (its names joined with
    ",", config.ApiConfig.account_id), each name."""
    parts = label.split(",") if "," in label else []
    return lock_names([label, *parts])
