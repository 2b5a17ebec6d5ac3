"""Which state store a command opens: the one place that chooses SQLite or PostgreSQL.

Without ``state.url`` the SQLite ``Ledger`` at ``state.ledger``; with it the
``PgLedger`` in that database (pg_ledger.py), for the config's account. Every command
opens its store here, so none can keep its state somewhere else by mistake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.state.sqlite import Ledger

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def uses_postgres(config: RunConfig) -> bool:
    """Whether state lives in PostgreSQL (``state.url`` set)."""
    return config.state.url is not None


def state_location(config: RunConfig) -> str:
    """Where the state is, for people: the ledger's path, or ``PostgreSQL host:port/db``
    (never the password)."""
    if config.state.url is not None:
        from pipeline.state.postgres import where  # noqa: PLC0415 - no psycopg needed

        return f"PostgreSQL {where(config.state.url.get_secret_value())}"
    return str(config.state.ledger)


def open_store(config: RunConfig) -> Ledger:
    """The config's store, created if need be (SQLite: the file; PostgreSQL: the schema).

    Raises StateError (exit 2) if it cannot be used: one line, never a password.
    """
    if config.state.url is not None:
        from pipeline.state.pg_ledger import PgLedger  # noqa: PLC0415 - psycopg only here

        return PgLedger(config.state.url.get_secret_value(), config.api.account_id(),
                        config.api.account_names())
    return Ledger(config.state.ledger, synchronous=config.state.synchronous)


def existing_store(config: RunConfig) -> Ledger | None:
    """The config's store if it has been created (SQLite: the file exists; opened read
    only), else None: for commands that must not create one. PostgreSQL: always the
    database (its schema is created on first use)."""
    if config.state.url is not None:
        return open_store(config)
    return Ledger.existing(config.state.ledger)


def has_store(config: RunConfig) -> bool:
    """Whether there is a store to read (PostgreSQL: always; SQLite: the file exists)."""
    return config.state.url is not None or config.state.ledger.exists()


def reader(store: Ledger) -> Ledger:
    """A second, read-only handle on ``store`` (the send reads pending rows on it while
    the store records attempts)."""
    from pipeline.state.pg_ledger import PgLedger  # noqa: PLC0415 - no psycopg needed

    if isinstance(store, PgLedger):
        return store.reader()
    return Ledger(store.path, readonly=True)
