"""The sink's event store on PostgreSQL (``state.url``): table ``sink_events``.

The same contract as the sink file (``events.SinkFile``), so the receiver
(``sink.WebhookReceiver``) treats both alike through ``sink.EventStore``:

- ``append`` returns ``"stored"`` only after the transaction holding the event
  has committed (``synchronous_commit=on``: the WAL is flushed), so a 2xx is
  never given for an event the database can lose;
- group commit (``_group.GroupCommit``): the events arriving while one batch
  commits form the next batch, one INSERT for all of them, its own transaction
  (autocommit): one round trip to the server per batch;
- de-duplicated by event id and by the SHA-256 of the body, by the table's
  unique constraints (``ON CONFLICT DO NOTHING``), so several sinks on one
  database share one truth; a duplicate is ``"duplicate"`` (the sink's 200);
- a batch refused for an event's values is stored row by row: the valid events
  are stored, the refused one gets ``UnreadableEvent`` (the sink's 400);
- a kept connection that fails (a database restart) is replaced and the batch
  tried once more; when the database cannot be reached or the commit still
  fails, every caller of the batch gets ``SinkWriteError`` (the sink's 503); the
  connection is dropped and the next batch connects again, so the sink heals when
  the database returns.

Each row keeps the body exactly as received (``bytea``), its id, its hash, the
verdict under which the sink accepted it (``signature-verified``: only
signed events reach the store) and the receive time to the millisecond.
``export_jsonl`` writes them back as JSON Lines in commit order.

``tasknotes prune`` (pipeline/retention.py) removes old note text here through
``prune_lock`` (one prune at a time per database: an advisory lock) and
``prune_bodies`` (the stored bodies rewritten in batches, each batch one ``UPDATE``
in its own transaction); which body loses what is retention.py's rule.

Over 400 lines because the event store's whole life on PostgreSQL is one class:
storing (group commit, the row-by-row fallback, reconnecting), the health probe,
export and prune; split, each part would reach into the others' connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO, Final, cast

from pipeline._group import GroupCommit
from pipeline.errors import StateError
from pipeline.events import (
    SinkWriteError,
    UnreadableEvent,
    Verdict,
    decode_event,
    encode_event,
)
from pipeline.state.postgres import connect, describe_failure, open_state, where
from pipeline.state.protocol import SIGNED

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_PRUNE_LOCK: Final = 0x746E7072756E65  # "tnprune": one prune at a time per database

# %b: the arrays go in PostgreSQL's binary format; as text every body would be hex-escaped
# and quoted into an array literal first (4x the sink's CPU per event for this statement).
_INSERT: Final = b"""
    INSERT INTO sink_events (event_id, body_sha256, body, verdict, received_at)
    SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bytea[], %b::text[], %b::timestamptz[])
    ON CONFLICT DO NOTHING
    RETURNING event_id, body_sha256
"""


@dataclass(slots=True)
class _Row:
    body: bytes
    event_id: str
    digest: bytes
    received_at: datetime
    verdict: Verdict = field(default="stored")
    refused: str | None = None  # why PostgreSQL cannot hold this row (no values of it)


class PgEventStore:
    """Durable, de-duplicated event store in PostgreSQL (module docstring).

    ``open()`` connects and migrates the schema (StateError, exit 2, naming
    host:port/database if it cannot); ``run()`` is the group-commit loop (start it
    in a task group); ``append(body, event_id)`` as ``SinkFile.append``;
    ``probe()`` for ``/healthz``; ``close()`` drops the connection.
    """

    def __init__(self, url: str, *, verdict: str = SIGNED,
                 application: str = "tasknotes sink") -> None:
        self._url = url
        self._verdict = verdict
        self._application = application  # PostgreSQL's application_name of its connection
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._group: GroupCommit[_Row] = GroupCommit(self._commit, stop_on_error=False)
        self.broken: str | None = None
        self._probe_conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._probe_lock = threading.Lock()

    @property
    def where(self) -> str:
        """host:port/database (never the password)."""
        return where(self._url)

    @property
    def destination(self) -> str:
        """Where the events go, for people: "PostgreSQL at host:port/database"."""
        return f"PostgreSQL at {self.where}"

    def open(self) -> None:
        self._conn = open_state(self._url, application=self._application)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._close_probe()

    def count(self) -> int:
        """Events stored (all sinks on this database). Raises StateError if unreachable."""
        import psycopg

        try:
            row = self._connection().execute("SELECT count(*) FROM sink_events").fetchone()
        except psycopg.Error as exc:
            self.close()
            raise SinkWriteError(f"PostgreSQL at {self.where}: "
                                 f"{describe_failure(self._url, exc)}") from None
        return int(str(row[0])) if row else 0

    async def run(self) -> None:
        await self._group.run()

    def stop(self) -> None:
        self._group.close()

    async def append(self, body: bytes, event_id: str, *, received_at: str | None = None
                     ) -> Verdict:
        """Store ``body`` (a request body ``events.decode_event`` accepts) unless an event
        with this id or this exact body is stored already. ``received_at``: when the sink
        had the whole delivery (ISO 8601 UTC with milliseconds, ``events.receive_time``);
        now if not given.

        Returns "stored" once committed, "duplicate" if it was there already.
        Raises SinkWriteError if it could not be stored (the next call tries again), and
        UnreadableEvent ``unstorable`` if PostgreSQL refuses this event's values (never
        storable: the receiver's 400; the other events of its batch are stored).
        """
        now = (datetime.fromisoformat(received_at) if received_at is not None
               else datetime.now(UTC))
        received = now.replace(microsecond=now.microsecond // 1000 * 1000)
        row = _Row(body, event_id, hashlib.sha256(body).digest(), received)
        try:
            await self._group.put(row)
        except SinkWriteError as exc:
            if self.broken is None:
                log.error("%s; answering 503 and trying again with each delivery", exc)  # noqa: TRY400 - no traceback: the cause is the database
            self.broken = str(exc)
            raise
        if self.broken is not None:
            log.warning("PostgreSQL at %s stores events again", self.where)
            self.broken = None
        if row.refused is not None:
            raise UnreadableEvent("unstorable", f"PostgreSQL cannot store it: {row.refused}")
        return row.verdict

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url, application=self._application)
        return self._conn

    @contextlib.contextmanager
    def prune_lock(self) -> Iterator[None]:
        """Hold the database's prune lock while the block runs: one ``tasknotes prune`` at
        a time per database (a session advisory lock on this store's connection, so a
        prune that dies lets go of it with its connection).

        Raises StateError (one line, no password) when another prune holds it, or when
        the database cannot be used.
        """
        import psycopg

        conn = self._connection()
        try:
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (_PRUNE_LOCK,)).fetchone()
        except psycopg.Error as exc:
            raise self._prune_failed(exc) from None
        if not (locked and locked[0]):
            raise StateError(f"another tasknotes prune is pruning the events in PostgreSQL "
                             f"at {self.where}")
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_PRUNE_LOCK,))

    def prune_bodies(self, rewrite: Callable[[int, bytes], bytes | None], *,
                     dry_run: bool = False, batch: int) -> tuple[int, int]:
        """Rewrite the stored bodies, in commit order, ``batch`` events at a time (call it
        inside ``prune_lock``).

        ``rewrite(seq, body)`` gives the body to store instead, or None to keep it; ``seq``
        is the event's commit-order number, the one the ledger's ``sink_position`` counts
        in. Each batch's new bodies are written by one ``UPDATE`` in its own transaction:
        a prune killed midway leaves each batch done whole or not at all, and the next
        one carries on. Only ``body`` changes: the event id, ``body_sha256`` (the hash of
        the body as received, so a redelivery of the original is still a duplicate), the
        verdict and the receive time stay. An event inserted meanwhile is read if its
        ``seq`` is past the last batch read (the sink's inserts touch no stored row).
        With ``dry_run`` nothing is written.

        Returns the stored bodies' bytes before and after (``dry_run``: after = before).
        Raises StateError (one line, no password) when the database cannot be used.
        """
        import psycopg

        conn = self._connection()
        before = after = last = 0
        try:
            while found := conn.execute(
                    "SELECT seq, body FROM sink_events WHERE seq > %s ORDER BY seq LIMIT %s",
                    (last, batch)).fetchall():
                changed: list[tuple[int, bytes]] = []
                for seq, body in found:
                    raw = bytes(cast("bytes", body))
                    new = rewrite(int(str(seq)), raw)
                    before += len(raw)
                    after += len(raw if new is None else new)
                    if new is not None:
                        changed.append((int(str(seq)), new))
                if changed and not dry_run:
                    with conn.transaction():  # one batch: all of it, or (killed) none of it
                        conn.execute(
                            "UPDATE sink_events s SET body = u.body FROM unnest(%s::bigint[],"
                            " %s::bytea[]) AS u(seq, body) WHERE s.seq = u.seq",
                            ([c[0] for c in changed], [c[1] for c in changed]))
                last = int(str(found[-1][0]))
        except psycopg.Error as exc:
            raise self._prune_failed(exc) from None
        return before, before if dry_run else after

    def _prune_failed(self, exc: BaseException) -> StateError:
        return StateError(f"state.url: cannot prune the events in PostgreSQL at {self.where}: "
                          f"{describe_failure(self._url, exc)}")

    def _commit(self, rows: list[_Row]) -> None:
        """Runs in a worker thread: one INSERT, committed by itself, for the batch.

        Rows repeating an id or a body of an earlier row in the batch are marked
        duplicates first; the INSERT skips those already in the table.

        - A batch refused for its data (``data_errors``: a value PostgreSQL cannot
          hold, the connection still good) is stored again row by row, so the valid
          events are stored and only the refused rows get ``refused`` (the sink's 400).
        - A kept connection that fails (the server restarted, an idle connection was
          cut) is replaced and the batch tried once more before giving up: the INSERT
          is idempotent (``ON CONFLICT DO NOTHING``), so a batch the server committed
          before the connection broke is found, not stored twice.

        Raises SinkWriteError (and drops the connection) when the database fails.
        """
        import psycopg

        # refused for its values, not for the database's state: a data exception (SQLSTATE
        # class 22, e.g. NUL in text) or a program limit (class 54, an index entry too big)
        data_errors = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)
        fresh: list[_Row] = []
        ids: set[str] = set()
        digests: set[bytes] = set()
        for row in rows:
            row.verdict = "stored"
            row.refused = None
            if row.event_id in ids or row.digest in digests:
                row.verdict = "duplicate"
                continue
            ids.add(row.event_id)
            digests.add(row.digest)
            fresh.append(row)
        for last_try in (False, True):
            kept = self._conn is not None and not self._conn.closed
            try:
                conn = self._connection()
                try:
                    inserted = self._insert(conn, fresh)
                except data_errors as exc:
                    if conn.broken or conn.closed:
                        raise
                    log.warning("PostgreSQL at %s refused a batch of %d event(s) (%s); "
                                "storing them one by one", self.where, len(fresh),
                                describe_failure(self._url, exc))
                    inserted = self._insert_each(conn, fresh, data_errors)
            except StateError as exc:  # from connect(): names host:port/database already
                self.close()
                raise SinkWriteError(str(exc)) from None
            except (psycopg.Error, OSError) as exc:
                self.close()
                reason = describe_failure(self._url, exc)
                if kept and not last_try:
                    log.info("PostgreSQL at %s: the kept connection failed (%s); connecting "
                             "again and storing the batch once more", self.where, reason)
                    continue
                raise SinkWriteError(f"PostgreSQL at {self.where} cannot store events: "
                                     f"{reason}") from None
            break
        for row in fresh:
            if row.refused is None and (row.event_id, row.digest) not in inserted:
                row.verdict = "duplicate"

    def _insert(self, conn: psycopg.Connection[tuple[object, ...]], rows: list[_Row]
                ) -> set[tuple[str, bytes]]:
        """INSERT ``rows`` in one statement; the (event id, digest) pairs inserted.

        The connection is in autocommit (``postgres.connect``), so the statement is its
        own transaction, committed at its Sync: one round trip, not three (no BEGIN and
        COMMIT of their own). ``execute`` returns only after the server's ReadyForQuery,
        which follows the commit and its WAL flush (``synchronous_commit=on``); a commit
        that fails is raised here like any other error of the statement.
        """
        assert conn.autocommit, "one statement is one transaction only in autocommit"
        found = conn.execute(
            _INSERT, ([r.event_id for r in rows], [r.digest for r in rows],
                      [r.body for r in rows], [self._verdict] * len(rows),
                      [r.received_at for r in rows])).fetchall()
        return {(str(i), bytes(cast("bytes", d))) for i, d in found}

    def _insert_each(self, conn: psycopg.Connection[tuple[object, ...]], rows: list[_Row],
                     data_errors: tuple[type[Exception], ...]) -> set[tuple[str, bytes]]:
        """``_insert`` one row per transaction; a row refused for its data gets ``refused``
        (why, without its values). A connection failure propagates."""
        inserted: set[tuple[str, bytes]] = set()
        for row in rows:
            try:
                inserted |= self._insert(conn, [row])
            except data_errors as exc:
                if conn.broken or conn.closed:
                    raise
                row.refused = describe_failure(self._url, exc)
        return inserted

    def probe(self) -> str | None:
        """None if events can be stored now, else why not (for ``/healthz``).

        Asks the database every time (``SELECT 1`` on a connection of its own, kept
        between probes), not only after a failed store: a database that went down while
        no webhook arrived turns ``/healthz`` 503 at once, so a load balancer or monitor
        knows before Cobalt's next delivery fails. A kept connection the server has
        dropped (a restart) is replaced once before answering, so the reason given is
        today's, not the one of the last outage.
        """
        with self._probe_lock:
            for fresh in (False, True):
                try:
                    if fresh or self._probe_conn is None or self._probe_conn.closed:
                        self._close_probe()
                        self._probe_conn = connect(self._url,
                                                   application="tasknotes sink probe")
                    self._probe_conn.execute("SELECT 1")
                except StateError as exc:  # from connect(): one line, no password
                    self._close_probe()
                    return str(exc)
                except Exception as exc:  # noqa: BLE001 - any driver failure means not healthy
                    self._close_probe()
                    if fresh:
                        return f"PostgreSQL at {self.where}: {describe_failure(self._url, exc)}"
                    continue
                return None
        return None  # not reached: the fresh attempt returns

    def _close_probe(self) -> None:
        if self._probe_conn is not None:
            with contextlib.suppress(Exception):
                self._probe_conn.close()
            self._probe_conn = None


def exported_line(body: bytes) -> bytes:
    """One JSON Lines line for a stored body: the body as received when it holds no line
    break, else re-encoded compactly (as the sink file stores such a body)."""
    if b"\n" in body or b"\r" in body:
        body = encode_event(decode_event(body))
    return body + b"\n"


def iter_events(url: str, *, batch: int = 1000) -> Iterator[bytes]:
    """The stored bodies in commit order (``seq``), read through a server-side cursor.

    Raises StateError (one line, no password) when the database cannot be read.
    """
    import psycopg

    conn = open_state(url, application="tasknotes export-events")
    try:
        with conn.transaction(), conn.cursor(name="tasknotes_export") as cur:
            cur.itersize = batch
            cur.execute("SELECT body FROM sink_events ORDER BY seq")
            for (body,) in cur:
                assert isinstance(body, bytes | memoryview)
                yield bytes(body)
    except psycopg.Error as exc:
        raise StateError(f"state.url: cannot read events from PostgreSQL at {where(url)}: "
                         f"{describe_failure(url, exc)}") from None
    finally:
        conn.close()


def export_jsonl(url: str, out: BinaryIO) -> int:
    """Write every stored event to ``out`` as JSON Lines (``exported_line``); return the count."""
    n = 0
    for body in iter_events(url):
        out.write(exported_line(body))
        n += 1
    return n


