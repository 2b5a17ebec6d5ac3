"""Which state store a command opens: the one place that chooses SQLite or PostgreSQL.

Without ``state.url`` the SQLite ``Ledger`` at ``state.ledger``; with it the
``PgLedger`` in that database (pg_ledger.py), for the config's account. Every command
opens its store here (no module outside pipeline/state/ constructs one), so none can
keep its state somewhere else by mistake. What is returned is typed as the seam
(protocol.py's ``StateStore``): mypy checks both stores against it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.state.sqlite import Ledger

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.state.protocol import StateStore


def uses_postgres(config: RunConfig) -> bool:
    """Whether state lives in PostgreSQL (``state.url`` set)."""
    return config.state.url is not None


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

        return PgLedger(config.state.url.get_secret_value(), config.api.account_id(),
                        config.api.account_names())
    return Ledger(config.state.ledger, synchronous=config.state.synchronous)


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
