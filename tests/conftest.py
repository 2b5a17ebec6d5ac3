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
