"""Shared fixtures: every server here is real (uvicorn on 127.0.0.1), every file on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pg import PgCluster, why_no_cluster

DATA = Path(__file__).parent / "data"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own directory: state/ and reports/ land in tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL server for the session (tests/pg.py); skipped with the reason
    when none can be started here."""
    reason = why_no_cluster()
    if reason is not None:
        pytest.skip(reason)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database on ``pg_cluster`` for one test (dropped after): its URL."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The config's state section on each backend: the local ledger, or ``state.url`` on a
    fresh database of the throwaway server. A test that takes it runs on both."""
    return {} if request.param == "sqlite" else {"url": request.getfixturevalue("pg_url")}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def book(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ``test_reconcile.Book`` on each backend: the join rules must say the same on both."""
    from test_reconcile import Book  # noqa: PLC0415 - a test module, imported when used

    pg_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    made = Book(tmp_path, pg_url=pg_url)
    yield made
    made.ledger.close()
