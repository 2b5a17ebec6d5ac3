"""The PostgreSQL session under ``PgLedger`` (pg_ledger.py): SQLite's dialect rewritten
for PostgreSQL, the sqlite3 call surface the ledger's statements use, psycopg's errors
turned into the package's, and transactions the server rolled back for a conflict run
again (``Conflict``, ``PgSession.retrying``).

Several runs (accounts) write one database at once: a run's send updates its rows while
another's reconcile updates the outcomes of every run's rows, and each such statement
bumps ``runs.rev`` of the runs it touches (pg_ledger.bumping), so two transactions
can each hold a row the other waits for. PostgreSQL then aborts one of them with
SQLSTATE 40P01 (deadlock detected), or under SERIALIZABLE with 40001 (serialization
failure); its documentation ("Serialization Failure Handling") says to retry the whole
transaction from its start. ``retrying`` does that, for a transaction that is the
session's outermost, at most ``CONFLICT_TRIES`` times in all, with full-jitter
exponential backoff between tries (pipeline/retry.py ``Backoff``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

from pipeline.errors import RunAborted, StateError
from pipeline.retry import Backoff
from pipeline.state.postgres import describe_failure, where

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# SQLSTATEs after which the whole transaction may simply run again (PostgreSQL docs,
# "Serialization Failure Handling"): serialization_failure, deadlock_detected.
RETRY_SQLSTATES: Final = frozenset({"40001", "40P01"})
# Tries of one transaction in all (the first included), and the backoff between them:
# a deadlock is resolved by aborting one side, so the next try usually goes through.
CONFLICT_TRIES: Final = 5
CONFLICT_BACKOFF: Final = (0.05, 1.0)  # base, cap: seconds


class Conflict(RunAborted):
    """A transaction PostgreSQL rolled back because it conflicted with another
    (``sqlstate`` in RETRY_SQLSTATES): nothing of it was written.

    A RunAborted (exit 3) when it is not retried away (``PgSession.retrying``): the
    command stops where it was, as when the connection is lost; rows left ``sending``
    are ambiguous for the next run, rows not marked ``sending`` were not sent.
    """

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@functools.lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """A ledger statement in SQLite's dialect rewritten for PostgreSQL: ``?`` -> ``%s``,
    ``INDEXED BY`` hints dropped, ``a IS NOT b`` (b not NULL) -> ``IS DISTINCT FROM``,
    ``temp.x`` -> ``pg_temp.x`` (and no schema on an index name)."""
    out = sql.replace("%", "%%").replace("?", "%s")
    out = re.sub(r"\s+INDEXED BY \w+", "", out)
    out = re.sub(r"\bIS NOT (?!NULL\b)", "IS DISTINCT FROM ", out)
    out = re.sub(r"\bINDEX temp\.", "INDEX ", out)
    return re.sub(r"\btemp\.", "pg_temp.", out)


def lock_key(account: str) -> int:
    """The advisory-lock key (signed 64-bit) of ``account``'s run lock."""
    digest = hashlib.sha256(b"tasknotes run lock\0" + account.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgSession:
    """A psycopg connection with the sqlite3 call surface the ledger's statements use.

    Errors: a lost connection is RunAborted (exit 3; what was in flight is ambiguous),
    a deadlock or serialization failure Conflict (exit 3 if not retried away: see
    ``retrying``), any other database error StateError; each one line naming
    host:port/database.
    """

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], url: str) -> None:
        self.conn = conn
        self.url = url
        self.commits = 0  # outermost transactions committed (PgLedger counts them)
        self._backoff = Backoff(*CONFLICT_BACKOFF)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        statement, values = to_postgres(sql).encode(), tuple(params) or None

        def run() -> psycopg.Cursor[tuple[Any, ...]]:
            with self.errors():
                cur = self.conn.cursor()
                cur.execute(statement, values)
                return cur
        # outside a transaction the statement is one of its own: it may run again whole;
        # a read (SELECT, SHOW) changes nothing, so it is no commit a retry must not repeat
        if not self.idle():
            return run()
        return self.retrying(run, "a statement", counted=not _reads(statement))

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]
                    ) -> psycopg.Cursor[tuple[Any, ...]]:
        # not run again here: outside a transaction each statement commits by itself
        with self.errors():
            cur = self.conn.cursor()
            cur.executemany(to_postgres(sql).encode(), [tuple(p) for p in params])
            return cur

    def idle(self) -> bool:
        """Whether no transaction (and no pipeline) is open on the session: what starts now
        is an outermost transaction, one that may be run again whole."""
        from psycopg import pq

        return (self.conn.info.transaction_status == pq.TransactionStatus.IDLE
                and self.conn.pgconn.pipeline_status == pq.PipelineStatus.OFF)

    def retrying(self, transaction: Callable[[], T], what: str, *, counted: bool = True) -> T:
        """``transaction()`` (one whole transaction: it begins and ends inside), run again
        from its start when PostgreSQL rolls it back for a conflict (``Conflict``), up to
        ``CONFLICT_TRIES`` tries in all with full-jitter exponential backoff between them;
        one log line per retry (``what`` and the SQLSTATE, nothing of the rows).

        Not retried, the Conflict raised as it is (RunAborted, exit 3): a transaction
        nested in an open one (only the outermost can run again), one during which an
        earlier transaction committed (running it again would repeat that one), or the
        last try's. Only for bodies with no effect outside the database: none of the
        ledger's has one (a request leaves only after the commit that marks it sending).
        ``counted``: whether the transaction, once done, counts as a commit (False for a
        lone read: a method that read, then conflicted, may still run again whole).
        """
        outermost = self.idle()
        for attempt in range(1, CONFLICT_TRIES + 1):
            commits = self.commits
            try:
                done = transaction()
            except Conflict as exc:
                if not outermost or self.commits != commits:
                    raise
                if attempt == CONFLICT_TRIES:
                    raise Conflict(f"{exc}; {what} was tried {attempt} times and conflicted "
                                   "every time with another process writing the same rows; "
                                   "stopped here (nothing of it was written; a run's requests "
                                   "then in flight are ambiguous until its next run)",
                                   exc.sqlstate) from None
                pause = self._backoff.delay(attempt)
                log.warning("state: %s rolled back by PostgreSQL (SQLSTATE %s, try %d of %d); "
                            "running it again in %d ms", what, exc.sqlstate, attempt,
                            CONFLICT_TRIES, round(pause * 1000))
                time.sleep(pause)
            else:
                if outermost and counted:
                    self.commits += 1
                return done
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """psycopg's errors as the package's (see the class docstring)."""
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            if exc.sqlstate in RETRY_SQLSTATES and not (self.conn.closed or self.conn.broken):
                # rolled back whole, nothing of it written (by SQLSTATE: psycopg's classes
                # for 40001 / 40P01 are OperationalError, not TransactionRollback)
                raise Conflict(f"state.url: PostgreSQL at {where(self.url)}: "
                               f"{describe_failure(self.url, exc)} (SQLSTATE {exc.sqlstate})",
                               exc.sqlstate) from None
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                raise self._failure(exc) from None
            # the statement's error: its first line says it
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StateError(f"state.url: PostgreSQL at {where(self.url)}: {first}") from None

    def _failure(self, exc: Exception) -> RunAborted | StateError:
        """An operational error: RunAborted if the connection is gone, else StateError."""
        if self.conn.closed or self.conn.broken:
            return RunAborted(
                f"state.url: lost the connection to PostgreSQL at {where(self.url)}: "
                f"{describe_failure(self.url, exc)}; stopped here (a run's requests then "
                "in flight are ambiguous until its next run)")
        return StateError(f"state.url: PostgreSQL at {where(self.url)}: "
                          f"{describe_failure(self.url, exc)}")


def _reads(statement: bytes) -> bool:
    """Whether a lone statement only reads: a SELECT (not SELECT ... INTO, which creates a
    table, nor one locking rows FOR UPDATE / SHARE) or a SHOW."""
    if _SHOW.match(statement):
        return True
    return bool(_SELECT.match(statement)) and not _WRITES.search(statement)


_SHOW: Final = re.compile(rb"\s*SHOW\b", re.IGNORECASE)
_SELECT: Final = re.compile(rb"\s*SELECT\b", re.IGNORECASE)
_WRITES: Final = re.compile(rb"\bINTO\b|\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY)\b",
                            re.IGNORECASE)


class _OnSession(Protocol):
    _pg: PgSession


S = TypeVar("S", bound=_OnSession)


def retried(what: str) -> Callable[[Callable[Concatenate[S, P], T]],
                                   Callable[Concatenate[S, P], T]]:
    """A method of an object on a ``PgSession`` (its ``_pg``) whose body is one whole
    transaction, run through ``PgSession.retrying`` (``what`` names it in the log line):
    called outside any transaction, a conflict runs it again from its start."""
    def wrap(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
        @functools.wraps(method)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            return self._pg.retrying(lambda: method(self, *args, **kwargs), what)
        return run
    return wrap
