"""Shared fixtures: every server here is real (uvicorn on 127.0.0.1), every file on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

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
