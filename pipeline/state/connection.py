"""The SQLite connection under the store: opening, transactions, the run lock, and the
storage-full reserve.

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
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from pipeline.errors import StateError, StorageFull
from pipeline.state.records import (
    utcnow,
)
from pipeline.state.schema import SCHEMA, check_version

if TYPE_CHECKING:
    pass

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


class SQLiteConnection:
    """One ledger file's connection. Not thread-safe: one caller at a time (see Committer)."""

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
    def existing(cls, path: Path) -> Self | None:
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

    def lock(self, holder: str | None = None) -> None:
        """Hold the run lock: one sending run per ledger, or StateError naming the holder
        (its pid, and what it is: ``holder``, e.g. "run <id>", kept in the lock file)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock_briefly(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            pid, _, what = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise StateError(
                f"another tasknotes run (pid {pid or '?'}{', ' + what if what else ''}) is "
                f"using the ledger {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, " ".join(filter(None, (str(os.getpid()), holder))).encode())
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
                text = os.read(fd, 256).decode(errors="replace").strip().partition(" ")[0]
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

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

    def synchronous(self) -> str:
        """The connection's effective ``PRAGMA synchronous``: "off", "normal", "full" or
        "extra" (what a commit waits for before it counts as durable)."""
        level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return ("off", "normal", "full", "extra")[level]


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
