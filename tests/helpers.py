"""Helpers for tests: configs on disk, servers on loopback, conditions with deadlines."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn
import yaml

from pipeline.config import RunConfig
from pipeline.emulator import Emulator, EmulatorOptions, note_key
from pipeline.events import SetAside, read_sink_from
from pipeline.runner import Run, RunOptions, RunOutcome
from pipeline.servers import Served, bind, serve_embedded
from pipeline.state.store import existing_store

CREDENTIALS = {
    "client_id": "test-client-id",
    "client_secret": "test-client-secret",
    "access_token": "test-access-token",
}
WEBHOOK_SECRET = "test-webhook-secret"


def config_dict(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A complete config as a dict, state and reports under ``tmp``; sections merged in."""
    base: dict[str, Any] = {
        "input": {"path": str(tmp / "input.csv")},
        "api": {"base_url": "http://127.0.0.1:9", "account": "test_clinic", **CREDENTIALS,
                "timeout_s": 5, "connect_timeout_s": 2},
        "submit": {"concurrency": 4, "rate_per_second": None, "max_attempts": 4,
                   "backoff_base_s": 0.01, "backoff_max_s": 0.05, "drain_timeout_s": 5},
        "state": {"ledger": str(tmp / "state" / "ledger.sqlite")},
        "webhooks": {"sink": str(tmp / "state" / "webhooks.jsonl"), "secret": WEBHOOK_SECRET},
        "report": {"dir": str(tmp / "reports")},
    }
    merged = copy.deepcopy(base)
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def make_config(tmp: Path, **overrides: Any) -> RunConfig:
    return RunConfig.model_validate(config_dict(tmp, **overrides))


def write_config(tmp: Path, name: str = "config.yaml", **overrides: Any) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(config_dict(tmp, **overrides), sort_keys=False))
    return path


def write_csv(path: Path, rows: Sequence[Sequence[str]],
              header: Sequence[str] = ("emr_task_id", "note")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def notes(n: int, prefix: str = "task") -> list[list[str]]:
    """``n`` distinct valid rows."""
    return [[f"{prefix}-{i:05d}", f"Note {i}: called patient, left message, see chart."]
            for i in range(n)]


def emulator_options(**overrides: Any) -> EmulatorOptions:
    values: dict[str, Any] = {**CREDENTIALS, "webhook_secret": WEBHOOK_SECRET,
                              "outcome_delay_ms": (5.0, 30.0), **overrides}
    return EmulatorOptions(**values)


@contextlib.asynccontextmanager
async def serving(app: Any, attach: Callable[[Any], None] | None = None
                  ) -> AsyncIterator[Served]:
    """Serve an ASGI app on a free loopback port for the duration of the block."""
    async with (anyio.create_task_group() as tg,
                serve_embedded(app, tg, attach=attach, grace_s=0.2) as served):
        yield served


@contextlib.asynccontextmanager
async def emulator_running(**overrides: Any) -> AsyncIterator[tuple[Emulator, str]]:
    emulator = Emulator(emulator_options(**overrides))
    async with serving(emulator.app(), attach=lambda s: setattr(emulator, "server", s)) as srv:
        yield emulator, srv.url


def stored_count(emulator: Emulator, task_id: str, note: str) -> int:
    return emulator.stored.get(note_key(task_id, note), 0)


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition that no event can signal (another process's state), with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


def wait_until_healthy(proc: subprocess.Popen[bytes], url: str, log: Path,
                       timeout: float = 30.0) -> None:
    """Wait until the server process ``proc`` answers 200 on ``url``/healthz (its stderr,
    in ``log``, in the failure if it died first)."""

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=timeout, what="the server to listen")


def ledger_rows(config: RunConfig, *columns: str) -> list[tuple[Any, ...]]:
    """Every row of the config's store (every run, in input order) as a tuple of
    ``columns`` (state/protocol.py ``ROW_COLUMNS``), read through the store's public
    ``frame``, so on either backend; [] when there is no store yet."""
    store = existing_store(config)
    if store is None:
        return []
    try:
        frame = store.frame()
    finally:
        store.close()
    return [tuple(None if v != v else v for v in row)  # NaN (a NULL number) as None
            for row in frame[list(columns)].itertuples(index=False, name=None)]


def read_results(report_dir: Path) -> list[dict[str, str]]:
    with (report_dir / "results.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_summary(report_dir: Path) -> dict[str, Any]:
    return json.loads((report_dir / "summary.json").read_text())


class ThreadedServer:
    """An ASGI app on uvicorn in a thread, for tests that drive the sync ``Run`` themselves."""

    def __init__(self, app: Any, attach: Callable[[Any], None] | None = None) -> None:
        self._sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        if attach is not None:
            attach(self.server)
        self._thread = threading.Thread(target=self.server.run, args=([self._sock],),
                                        daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        wait_until(lambda: self.server.started, what="the server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)


class EmulatorThread(ThreadedServer):
    """The emulator, served from a thread; its counters are read directly."""

    def __init__(self, **options: Any) -> None:
        self.emulator = Emulator(emulator_options(**options))
        super().__init__(self.emulator.app(),
                         attach=lambda s: setattr(self.emulator, "server", s))

    def stored(self, task_id: str, note: str) -> int:
        return stored_count(self.emulator, task_id, note)


def run_pipeline(config: RunConfig, *inputs: str, **options: Any) -> RunOutcome:
    """``tasknotes run`` in-process; returns the RunOutcome."""
    return Run(config, RunOptions(inputs=tuple(inputs), progress=False, **options)).execute()


def read_sink(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, envelope) for each event in the sink file; a missing file has none.
    A torn last line, and any other line the codec refuses, is skipped."""
    for number, _, event in read_sink_from(path, 0):
        if not isinstance(event, SetAside):
            yield number, event
