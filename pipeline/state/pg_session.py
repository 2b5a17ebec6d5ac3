"""The PostgreSQL session under ``PgLedger`` (pg_ledger.py): SQLite's dialect rewritten
for PostgreSQL, the sqlite3 call surface the ledger's statements use, and psycopg's
errors turned into the package's."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import RunAborted, StateError
from pipeline.state.postgres import describe_failure, where

if TYPE_CHECKING:
    import psycopg


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
    any other database error StateError; both one line naming host:port/database.
    """

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], url: str) -> None:
        self.conn = conn
        self.url = url

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        with self.errors():
            cur = self.conn.cursor()
            cur.execute(to_postgres(sql).encode(), tuple(params) or None)
            return cur

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]
                    ) -> psycopg.Cursor[tuple[Any, ...]]:
        with self.errors():
            cur = self.conn.cursor()
            cur.executemany(to_postgres(sql).encode(), [tuple(p) for p in params])
            return cur

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """psycopg's errors as the package's (see the class docstring)."""
        import psycopg

        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if self.conn.closed or self.conn.broken:
                raise RunAborted(
                    f"state.url: lost the connection to PostgreSQL at {where(self.url)}: "
                    f"{describe_failure(self.url, exc)}; requests in flight are ambiguous "
                    "until the next run") from None
            raise StateError(f"state.url: PostgreSQL at {where(self.url)}: "
                             f"{describe_failure(self.url, exc)}") from None
        except psycopg.Error as exc:  # the statement's error: its first line says it
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StateError(f"state.url: PostgreSQL at {where(self.url)}: {first}") from None
