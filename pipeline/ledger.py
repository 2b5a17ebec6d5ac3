"""SQLite state: every input row of every run, what was sent, what came back.

The ledger is the single source of truth for "was this note sent?". It never
holds a note's text: a row is identified across runs by ``key`` =
SHA-256(account, emr_task_id, note). This is the only module that speaks SQL.

Row ``status`` values (the submission statuses of docs/architecture.md, plus how a row that
was never sent ended):

    pending -> sending -> accepted | api_rejected | ambiguous | failed
    rejected        failed validation (reasons in ``error``)
    duplicate       same task id and note as an earlier row of the run (``ref_id``)
    already_sent    an earlier run delivered this key (``ref_id``)
    held            an earlier attempt of this key may have landed; not sent blind

A row is marked ``sending`` and committed before its request leaves; a run
that dies leaves it ``sending`` and the next run (holding the lock, so the
writer is provably gone) turns it into ``ambiguous``.

A full disk: next to the ledger, ``<ledger>.reserve`` holds ``RESERVE_BYTES``
of disk space. When a commit fails for want of space, the reserve is given
back and the WAL folded into the database, so the results of requests in
flight and the end of the run can still be recorded; StorageFull tells the
caller to stop. The reserve is taken again when the ledger is next opened
with room for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import stat
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pipeline.errors import StateError, StorageFull

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
RESERVE_BYTES: Final = 1 << 20
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    state TEXT NOT NULL,            -- running | finished | aborted | crashed | dry_run
    account TEXT NOT NULL,
    config_fingerprint TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}' -- JSON: argv, limit, abort reason, counts, timings
);
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    file_no INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    header TEXT NOT NULL,           -- JSON list of the header names as written
    PRIMARY KEY (run_id, file_no)
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,         -- input order within a run
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    file_no INTEGER NOT NULL,
    line INTEGER NOT NULL,
    emr_task_id TEXT NOT NULL,
    key BLOB,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    task_note_id TEXT,
    job_id TEXT,
    error TEXT,
    ref_id INTEGER,
    submitted_at TEXT,
    answered_at TEXT,
    outcome TEXT,                   -- created | failed | conflict (from reconcile)
    event_id TEXT,
    emr_note_id TEXT,
    failure_reason TEXT,
    outcome_at TEXT,
    settled_by TEXT,                -- job_id | task_note_id | evidence
    passthrough TEXT,               -- JSON list, when input.passthrough names columns
    reason_codes TEXT               -- Cobalt's failure reason codes, ';'-separated
);
-- A mirror of the sink file's task_note.* events (never a note's text: ekey is the hash a
-- ledger key would have), so join rules run in SQL on indexes, not on frames in memory.
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,             -- created | failed
    job_id TEXT,
    task_note_id TEXT,
    created TEXT,
    emr_note_id TEXT,
    failure_reason TEXT,
    reason_codes TEXT,
    ekey BLOB,
    line INTEGER
);
-- task_note events no row owns (the first few, and how many), as of the last match.
CREATE TABLE IF NOT EXISTS orphans (event_id TEXT PRIMARY KEY, kind TEXT, job_id TEXT,
                                    created TEXT);
-- No secondary indexes on events: the joins scan it and probe the rows indexes (random
-- keys in three more B-trees made reading a million events three times slower).
DROP INDEX IF EXISTS events_job;
DROP INDEX IF EXISTS events_task_note;
DROP INDEX IF EXISTS events_ekey;
CREATE TABLE IF NOT EXISTS event_tally (name TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rows_run ON rows (run_id, id);
CREATE INDEX IF NOT EXISTS rows_key ON rows (key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_job ON rows (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_sending ON rows (status) WHERE status = 'sending';
CREATE INDEX IF NOT EXISTS rows_task_note ON rows (task_note_id) WHERE task_note_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_ambiguous ON rows (id) WHERE status = 'ambiguous';
"""
Status = Literal[
    "pending", "sending", "accepted", "api_rejected", "ambiguous", "failed",
    "rejected", "duplicate", "already_sent", "held",
]  # fmt: skip


_second: list[tuple[int, str]] = [(-1, "")]


def _is_full(exc: sqlite3.Error, path: Path) -> bool:
    """Whether a SQLite error means "no space left": SQLITE_FULL, or an I/O error (the
    shared-memory file failing to grow) while the file system has no room left."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return True
    if code != sqlite3.SQLITE_IOERR:
        return False
    try:
        space = os.statvfs(path.parent)
    except OSError:
        return False
    return space.f_bavail * space.f_frsize < 1 << 20


def _private_directory(directory: Path) -> None:
    """Create ``directory`` 0700 (parents too), or warn, naming it, if others may read it."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # the umask may have taken bits from mkdir's mode
        return
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        log.warning("state directory %s is mode %04o: others may read the ledger's "
                    "neighbours; chmod 700 it", directory, mode)


def utcnow() -> str:
    """Now, as the ledger and the reports write time: ISO 8601, UTC, milliseconds.

    Called twice per request; the text up to the second is cached for that second.
    """
    now = time.time()
    second = int(now)
    cached, text = _second[0]
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = (second, text)
    return f"{text}.{int((now - second) * 1000):03d}Z"


def row_key(account: str, emr_task_id: str, note: str, *, nfc: bool = True) -> bytes:
    """The ledger key of a note: the same note for the same task on the same account.

    Task id and note are compared in Unicode NFC (UAX #15), so ``é`` as one code
    point and as ``e`` + U+0301 give one key: the same visible note never lands twice.
    ``nfc=False`` gives the key versions before that gave a note not written in NFC.
    """
    text = f"{account}\x1f{emr_task_id}\x1f{note}"
    if nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True, slots=True)
class NewRow:
    """One input row as first written for a run."""

    file_no: int
    line: int
    emr_task_id: str
    key: bytes | None
    status: Status
    error: str | None = None
    ref_id: int | None = None
    passthrough: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Earlier:
    """What earlier runs did with a key, as far as deciding whether to send it again."""

    row_id: int
    run_id: str
    status: str
    job_id: str | None
    outcome: str | None

    @property
    def delivered(self) -> bool:
        """Cobalt has (or provably had) this note: sending it again would double it."""
        if self.outcome == "created":
            return True
        return self.status == "accepted" and self.outcome not in ("failed",)

    @property
    def maybe_delivered(self) -> bool:
        """An attempt may have landed and nothing has settled it."""
        return self.status in ("ambiguous", "sending") and self.outcome is None


OpenRow = tuple[str, bytes, str | None]  # (run_id, key, since): one row behind an open item


@dataclass(frozen=True, slots=True)
class OpenGroup:
    """Open rows of one kind over every run: how many, how many stale, since when, where."""

    count: int
    stale: int
    oldest: str | None  # ISO 8601 UTC: the earliest submission (or end of run) among them
    run_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of sending one row, as the ledger records it."""

    row_id: int
    status: Status
    http_status: int | None = None
    task_note_id: str | None = None
    job_id: str | None = None
    error: str | None = None
    answered_at: str | None = None


class Ledger:
    """A SQLite ledger file. Not thread-safe: one caller at a time (see Committer)."""

    def __init__(self, path: Path, *, synchronous: str = "full", readonly: bool = False) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._reserve = path.with_name(path.name + ".reserve")
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=10000")
            return
        try:
            _private_directory(path.parent)
            # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files
            # the mode of the database file, whatever the umask.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self._check_version()
        except sqlite3.DatabaseError as exc:
            if _is_full(exc, path):
                raise self._full(exc) from None
            raise StateError(f"ledger {path} cannot be used: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full(exc) from None
            raise StateError(f"ledger {path} cannot be created: {exc.strerror}") from None
        for side in ("-wal", "-shm"):  # left looser by an older version, perhaps
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{side}", 0o600)
        self._take_reserve()

    @classmethod
    def existing(cls, path: Path) -> Ledger | None:
        """The ledger at ``path`` opened read-only, or None if there is none yet."""
        if not path.exists():
            return None
        try:
            return cls(path, readonly=True)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"ledger {path} cannot be read: {exc}") from None

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_version(self) -> None:
        if sqlite3.sqlite_version_info < (3, 33):
            raise StateError(f"SQLite {sqlite3.sqlite_version} is too old: 3.33 or newer is needed")
        found = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if found is not None and int(found[0]) == 1:  # v2 added the events mirror and this:
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
            if "reason_codes" not in columns:
                self._db.execute("ALTER TABLE rows ADD COLUMN reason_codes TEXT")
        if found is None or int(found[0]) == 1:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                             (SCHEMA_VERSION,))
        elif int(found[0]) != SCHEMA_VERSION:
            raise StateError(f"ledger {self.path} has schema {found[0]}, expected {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; StorageFull (naming the file) if the disk is full."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if not _is_full(exc, self.path):
                raise
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            self._make_room()
            raise self._full(exc) from None

    def _full(self, exc: BaseException) -> StorageFull:
        return StorageFull(f"disk full: the ledger {self.path} cannot be written "
                           f"({getattr(exc, 'strerror', None) or exc})")

    def _take_reserve(self) -> None:
        """Hold RESERVE_BYTES of disk space in ``<ledger>.reserve`` (0600), if there is room."""
        if self._reserve.exists():
            return
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            self._reserve.unlink(missing_ok=True)  # no room for it: do without
        finally:
            os.close(fd)

    def _make_room(self) -> None:
        """After a full disk: give the reserve back, then fold the WAL into the database
        and truncate it (best effort: the checkpoint may fail for want of room too,
        leaving the WAL, and so the ledger, as it was)."""
        self._reserve.unlink(missing_ok=True)
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA busy_timeout=200")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                self._db.execute("PRAGMA busy_timeout=10000")

    # -- runs ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold the run lock: one sending run per ledger, or StateError naming the holder."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock_briefly(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"another tasknotes run (pid {holder}) is using the ledger {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def lock_holder(self) -> int | None:
        """The pid of the run holding the run lock (a run in progress), or None if no run is.

        Probes the lock shared and lets go at once; a run starting in that instant
        waits it out (``lock`` tries for a moment before it gives up). -1 when the
        holder did not write its pid yet.
        """
        if self._lock_fd is not None:
            return os.getpid()
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def runs_in_progress(self) -> list[str]:
        """Runs being written by a live process right now (state ``running``, lock held).

        A run left ``running`` with the lock free has crashed: see ``effective_state``.
        """
        if self.lock_holder() is None:
            return []
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs WHERE state='running' ORDER BY started_at, run_id")]

    def effective_state(self, record: dict[str, Any]) -> str:
        """A run record's state as it is now: ``running`` only while its process lives."""
        if record["state"] == "running" and self.lock_holder() is None:
            return "crashed"
        return str(record["state"])

    def update_run_info(self, run_id: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into a run's recorded info (e.g. the exit code it ended with)."""
        merged = {**self.run(run_id)["info"], **info}
        with self._transaction():
            self._db.execute("UPDATE runs SET info=? WHERE run_id=?",
                             (json.dumps(merged, sort_keys=True), run_id))

    def recover(self) -> int:
        """After a crash: rows left ``sending`` become ``ambiguous``; returns how many."""
        assert self._lock_fd is not None, "recover() only under the run lock"
        with self._transaction():
            cur = self._db.execute(
                "UPDATE rows SET status='ambiguous', error=? WHERE status='sending'",
                ("the process stopped while this request was in flight",),
            )
            self._db.execute("UPDATE runs SET state='crashed' WHERE state='running'")
        return cur.rowcount

    def start_run(self, run_id: str, account: str, fingerprint: str, info: dict[str, Any]) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs (run_id, started_at, state, account, config_fingerprint, info)"
                " VALUES (?, ?, 'running', ?, ?, ?)",
                (run_id, utcnow(), account, fingerprint, json.dumps(info, sort_keys=True)),
            )

    def finish_run(self, run_id: str, state: str, info: dict[str, Any]) -> None:
        merged = {**self.run(run_id)["info"], **info}
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET finished_at=?, state=?, info=? WHERE run_id=?",
                (utcnow(), state, json.dumps(merged, sort_keys=True), run_id),
            )

    def refuse_run(self, run_id: str, info: dict[str, Any]) -> int:
        """End a run whose input was refused before anything was sent (exit 2): its rows,
        scanned from an input the tool would not trust, are forgotten, so no later count
        (``status``, a report) offers them as unsent notes; the run stays, ``aborted``,
        with ``info``. Returns how many rows were forgotten. Raises StorageFull."""
        with self._transaction():
            forgotten = self._db.execute(
                "DELETE FROM rows WHERE run_id=? AND status IN "
                "('pending','rejected','duplicate','already_sent','held')", (run_id,),
            ).rowcount
        self.finish_run(run_id, "aborted", info)
        return forgotten

    def run(self, run_id: str) -> dict[str, Any]:
        """One run's record, with ``info`` decoded; StateError if there is no such run."""
        found = self._db.execute(
            "SELECT run_id, started_at, finished_at, state, account, config_fingerprint, info"
            " FROM runs WHERE run_id=?", (run_id,),
        ).fetchone()
        if found is None:
            raise StateError(f"no run {run_id!r} in the ledger {self.path}")
        keys = ("run_id", "started_at", "finished_at", "state", "account", "fingerprint", "info")
        record = dict(zip(keys, found, strict=True))
        record["info"] = json.loads(record["info"])
        return record

    def latest_run(self) -> str | None:
        found = self._db.execute(
            "SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return None if found is None else str(found[0])

    def unresolved_runs(self) -> list[str]:
        """Runs with rows still waiting for an outcome or held as ambiguous."""
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT run_id FROM rows WHERE outcome IS NULL"
            " AND status IN ('accepted', 'ambiguous', 'held', 'sending') ORDER BY run_id"
        )]

    def unsettled_runs(self) -> list[str]:
        """Runs whose report can still change: some row's truth waits on an outcome,
        a review, another run's send or a send that did not happen, or the run's scan
        stopped before the end of an input no later run has read (oldest first).

        A run whose every row is settled (confirmed, rejected, skipped as a duplicate,
        or following a confirmed send of its note by any run) is not listed.
        """
        found = {r[0] for r in self._db.execute(_UNSETTLED_RUNS_SQL.format(where=""))}
        found.update(run_id for run_id, _ in self.not_read())
        return [r for r in self._runs_in_order() if r in found]

    def run_settled(self, run_id: str) -> bool:
        """Whether nothing can change ``run_id``'s report any more (see ``unsettled_runs``)."""
        if self._db.execute(_UNSETTLED_RUNS_SQL.format(where="AND u.run_id = ?"),
                            (run_id,)).fetchone() is not None:
            return False
        return all(r != run_id for r, _ in self.not_read())

    def reports_to_rewrite(self) -> list[str]:
        """Runs whose written report may no longer say what is true now (oldest first):
        the unsettled ones, and every run whose last report was written while it was
        unsettled (``report_final`` not recorded, see ``report_written``), whoever
        refreshed the ledger since (a later run, ``status``, ``poll``)."""
        unsettled = set(self.unsettled_runs())
        out = []
        for run_id, info in self._db.execute(
                "SELECT run_id, info FROM runs ORDER BY started_at, run_id"):
            if run_id in unsettled or not json.loads(info).get("report_final"):
                out.append(run_id)
        return out

    def report_written(self, run_id: str, *, redrive_digest: str | None) -> None:
        """Record that ``run_id``'s report was just written: whether it is final (the run
        was settled, so no later change can make it wrong) and the fingerprint of the rows
        its redrive.csv offers (None: it has none)."""
        self.update_run_info(run_id, {"report_final": self.run_settled(run_id),
                                      "redrive_digest": redrive_digest})

    def runs_following(self, run_id: str) -> list[str]:
        """Other runs with a row whose note (ledger key) ``run_id`` sent and Cobalt took:
        their reports (and redrive.csv) change when this run ends (oldest first)."""
        found = {r[0] for r in self._db.execute(
            """SELECT DISTINCT o.run_id FROM rows r JOIN rows o INDEXED BY rows_key
                    ON o.key = r.key AND o.run_id != r.run_id
                 WHERE r.run_id = ? AND r.status = 'accepted' AND r.key IS NOT NULL""",
            (run_id,))}
        return [r for r in self._runs_in_order() if r in found]

    def _runs_in_order(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs ORDER BY started_at, run_id")]

    def not_read(self) -> list[tuple[str, list[str]]]:
        """Runs whose scan stopped before the end of some input file (a full disk, a
        signal, an input error), with those files, while no later run read each to its
        end: (run_id, paths), oldest first. ``--limit`` is not a stop: it says what it
        left unread."""
        runs = [(r, s, json.loads(i)) for r, s, i in self._db.execute(
            "SELECT run_id, started_at, info FROM runs ORDER BY started_at, run_id")]
        out = []
        for n, (run_id, _, info) in enumerate(runs):
            stopped = info.get("scan_stopped")
            if not stopped:
                continue
            left = [p for p in stopped.get("unread_files", [])
                    if not any(self._read_whole(p, later_info)
                               for _, _, later_info in runs[n + 1:])]
            if left:
                out.append((run_id, left))
        return out

    @staticmethod
    def _read_whole(path: str, info: dict[str, Any]) -> bool:
        """Whether a run (by its recorded info) read ``path`` to its end: its scan counted
        the file's every record, none left beyond ``--limit``."""
        return any(f.get("path") == path and not f.get("beyond_limit")
                   for f in info.get("input_records") or [])

    def open_rows(self, running: Sequence[str]) -> dict[str, list[OpenRow]]:
        """The rows behind each kind of open item over every run (status.py documents the
        kinds and counts each note once), as (run_id, key, since) tuples.

        ``running``: the runs in progress; their unsent rows are ``in_progress``, never
        ``send_failed``. ``since`` (ISO 8601 UTC, or None): when the row was submitted
        (``awaiting_outcome``: its latest send, which staleness is measured from), or
        when its run ended (``send_failed``). ``failed_retryable`` is not here: its
        reasons are matched in Python (``emr_failures``).
        """
        marks = ",".join("?" * len(running))

        def live(alias: str) -> str:
            return f"{alias}run_id IN ({marks})" if running else "0"

        params = tuple(running)
        return {
            "in_progress": self._db.execute(
                f"SELECT run_id, key, submitted_at FROM rows WHERE {live('')}"  # noqa: S608
                " AND status IN ('pending', 'sending') AND key IS NOT NULL", params).fetchall(),
            "awaiting_outcome": self._db.execute(
                "SELECT run_id, key, submitted_at FROM rows"
                " WHERE status = 'accepted' AND outcome IS NULL AND key IS NOT NULL").fetchall(),
            "ambiguous": self._db.execute(
                f"""WITH doubt AS (
                    SELECT r.run_id, r.key, r.submitted_at FROM rows r
                     WHERE r.outcome IS NULL AND (r.status = 'ambiguous'
                           OR (r.status = 'sending' AND NOT {live('r.')}))
                    UNION ALL
                    SELECT h.run_id, h.key, ref.submitted_at
                      FROM rows h JOIN rows ref ON ref.id = h.ref_id
                     WHERE h.status = 'held' AND ref.outcome IS NULL
                       AND ref.status IN ('ambiguous', 'sending'))
                SELECT run_id, key, submitted_at FROM doubt
                 WHERE key IS NOT NULL AND key NOT IN ({_DELIVERED_KEYS})""",  # noqa: S608
                params).fetchall(),
            "send_failed": self._db.execute(
                f"""SELECT r.run_id, r.key, COALESCE(r.answered_at, u.finished_at, u.started_at)
                      FROM rows r JOIN runs u ON u.run_id = r.run_id
                     WHERE r.status IN ('pending', 'failed') AND NOT {live('r.')}
                       AND r.key IS NOT NULL
                       AND r.key NOT IN ({_DELIVERED_KEYS})""",  # noqa: S608
                params).fetchall(),
        }

    def redrive_row_ids(self, run_id: str) -> list[tuple[int, str, str | None, str | None]]:
        """The rows of ``run_id`` its redrive.csv should offer now, before the reason
        check: (id, status, failure_reason, reason_codes) of rows not sent (``pending``,
        ``failed``) and of rows that failed in the EMR, whose note no run delivered
        since (reconcile.py's ``send_failed`` and ``failed_in_emr``)."""
        return self._db.execute(
            """SELECT id, status, failure_reason, reason_codes FROM rows
                 WHERE run_id = ? AND key IS NOT NULL
                   AND (status IN ('pending', 'failed')
                        OR (status = 'accepted' AND outcome = 'failed'))
                   AND NOT EXISTS (SELECT 1 FROM rows o INDEXED BY rows_key
                        WHERE o.key = rows.key AND o.run_id != rows.run_id
                          AND (o.outcome = 'created'
                               OR (o.status = 'accepted' AND o.outcome IS NULL)))""",
            (run_id,)).fetchall()

    def emr_failures(self) -> list[tuple[str, bytes, str | None, str | None, str | None]]:
        """(run_id, key, failure_reason, reason_codes, outcome_at) of notes that failed in the
        EMR and that no run has delivered since."""
        return self._db.execute(_EMR_FAILURES_SQL).fetchall()

    def add_file(
        self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
        sha256: str | None = None, size: int | None = None,
    ) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, file_no, path, sha256, size, json.dumps(list(header))),
            )

    def status_counts(self, run_id: str) -> dict[str, int]:
        """How many of the run's rows are in each ledger status (statuses absent: none)."""
        return dict(self._db.execute(
            "SELECT status, COUNT(*) FROM rows WHERE run_id=? GROUP BY status", (run_id,)))

    def files(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for file_no, path, sha, size, header in self._db.execute(
            "SELECT file_no, path, sha256, size, header FROM files WHERE run_id=? ORDER BY file_no",
            (run_id,),
        ):
            out.append({"file_no": file_no, "path": path, "sha256": sha, "size": size,
                        "header": json.loads(header)})
        return out

    # -- rows ---------------------------------------------------------------------------

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        """Write a batch of a run's rows, in input order, in one transaction."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO rows (run_id, file_no, line, emr_task_id, key, status, error,"
                " ref_id, passthrough) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((run_id, r.file_no, r.line, r.emr_task_id, r.key, r.status, r.error, r.ref_id,
                  json.dumps(r.passthrough, ensure_ascii=False) if r.passthrough else None)
                 for r in rows),
            )

    def earlier(self, run_id: str, keys: Sequence[bytes]) -> dict[bytes, Earlier]:
        """For each key, the most telling row of another run (delivered first, then in doubt)."""
        found: dict[bytes, Earlier] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, *rest in self._db.execute(
                f"SELECT key, id, run_id, status, job_id, outcome FROM rows"  # noqa: S608
                f" WHERE key IN ({marks}) AND run_id != ? ORDER BY id", (*chunk, run_id),
            ):
                candidate = Earlier(*rest)
                if _rank(candidate) > _rank(found.get(key)):
                    found[key] = candidate
        return found

    def rows_to_send(self, run_id: str) -> Iterator[tuple[int, int, int, str, bytes]]:
        """(id, file_no, line, emr_task_id, key) of the run's pending rows, in input order."""
        last = 0
        while True:
            batch = self._db.execute(
                "SELECT id, file_no, line, emr_task_id, key FROM rows WHERE run_id=? AND id>?"
                " AND status='pending' ORDER BY id LIMIT 5000", (run_id, last),
            ).fetchall()
            yield from batch
            if len(batch) < 5000:
                return
            last = batch[-1][0]

    def mark_sending(self, row_ids: Sequence[int]) -> None:
        now = utcnow()  # one commit, one moment
        self._db.executemany(
            "UPDATE rows SET status='sending', attempts=attempts+1, submitted_at=? WHERE id=?",
            ((now, i) for i in row_ids),
        )

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        self._db.executemany(
            "UPDATE rows SET status=?, http_status=?, task_note_id=?, job_id=?,"
            " error=?, answered_at=? WHERE id=?",
            ((a.status, a.http_status, a.task_note_id, a.job_id, a.error,
              a.answered_at, a.row_id) for a in attempts),
        )

    def apply(self, sending: Sequence[int], attempts: Sequence[Attempt]) -> None:
        """One group commit: results first, then the rows about to be sent.

        In that order because a row's "back to pending" (a retryable failure)
        and its next "sending" may share a batch; the reverse never can, as a
        row's request leaves only after its "sending" is committed.
        """
        try:
            with self._transaction():
                if attempts:
                    self.record_attempts(attempts)
                if sending:
                    self.mark_sending(sending)
        except sqlite3.Error as exc:
            raise StateError(f"ledger {self.path} cannot be written: {exc}") from None

    def job_ids(self, run_id: str | None = None, *, unresolved: bool = False) -> set[str]:
        """job ids of accepted rows (of one run, or all); ``unresolved``: only without outcome."""
        sql = "SELECT job_id FROM rows WHERE status='accepted' AND job_id IS NOT NULL"
        params: tuple[str, ...] = ()
        if run_id is not None:
            sql += " AND run_id=?"
            params = (run_id,)
        if unresolved:
            sql += " AND outcome IS NULL"
        return {r[0] for r in self._db.execute(sql, params)}

    def earliest_submission(self, job_ids: Iterable[str]) -> str | None:
        """The earliest submitted_at among rows with these job ids."""
        ids = list(job_ids)
        earliest: str | None = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found = self._db.execute(
                f"SELECT MIN(submitted_at) FROM rows WHERE job_id IN ({marks})",  # noqa: S608
                chunk,
            ).fetchone()[0]
            if found is not None and (earliest is None or found < earliest):
                earliest = found
        return earliest

    def ambiguous_keys(self, run_ids: Iterable[str]) -> tuple[frozenset[bytes], str | None]:
        """Keys of the ambiguous rows of ``run_ids`` that no outcome settles yet, and the
        earliest ``submitted_at`` among them (ISO 8601 UTC; None when there are none).

        Such a row has no job id: only a ``task_note.created`` event carrying the same
        note for the same task (reconcile.py's evidence rule) can settle it.
        """
        keys: set[bytes] = set()
        earliest: str | None = None
        for run_id in run_ids:
            for key, at in self._db.execute(
                    "SELECT key, submitted_at FROM rows WHERE run_id=? AND status='ambiguous'"
                    " AND key IS NOT NULL AND outcome IS NULL", (run_id,)):
                keys.add(bytes(key))
                if at is not None and (earliest is None or at < earliest):
                    earliest = at
        return frozenset(keys), earliest

    # -- the events mirror and the join rules ---------------------------------------------

    def sink_position(self) -> tuple[int, str]:
        """How far the sink file has been read: (byte offset, hash of its first line)."""
        found = dict(self._db.execute(
            "SELECT key, value FROM meta WHERE key IN ('sink_offset', 'sink_head')").fetchall())
        return int(found.get("sink_offset", 0)), str(found.get("sink_head", ""))

    def add_events(self, events: Sequence[EventRecord], tally: dict[str, int], *,
                   offset: int, head: str) -> int:
        """Store newly read events and where reading stopped, in one transaction.

        Returns how many events were new (an event already stored is left as it is).
        """
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO events (event_id, kind, job_id, task_note_id, created,"
                " emr_note_id, failure_reason, reason_codes, ekey, line)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
            added = self._db.total_changes - before
            tally = {**tally, "(repeated)": tally.get("(repeated)", 0) + len(events) - added}
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

    def event_tally(self) -> dict[str, int]:
        """Counts of what the sink held besides new task_note events (other types, repeats)."""
        return dict(self._db.execute("SELECT name, count FROM event_tally ORDER BY name"))

    def match_outcomes(self) -> int:
        """Apply the join rules (reconcile.py's docstring) to every row; returns rows changed.

        Computed from scratch into a temporary table, then written where it differs,
        so the same events always give the same outcomes, and a rerun writes nothing.
        """
        db = self._db
        try:
            with self._transaction():
                for statement in _MATCH_SQL:
                    db.execute(statement)
                if db.execute(_ANY_DOUBTFUL_SQL).fetchone() is not None:
                    db.execute(_EVIDENCE_SQL)
                before = db.total_changes
                db.execute(_CLEAR_OUTCOMES_SQL)
                db.execute(_WRITE_OUTCOMES_SQL)
                changed = db.total_changes - before
                for statement in _ORPHANS_SQL:
                    db.execute(statement)
                return changed
        finally:
            db.execute("DROP TABLE IF EXISTS temp.matched")
            db.execute("DROP TABLE IF EXISTS temp.claimed")

    def orphans(self, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """task_note events that no row of any run owns: how many, and the first few."""
        found = self._db.execute("SELECT value FROM meta WHERE key = 'orphans'").fetchone()
        rows = self._db.execute("SELECT event_id, kind, job_id, created FROM orphans"
                                " ORDER BY created, event_id LIMIT ?", (limit,)).fetchall()
        return (int(found[0]) if found else 0,
                [dict(zip(("event_id", "kind", "job_id", "created"), r, strict=True))
                 for r in rows])

    def run_chunks(self, run_id: str, size: int = 20_000) -> Iterator[pd.DataFrame]:
        """A run's rows in input order, ``size`` at a time, with their file, the row they
        refer to (the earlier attempt of a held or already-sent row), and ``via_*``: the
        send of the same note by another run that speaks for a row whose own attempt did
        not deliver it (reconcile.py's rule 5), or None."""
        import pandas as pd  # noqa: PLC0415 - only reports need pandas; sending does not

        last = 0
        while True:
            frame = pd.read_sql_query(_RUN_CHUNK_SQL, self._db, params=(run_id, last, size))
            if frame.empty:
                return
            self._add_via(frame)
            yield frame
            last = int(frame["id"].iloc[-1])
            if len(frame) < size:
                return

    def _add_via(self, frame: pd.DataFrame) -> None:
        """Fill the ``via_*`` columns; looked up only for the rows that may follow a send
        (usually few: a run's rows mostly speak for themselves)."""
        for column in _VIA_COLUMNS:
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
                    _VIA_SQL.format(marks=marks), chunk):
                found[row_id] = tuple(values)
        if not found:
            return
        position = frame["id"].map(lambda i: i in found)
        values = [found[i] for i in frame.loc[position, "id"]]
        for n, column in enumerate(_VIA_COLUMNS):
            frame.loc[position, f"via_{column}"] = [v[n] for v in values]

    # -- frames for reconcile and report -------------------------------------------------

    def frame(self, run_id: str | None = None, *, columns: str = "*") -> pd.DataFrame:
        """Rows (of one run, or of every run) as a DataFrame, in input order."""
        import pandas as pd  # noqa: PLC0415 - only reports need pandas; sending does not

        where, params = ("WHERE run_id=?", (run_id,)) if run_id else ("", ())
        return pd.read_sql_query(
            f"SELECT {columns} FROM rows {where} ORDER BY id",  # noqa: S608
            self._db, params=params,
        )

    # -- retention (tasknotes prune) ---------------------------------------------------------

    def runs_started_before(self, cutoff: str) -> list[str]:
        """Ids of the runs started before ``cutoff`` (ISO 8601 UTC, as ``utcnow`` writes)."""
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs WHERE started_at < ? ORDER BY started_at", (cutoff,))]

    def vacuum(self) -> int:
        """Give the ledger file's free pages back (SQLite ``VACUUM``) when it has any;
        returns the bytes the file shrank by (0: nothing to give back). Raises StorageFull
        (VACUUM needs room for a copy of the database)."""
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        if not free:
            return 0
        before = self.path.stat().st_size
        try:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:
            if _is_full(exc, self.path):
                raise self._full(exc) from None
            raise
        return max(0, before - self.path.stat().st_size)


# One row per task_note event, as stored in the events table (see the schema).
EventRecord = tuple[str, str, str | None, str | None, str | None, str | None, str | None,
                    str | None, bytes | None, int]

# The join rules, in the order reconcile.py documents them. `claimed`: every (row, event) pair
# matched by job_id, or, for a row with no job_id match, by task_note_id.
_MATCH_SQL: Final = (
    """CREATE TEMP TABLE claimed AS
    SELECT r.id AS row_id, e.*, 'job_id' AS settled_by
      FROM events e JOIN rows r INDEXED BY rows_job ON r.job_id = e.job_id
     WHERE e.job_id IS NOT NULL""",
    """CREATE INDEX temp.claimed_row ON claimed (row_id)""",
    """INSERT INTO claimed
    SELECT r.id, e.*, 'task_note_id'
      FROM events e JOIN rows r INDEXED BY rows_task_note ON r.task_note_id = e.task_note_id
     WHERE e.task_note_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM claimed c WHERE c.row_id = r.id)""",
    # Most rows have one event: taken as it is, grouped on the row index, no sorting.
    """CREATE TEMP TABLE matched AS
    SELECT row_id, kind AS outcome, event_id, emr_note_id, failure_reason, reason_codes,
           created AS outcome_at, settled_by
      FROM claimed GROUP BY row_id HAVING COUNT(*) = 1""",
    """CREATE UNIQUE INDEX temp.matched_row ON matched (row_id)""",
    # Rows with several events: the earliest of each kind; created and failed: a conflict.
    """INSERT INTO matched
    WITH several AS (
        SELECT * FROM claimed
         WHERE row_id IN (SELECT row_id FROM claimed GROUP BY row_id HAVING COUNT(*) > 1)),
    firsts AS (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY row_id, kind ORDER BY created, event_id) AS n
          FROM several),
    c AS (SELECT * FROM firsts WHERE n = 1 AND kind = 'created'),
    f AS (SELECT * FROM firsts WHERE n = 1 AND kind = 'failed')
    SELECT c.row_id, CASE WHEN f.row_id IS NULL THEN 'created' ELSE 'conflict' END,
           CASE WHEN f.row_id IS NULL THEN c.event_id ELSE c.event_id || ';' || f.event_id END,
           c.emr_note_id, f.failure_reason, f.reason_codes, c.created, c.settled_by
      FROM c LEFT JOIN f ON f.row_id = c.row_id
    UNION ALL
    SELECT f.row_id, 'failed', f.event_id, NULL, f.failure_reason, f.reason_codes, f.created,
           f.settled_by
      FROM f WHERE NOT EXISTS (SELECT 1 FROM c WHERE c.row_id = f.row_id)""",
)
_ANY_DOUBTFUL_SQL: Final = """
SELECT 1 FROM rows INDEXED BY rows_ambiguous
 WHERE status = 'ambiguous' AND key IS NOT NULL AND id NOT IN (SELECT row_id FROM matched)
 LIMIT 1"""
# Evidence: ambiguous rows and unclaimed created events with the same key, paired in
# order (rows by id, events by time), so one event settles at most one row.
_EVIDENCE_SQL: Final = """
INSERT INTO matched
WITH doubtful AS (
    SELECT id AS row_id, key, ROW_NUMBER() OVER (PARTITION BY key ORDER BY id) AS n
      FROM rows INDEXED BY rows_ambiguous
     WHERE status = 'ambiguous' AND key IS NOT NULL
       AND id NOT IN (SELECT row_id FROM matched)),
spare AS (
    SELECT e.*, ROW_NUMBER() OVER (PARTITION BY ekey ORDER BY created, event_id) AS n
      FROM events e
     WHERE kind = 'created' AND ekey IN (SELECT key FROM doubtful)
       AND event_id NOT IN (SELECT event_id FROM claimed))
SELECT d.row_id, 'created', s.event_id, s.emr_note_id, NULL, NULL, s.created, 'evidence'
  FROM doubtful d JOIN spare s ON s.ekey = d.key AND s.n = d.n"""
_ORPHANS_SQL: Final = (
    "DELETE FROM orphans",
    """CREATE TEMP TABLE owned AS
    SELECT event_id FROM claimed UNION SELECT event_id FROM matched WHERE settled_by = 'evidence'
    """,
    """INSERT OR REPLACE INTO meta
    SELECT 'orphans', COUNT(*) FROM events WHERE event_id NOT IN (SELECT event_id FROM owned)""",
    """INSERT INTO orphans
    SELECT event_id, kind, job_id, created FROM events
     WHERE event_id NOT IN (SELECT event_id FROM owned) ORDER BY created, event_id LIMIT 50""",
    "DROP TABLE temp.owned",
)
_CLEAR_OUTCOMES_SQL: Final = """
UPDATE rows SET outcome = NULL, event_id = NULL, emr_note_id = NULL, failure_reason = NULL,
       outcome_at = NULL, settled_by = NULL
 WHERE outcome IS NOT NULL AND id NOT IN (SELECT row_id FROM matched)"""
_WRITE_OUTCOMES_SQL: Final = """
UPDATE rows SET outcome = m.outcome, event_id = m.event_id, emr_note_id = m.emr_note_id,
       failure_reason = m.failure_reason, outcome_at = m.outcome_at, settled_by = m.settled_by,
       reason_codes = m.reason_codes
  FROM matched m
 WHERE m.row_id = rows.id
   AND (rows.outcome IS NOT m.outcome OR rows.event_id IS NOT m.event_id
        OR rows.failure_reason IS NOT m.failure_reason OR rows.settled_by IS NOT m.settled_by
        OR rows.emr_note_id IS NOT m.emr_note_id OR rows.outcome_at IS NOT m.outcome_at)"""
# Keys some run delivered: Cobalt has the note (created), or took it and no outcome is in.
_DELIVERED_KEYS: Final = """
SELECT key FROM rows INDEXED BY rows_key WHERE key IS NOT NULL
   AND (outcome = 'created' OR (status = 'accepted' AND outcome IS NULL))"""
_EMR_FAILURES_SQL: Final = f"""
SELECT run_id, key, failure_reason, reason_codes, outcome_at FROM rows
 WHERE status IN ('accepted', 'ambiguous') AND outcome = 'failed'
   AND key IS NOT NULL AND key NOT IN ({_DELIVERED_KEYS}) ORDER BY id"""  # noqa: S608
_RUN_CHUNK_SQL: Final = """
SELECT r.*, f.path AS source_file, ref.run_id AS ref_run_id, ref.job_id AS ref_job_id,
       ref.outcome AS ref_outcome
  FROM rows r
  LEFT JOIN files f ON f.run_id = r.run_id AND f.file_no = r.file_no
  LEFT JOIN rows ref ON ref.id = r.ref_id
 WHERE r.run_id = ? AND r.id > ?
 ORDER BY r.id
 LIMIT ?"""
# A row's "via": the send of the same note by another run that delivered it (Cobalt has it,
# or took it and no outcome is in): a confirmed send first, then the earliest.
_VIA_COLUMNS: Final = ("run_id", "job_id", "outcome", "task_note_id", "submitted_at",
                       "outcome_at", "event_id", "emr_note_id")
_VIA_SQL: Final = """
SELECT r.id, via.run_id, via.job_id, via.outcome, via.task_note_id, via.submitted_at,
       via.outcome_at, via.event_id, via.emr_note_id
  FROM rows r JOIN rows via ON via.id = (
       SELECT o.id FROM rows o INDEXED BY rows_key
        WHERE o.key = r.key AND o.run_id != r.run_id
          AND (o.outcome = 'created' OR (o.status = 'accepted' AND o.outcome IS NULL))
        ORDER BY o.outcome IS NULL, o.id LIMIT 1)
 WHERE r.id IN ({marks})"""
# A row whose own attempt did not deliver its note follows a confirmed send of that note by
# another run (reconcile.py's rule 5): settled, even though the row itself has no outcome.
_UNSETTLED_RUNS_SQL: Final = """
SELECT run_id FROM runs u WHERE EXISTS (
    SELECT 1 FROM rows r LEFT JOIN rows ref ON ref.id = r.ref_id
     WHERE r.run_id = u.run_id AND (
           (r.status IN ('pending', 'failed', 'sending', 'ambiguous', 'accepted')
            AND r.outcome IS NOT 'created')
        OR (r.status IN ('already_sent', 'held') AND ref.outcome IS NOT 'created'))
       AND NOT ((r.status IN ('pending', 'failed', 'already_sent', 'held')
                 OR (r.status = 'accepted' AND r.outcome = 'failed'))
                AND EXISTS (SELECT 1 FROM rows o INDEXED BY rows_key
                             WHERE o.key = r.key AND o.run_id != r.run_id
                               AND o.outcome = 'created')))
 {where}"""


def _flock_briefly(fd: int, kind: int, tries: int = 20) -> None:
    """flock without blocking, tried a few times 5 ms apart: another command's probe of
    the lock (``lock_holder``) holds it for microseconds and must not fail a run."""
    for _ in range(tries - 1):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.005)
        else:
            return
    fcntl.flock(fd, kind | fcntl.LOCK_NB)


def _rank(row: Earlier | None) -> int:
    if row is None:
        return 0
    if row.delivered:
        return 3
    if row.maybe_delivered:
        return 2
    return 1
