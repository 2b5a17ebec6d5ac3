"""The SQLite store: every input row of every run, what was sent, what came back.

Longer than the package's other modules (~700 lines) because it is one class over one
private connection: each method is one operation of ``protocol.StateStore``, a few lines
of SQL and the Python that shapes its answer; the schema (schema.py), the join rules
(rules.py) and the records (records.py) live apart.

The ledger is the single source of truth for "was this note sent?". It never
holds a note's text: a row is identified across runs by ``key`` =
SHA-256(account, emr_task_id, note). Only pipeline/state/ speaks SQL.

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
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import StateError, StorageFull
from pipeline.state import rules
from pipeline.state.records import (
    Attempt,
    Earlier,
    EventRecord,
    InputFile,
    NewRow,
    OpenRow,
    Orphan,
    RunInfo,
    RunInfoChanges,
    RunRecord,
    utcnow,
)
from pipeline.state.schema import SCHEMA, check_version

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.state.protocol import StateStore

log = logging.getLogger(__name__)

RESERVE_BYTES: Final = 1 << 20


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


class Ledger:
    """A SQLite ledger file. Not thread-safe: one caller at a time (see Committer)."""

    def __init__(self, path: Path, *, synchronous: str = "full", readonly: bool = False,
                 clock: Callable[[], str] = utcnow) -> None:
        """Open (creating it 0600, in a 0700 directory) the ledger at ``path``.

        ``synchronous``: "full" (fsync every commit) or "normal"; ``readonly``: open an
        existing file read-only; ``clock``: now as ISO 8601 UTC text (``utcnow``), for
        the times the ledger writes (a run's start and end, a row's ``submitted_at``).
        Raises StateError if the file cannot be used, StorageFull if the disk is full.
        """
        self.path = path
        self._clock = clock
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
            self._db.executescript(SCHEMA)
            with self._transaction():
                check_version(self._db, path)
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
        """Close the connection and let go of the run lock, if held."""
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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

    def effective_state(self, record: RunRecord) -> str:
        """A run record's state as it is now: ``running`` only while its process lives."""
        if record.state == "running" and self.lock_holder() is None:
            return "crashed"
        return record.state

    def synchronous(self) -> str:
        """The connection's effective ``PRAGMA synchronous``: "off", "normal", "full" or
        "extra" (what a commit waits for before it counts as durable)."""
        level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return ("off", "normal", "full", "extra")[level]

    def update_run_info(self, run_id: str, info: RunInfoChanges) -> None:
        """Merge ``info`` into a run's recorded info (e.g. the exit code it ended with)."""
        merged = {**self._stored_info(run_id), **info}
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

    def start_run(self, run_id: str, account: str, fingerprint: str,
                  info: RunInfoChanges) -> None:
        """Record a run as ``running`` from now, with its account, config fingerprint and
        info. Raises StorageFull."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs (run_id, started_at, state, account, config_fingerprint, info)"
                " VALUES (?, ?, 'running', ?, ?, ?)",
                (run_id, self._clock(), account, fingerprint, json.dumps(info, sort_keys=True)),
            )

    def finish_run(self, run_id: str, state: str, info: RunInfoChanges) -> None:
        """Record a run's end now: its final ``state`` and ``info`` merged into what it
        recorded. Raises StateError if there is no such run, StorageFull."""
        merged = {**self._stored_info(run_id), **info}
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET finished_at=?, state=?, info=? WHERE run_id=?",
                (self._clock(), state, json.dumps(merged, sort_keys=True), run_id),
            )

    def refuse_run(self, run_id: str, info: RunInfoChanges) -> int:
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

    def run(self, run_id: str) -> RunRecord:
        """One run's record; StateError if there is no such run."""
        found = self._db.execute(
            "SELECT run_id, started_at, finished_at, state, account, config_fingerprint, info"
            " FROM runs WHERE run_id=?", (run_id,),
        ).fetchone()
        if found is None:
            raise StateError(f"no run {run_id!r} in the ledger {self.path}")
        run, started, finished, state, account, fingerprint, info = found
        return RunRecord(run, started, finished, state, account, fingerprint,
                         RunInfo.from_json(json.loads(info)))

    def _stored_info(self, run_id: str) -> dict[str, Any]:
        """A run's info as stored (keys a newer version wrote included)."""
        found = self._db.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if found is None:
            raise StateError(f"no run {run_id!r} in the ledger {self.path}")
        stored: dict[str, Any] = json.loads(found[0])
        return stored

    def latest_run(self) -> str | None:
        """The id of the run started last, or None if there is none."""
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
        found = {r[0] for r in self._db.execute(rules.UNSETTLED_RUNS_SQL.format(where=""))}
        found.update(run_id for run_id, _ in self.not_read())
        return [r for r in self._runs_in_order() if r in found]

    def run_settled(self, run_id: str) -> bool:
        """Whether nothing can change ``run_id``'s report any more (see ``unsettled_runs``)."""
        if self._db.execute(rules.UNSETTLED_RUNS_SQL.format(where="AND u.run_id = ?"),
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
                 WHERE key IS NOT NULL AND key NOT IN ({rules.DELIVERED_KEYS})""",  # noqa: S608
                params).fetchall(),
            "send_failed": self._db.execute(
                f"""SELECT r.run_id, r.key, COALESCE(r.answered_at, u.finished_at, u.started_at)
                      FROM rows r JOIN runs u ON u.run_id = r.run_id
                     WHERE r.status IN ('pending', 'failed') AND NOT {live('r.')}
                       AND r.key IS NOT NULL
                       AND r.key NOT IN ({rules.DELIVERED_KEYS})""",  # noqa: S608
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
        return self._db.execute(rules.EMR_FAILURES_SQL).fetchall()

    def add_file(
        self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
        sha256: str | None = None, size: int | None = None,
    ) -> None:
        """Record input file ``file_no`` of a run (replacing what was recorded): its path,
        header names, and its SHA-256 and size in bytes if known. Raises StorageFull."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, file_no, path, sha256, size, json.dumps(list(header))),
            )

    def status_counts(self, run_id: str) -> dict[str, int]:
        """How many of the run's rows are in each ledger status (statuses absent: none)."""
        return dict(self._db.execute(
            "SELECT status, COUNT(*) FROM rows WHERE run_id=? GROUP BY status", (run_id,)))

    def files(self, run_id: str) -> list[InputFile]:
        """The input files a run recorded, by file number."""
        return [InputFile(file_no, path, sha, size, tuple(json.loads(header)))
                for file_no, path, sha, size, header in self._db.execute(
                    "SELECT file_no, path, sha256, size, header FROM files WHERE run_id=?"
                    " ORDER BY file_no", (run_id,))]

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
                if rules.rank(candidate) > rules.rank(found.get(key)):
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
        """Mark rows ``sending`` (one more attempt, submitted now), in the caller's
        transaction."""
        now = self._clock()  # one commit, one moment
        self._db.executemany(
            "UPDATE rows SET status='sending', attempts=attempts+1, submitted_at=? WHERE id=?",
            ((now, i) for i in row_ids),
        )

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        """Record what sending rows gave, in the caller's transaction."""
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
        note for the same task (rule 4 in rules.py) can settle it.
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

    def events(self) -> list[EventRecord]:
        """The mirrored task_note events, by event id, as stored (reasons redacted)."""
        return [EventRecord(*r) for r in self._db.execute(
            "SELECT event_id, kind, job_id, task_note_id, created, emr_note_id, failure_reason,"
            " reason_codes, ekey, line FROM events ORDER BY event_id")]

    def event_tally(self) -> dict[str, int]:
        """Counts of what the sink held besides new task_note events (other types, repeats)."""
        return dict(self._db.execute("SELECT name, count FROM event_tally ORDER BY name"))

    def match_outcomes(self) -> int:
        """Apply the join rules (rules.py) to every row; returns rows changed.

        Computed from scratch into a temporary table, then written where it differs,
        so the same events always give the same outcomes, and a rerun writes nothing.
        """
        db = self._db
        try:
            with self._transaction():
                for statement in rules.MATCH_SQL:
                    db.execute(statement)
                if db.execute(rules.ANY_DOUBTFUL_SQL).fetchone() is not None:
                    db.execute(rules.EVIDENCE_SQL)
                before = db.total_changes
                db.execute(rules.CLEAR_OUTCOMES_SQL)
                db.execute(rules.WRITE_OUTCOMES_SQL)
                changed = db.total_changes - before
                for statement in rules.ORPHANS_SQL:
                    db.execute(statement)
                return changed
        finally:
            db.execute("DROP TABLE IF EXISTS temp.matched")
            db.execute("DROP TABLE IF EXISTS temp.claimed")

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
        import pandas as pd  # noqa: PLC0415 - only reports need pandas; sending does not

        last = 0
        while True:
            frame = pd.read_sql_query(rules.RUN_CHUNK_SQL, self._db, params=(run_id, last, size))
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
        import pandas as pd  # noqa: PLC0415 - only reports need pandas; sending does not

        where, params = ("WHERE run_id=?", (run_id,)) if run_id else ("", ())
        return pd.read_sql_query(
            f"SELECT {columns} FROM rows {where} ORDER BY id",  # noqa: S608
            self._db, params=params,
        )



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


if TYPE_CHECKING:
    def _implements(ledger: Ledger) -> StateStore:  # mypy checks Ledger against the seam
        return ledger
