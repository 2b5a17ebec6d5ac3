"""Which state store a command opens: the one place that chooses SQLite or PostgreSQL.

Without ``state.url`` the SQLite ``Ledger`` at ``state.ledger``; with it the
``PgLedger`` in that database (pg_ledger.py), for the config's account. Every command
opens its store here (no module outside pipeline/state/ constructs one), so none can
keep its state somewhere else by mistake. What is returned is typed as the seam
(protocol.py's ``StateStore``): mypy checks both stores against it here.

The sink's events are chosen here too (``open_event_store``): the sink file at
``webhooks.sink``, or with ``state.url`` the database's ``sink_events``
(pg_events.py). The sink, poll and a sandbox run all store events through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import StateError
from pipeline.events import SinkFile
from pipeline.state.pg_events import PgEventStore
from pipeline.state.protocol import POLLED, SIGNED
from pipeline.state.sqlite import Ledger

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.state.protocol import StateStore


def state_location(config: RunConfig) -> str:
    """Where the state is, for people: the ledger's path, or ``PostgreSQL host:port/db``
    (never the password)."""
    if config.state.url is not None:
        from pipeline.state.postgres import where  # noqa: PLC0415 - psycopg is optional

        return f"PostgreSQL {where(config.state.url.get_secret_value())}"
    return str(config.state.ledger)


def open_store(config: RunConfig) -> StateStore:
    """The config's store, created if need be (SQLite: the file; PostgreSQL: the schema).

    Raises StateError (exit 2) if it cannot be used: one line, never a password.
    """
    if config.state.url is not None:
        from pipeline.state.pg_ledger import PgLedger  # noqa: PLC0415 - psycopg is optional

        # the run locks of the accounts' former names too (formerly): a run of a config
        # not yet renamed would otherwise send every note the renamed one sends
        return PgLedger(config.state.url.get_secret_value(), config.api.account_id(),
                        config.api.known_names())
    return Ledger(config.state.ledger, synchronous=config.state.synchronous)


def open_event_store(config: RunConfig, *, polled: bool = False) -> SinkFile | PgEventStore:
    """The store of the sink's events, opened (``close()`` it after): the sink file at
    ``webhooks.sink`` (events.py), or with ``state.url`` that database's ``sink_events``
    (``open_event_table``). ``polled``: the events go in as fetched by ``tasknotes poll``
    (verdict ``polled``) rather than as received signed by the sink.

    Raises StateError (exit 2) if it cannot be opened: one line, never a password.
    """
    if config.state.url is not None:
        return open_event_table(config, verdict=POLLED if polled else SIGNED)
    sink = SinkFile(config.webhooks.sink)
    sink.open()
    return sink


def open_event_table(config: RunConfig, *, verdict: str = SIGNED,
                     application: str = "tasknotes sink") -> PgEventStore:
    """``state.url``'s ``sink_events`` (pg_events.py), opened, its schema current;
    ``application``: the connection's ``application_name`` in PostgreSQL.

    Raises StateError (exit 2) if the database cannot be used, or there is no
    ``state.url``: one line, never a password.
    """
    if config.state.url is None:
        raise StateError("state.url: not set, so no event table in PostgreSQL to open")
    events = PgEventStore(config.state.url.get_secret_value(), verdict=verdict,
                          application=application)
    events.open()
    return events


def existing_store(config: RunConfig, *, readonly: bool = True) -> StateStore | None:
    """The config's store if it has been created (SQLite: the file exists), else None:
    for commands that must not create one. ``readonly`` (SQLite): open it read-only,
    else for writing (prune). PostgreSQL: always the database (its schema is created on
    first use). Raises StateError if it cannot be used."""
    if config.state.url is not None:
        return open_store(config)
    if not readonly:
        return open_store(config) if config.state.ledger.exists() else None
    return Ledger.existing(config.state.ledger)


def has_store(config: RunConfig) -> bool:
    """Whether there is a store to read (PostgreSQL: always; SQLite: the file exists)."""
    return config.state.url is not None or config.state.ledger.exists()
