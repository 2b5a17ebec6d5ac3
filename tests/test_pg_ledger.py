"""The ledger on PostgreSQL (``state.url``), against a real server (tests/pg.py), a real
``tasknotes sink`` process and the Cobalt emulator: runs from directories with no local
state, the per-account run lock, a crash's in-flight rows, a lost database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from helpers import (
    CREDENTIALS,
    WEBHOOK_SECRET,
    EmulatorThread,
    config_dict,
    free_port,
    make_config,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    wait_until_healthy,
    write_config,
    write_csv,
)
from pipeline import jobs
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import RunAborted, StateError
from pipeline.state import Ledger, NewRow, pg_migrate, row_key
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.postgres import connect, open_state
from pipeline.state.store import open_store

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def sink_process(home: Path, pg_url: str | None) -> Iterator[str]:
    """``tasknotes sink`` in its own process, from ``home``: its events in ``pg_url``, or
    (None) in its sink file under ``home``; yields the webhook URL."""
    home.mkdir(exist_ok=True)
    config = write_config(home, state={"url": "${TASKNOTES_STATE_URL}"} if pg_url else {})
    port = free_port()
    log = home / "sink.log"
    env = {**os.environ, **({"TASKNOTES_STATE_URL": pg_url} if pg_url else {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=out, cwd=home, env=env)
    url = f"http://127.0.0.1:{port}"

    try:
        wait_until_healthy(proc, url, log)
        yield f"{url}/webhooks/cobalt"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def sink(pg_url: str, tmp_path: Path) -> Iterator[str]:
    """A sink process in its own directory, its events in ``pg_url``: the webhook URL."""
    with sink_process(tmp_path / "sink-host", pg_url) as url:
        yield url


def worker(tmp_path: Path, name: str, pg_url: str, api: str, account: str = "test_clinic",
           **sections: Any) -> RunConfig:
    """A worker's config in its own directory: state in ``pg_url``, no ledger or sink file."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    return make_config(home, api={"base_url": api, "account": account},
                       state={"url": pg_url, "ledger": str(home / "state" / "ledger.sqlite")},
                       **sections)


def password(url: str) -> str:
    """The password in a postgresql:// URL (it must never be printed)."""
    secret = urlsplit(url).password
    assert secret
    return secret


def sink_count(pg_url: str) -> int:
    with connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM sink_events").fetchone()
    return int(row[0]) if row else 0


def worker_file(tmp_path: Path, name: str, api: str, account: str = "test_clinic") -> Path:
    """A worker's config file in its own directory, state.url from the environment."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    return write_config(home, api={"base_url": api, "account": account},
                        state={"url": "${TASKNOTES_STATE_URL}"})


def start_run(config: Path, source: Path, pg_url: str) -> subprocess.Popen[bytes]:
    """``tasknotes run`` as its own process, from the config's directory."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-q", "run", str(config), "--input", str(source)],
        cwd=config.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "TASKNOTES_STATE_URL": pg_url})


def statuses(pg_url: str) -> dict[str, int]:
    with open_state(pg_url) as conn:
        return {str(s): int(n) for s, n in conn.execute(  # type: ignore[misc]
            "SELECT status, count(*) FROM rows GROUP BY status").fetchall()}


def test_a_second_run_on_the_account_is_refused_naming_the_holder(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "input.csv", notes(3))
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    holder = PgLedger(pg_url, "test_clinic")
    holder.lock()
    holder.start_run("run-of-the-holder", "test_clinic", "fp", {})
    try:
        with EmulatorThread() as api:
            config = worker_file(tmp_path, "worker-b", api.url)
            assert main(["-q", "run", str(config), "--input", str(source)]) == 2
            err = capsys.readouterr().err
            assert "holds the run lock of account test_clinic" in err
            assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
            assert "run run-of-the-holder" in err
            assert password(pg_url) not in err  # never the password
            assert api.emulator.requests == 0
            other = worker_file(tmp_path, "worker-c", api.url, account="other_clinic")
            assert main(["-q", "run", str(other), "--input", str(source)]) in (0, 1)
            assert api.emulator.requests == 3
        # any worker, of any account, sees the run live while its session holds the lock
        onlooker = PgLedger(pg_url, "other_clinic")
        assert onlooker.runs_in_progress() == ["run-of-the-holder"]
        assert onlooker.effective_state(onlooker.run("run-of-the-holder")) == "running"
        assert onlooker.lock_holder() is None  # other_clinic's own lock is free
    finally:
        holder.close()
    # the server ends the holder's session (and lets go of its lock) just after the close
    wait_until(lambda: onlooker.runs_in_progress() == [], what="the holder's session to end")
    assert onlooker.effective_state(onlooker.run("run-of-the-holder")) == "crashed"
    onlooker.close()
    with EmulatorThread() as api:  # the holder's session ended: the lock is free
        config = worker_file(tmp_path, "worker-b", api.url)
        assert main(["-q", "run", str(config), "--input", str(source)]) in (0, 1)
        assert api.emulator.requests == 3


def several(tmp_path: Path, name: str, pg_url: str, api: str, order: tuple[str, ...]
            ) -> RunConfig:
    """A several-clinic worker config (api.accounts in ``order``), state in ``pg_url``."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    data = config_dict(home, state={"url": pg_url})
    data["api"] = {"base_url": api, "client_id": CREDENTIALS["client_id"],
                   "client_secret": CREDENTIALS["client_secret"],
                   "accounts": {a: {"access_token": f"tok-{a}"} for a in order}}
    data["input"]["columns"] = {"emr_task_id": "emr_task_id", "note": "note",
                                "account": "clinic"}
    return RunConfig.model_validate(data)


def test_the_run_lock_is_the_account_however_a_config_names_it(
        pg_url: str, tmp_path: Path) -> None:
    """The lock follows the ledger key's account (attacker finding: two configs naming the
    same clinics differently both sent every note): another order of api.accounts, one
    clinic of a several-clinic config, the name in another Unicode form; an unrelated
    account still runs."""
    nfd, nfc = "Cli\u0301nica Norte", "Cl\u00ednica Norte"
    holder = open_store(several(tmp_path, "a", pg_url, "http://127.0.0.1:9",
                                ("north", "south", nfd)))
    holder.lock()
    holder.start_run("run-of-the-holder", "north,south," + nfd, "fp", {})
    try:
        same = [several(tmp_path, "b", pg_url, "http://127.0.0.1:9", (nfd, "south", "north")),
                worker(tmp_path, "c", pg_url, "http://127.0.0.1:9", account="south"),
                worker(tmp_path, "d", pg_url, "http://127.0.0.1:9", account=nfc)]
        for config in same:
            second = open_store(config)
            with pytest.raises(StateError, match=r"run run-of-the-holder, .*\) holds the run "
                                                 r"lock of account "):
                second.lock()
            assert second.lock_holder() == os.getpid()
            assert second.runs_in_progress() == ["run-of-the-holder"]
            second.close()
        rows = [["t-1", "Called back, see chart.", "north"]]
        source = write_csv(tmp_path / "input.csv", rows, header=("emr_task_id", "note",
                                                                  "clinic"))
        with EmulatorThread() as api:  # end to end: refused before anything is sent
            with pytest.raises(StateError):
                jobs.run(several(tmp_path, "b", pg_url, api.url, ("south", "north", nfc)),
                         inputs=(str(source),))
            assert api.emulator.requests == 0
        other = open_store(worker(tmp_path, "e", pg_url, "http://127.0.0.1:9",
                                  account="east"))
        other.lock()  # another clinic is not held up
        other.close()
    finally:
        holder.close()


def test_kill_9_leaves_the_in_flight_rows_ambiguous_for_a_run_on_another_host(
        pg_url: str, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "input.csv", notes(20))
    with EmulatorThread(latency_ms=(60_000.0, 60_000.0)) as slow:
        config = worker_file(tmp_path, "worker-a", slow.url)
        proc = start_run(config, source, pg_url)
        try:
            wait_until(lambda: statuses(pg_url).get("sending", 0) == 4, timeout=60,
                       what="4 requests in flight")
        finally:
            proc.kill()  # SIGKILL: no chance to record anything
            proc.communicate(timeout=30)
    assert statuses(pg_url) == {"sending": 4, "pending": 16}
    with EmulatorThread() as api:
        config = worker(tmp_path, "worker-b", pg_url, api.url)
        outcome = run_pipeline(config, str(source))
        assert api.emulator.requests == 16  # the 4 in doubt are held, not sent blind
    found = statuses(pg_url)
    assert found["ambiguous"] == 4
    assert found["held"] == 4
    with connect(pg_url) as conn:
        states = dict(conn.execute("SELECT run_id, state FROM runs").fetchall())
    assert sorted(states.values()) == ["crashed", "finished"]
    assert states[outcome.run_id] == "finished"


def test_losing_the_database_mid_run_is_exit_3_and_the_in_flight_rows_ambiguous(
        pg_url: str, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "input.csv", notes(20))
    with EmulatorThread(latency_ms=(1500.0, 1500.0)) as slow:
        config = worker_file(tmp_path, "worker-a", slow.url)
        proc = start_run(config, source, pg_url)
        try:
            wait_until(lambda: statuses(pg_url).get("sending", 0) == 4, timeout=60,
                       what="4 requests in flight")
            with connect(pg_url) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert proc.returncode == 3, err.decode()
    text = err.decode()
    assert "lost the connection to PostgreSQL" in text
    assert "Traceback" not in text
    assert password(pg_url) not in text
    with EmulatorThread() as api:
        run_pipeline(worker(tmp_path, "worker-b", pg_url, api.url), str(source))
        assert api.emulator.requests == 16
    assert statuses(pg_url)["ambiguous"] == 4


def test_the_database_gone_once_the_run_is_under_way_is_exit_3_not_2(
        pg_cluster: Any, pg_url: str) -> None:
    """Between the scan (rows written) and the first send the run opens its second
    connection: the database gone by then is RunAborted (exit 3: rows stay pending for
    the next run), not the exit 2 of a database never reached (newcomer finding)."""
    store = PgLedger(pg_url, "test_clinic")
    try:
        pg_cluster.stop("fast")
        with pytest.raises(RunAborted, match="the run stops here") as caught:
            store.reader()
        assert caught.value.exit_code == 3
        assert password(pg_url) not in str(caught.value)
    finally:
        store.close()
        if not pg_cluster.ready():
            pg_cluster.start()


@contextlib.contextmanager
def emulator_process(home: Path, webhooks: str, *extra: str) -> Iterator[str]:
    """``tasknotes emulator`` in its own process, delivering webhooks to ``webhooks``;
    yields its base URL (``/_emulator/stats`` counts what it was sent)."""
    home.mkdir(exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "pipeline", "-q", "emulator", "--port", str(port),
            "--webhook-url", webhooks, "--webhook-secret", WEBHOOK_SECRET,
            "--client-id", CREDENTIALS["client_id"],
            "--client-secret", CREDENTIALS["client_secret"],
            "--access-token", CREDENTIALS["access_token"], "--outcome-delay-ms", "5,30", *extra]
    with (home / "emulator.log").open("wb") as out:
        proc = subprocess.Popen(argv, cwd=home, stdout=subprocess.DEVNULL, stderr=out)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (home / "emulator.log").read_text()
        try:
            return httpx.get(f"{url}/_emulator/stats", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30, what="the emulator to listen")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_done_means_one_database_for_a_sink_host_and_fresh_workers(
        pg_url: str, sink: str, tmp_path: Path) -> None:
    """The issue's acceptance test: ``tasknotes sink``, ``tasknotes emulator`` and every
    ``tasknotes run`` are processes of their own, each worker in a directory of its own
    with no local state, all pointed at one database."""
    first_input = write_csv(tmp_path / "first.csv", notes(30, "first"))
    second_rows = notes(40, "second")
    second_input = write_csv(tmp_path / "second.csv", second_rows)

    def stats() -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{api}/_emulator/stats", timeout=5).json()
        return found

    with emulator_process(tmp_path / "emulator-host", sink, "--latency-ms", "50") as api:
        # the first worker sends and confirms
        config = worker_file(tmp_path, "worker-a", api)
        proc = start_run(config, first_input, pg_url)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 1), err.decode()
        assert stats()["requests"] == 30
        wait_until(lambda: sink_count(pg_url) == 30, timeout=60, what="30 webhooks stored")
        env = {**os.environ, "TASKNOTES_STATE_URL": pg_url}
        done = subprocess.run([sys.executable, "-m", "pipeline", "-q", "reconcile", str(config)],
                              cwd=config.parent, env=env, capture_output=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert statuses(pg_url) == {"accepted": 30}
        with open_state(pg_url) as conn:
            outcomes = conn.execute("SELECT outcome, count(*) FROM rows GROUP BY outcome")
            assert dict(outcomes.fetchall()) == {"created": 30}

        # a fresh worker rerunning the same input sends nothing
        proc = start_run(worker_file(tmp_path, "worker-b", api), first_input, pg_url)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert stats()["requests"] == 30
        assert statuses(pg_url) == {"accepted": 30, "already_sent": 30}

        # two workers started together on a new input store every note exactly once
        procs = [start_run(worker_file(tmp_path, name, api), second_input, pg_url)
                 for name in ("worker-c", "worker-d")]
        codes, errs = [], []
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            codes.append(proc.returncode)
            errs.append(err.decode())
        found = stats()
    assert found["requests"] == 70
    assert found["stored_total"] == 70
    assert all(n == 1 for n in found["stored"].values())
    assert 3 not in codes, errs
    refused = [e for c, e in zip(codes, errs, strict=True) if c == 2]
    assert len(refused) <= 1, errs
    assert all("holds the run lock of account test_clinic" in e for e in refused)
    for name in ("worker-a", "worker-b", "worker-c", "worker-d"):
        assert not (tmp_path / name / "state").exists()  # no local state at all


def test_migrate_state_copies_the_history_so_a_rerun_on_postgres_resends_nothing_sent(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = notes(10)
    source = write_csv(tmp_path / "input.csv", rows)
    old = tmp_path / "old-install"  # SQLite ledger and sink file, as before state.url
    with sink_process(old, None) as webhooks, EmulatorThread(
            webhook_url=webhooks, missing_tasks=frozenset({"task-00003"})) as api:
        embedded = make_config(old)
        first = run_pipeline(embedded.model_copy(update={"api": embedded.api.model_copy(
            update={"base_url": api.url})}), str(source))
        assert api.emulator.requests == 10
        sink_file = embedded.webhooks.sink
        wait_until(lambda: sink_file.exists() and len(sink_file.read_bytes().splitlines()) == 10,
                   timeout=30, what="10 outcome events in the sink file")
    # The SQLite mirror reads all 10 (and tallies them); then a line comes that it has not
    # read: an event of another type.
    jobs.reconcile(embedded, first.run_id)
    with sink_file.open("ab") as fh:
        fh.write(b'{"id":"evt_late","type":"appointment.updated","job_id":"1","data":{}}\n')
    # Migrated from a copy whose lines are in another order (as a merge of rotated files
    # gives): the ledger's position says nothing of it, yet every event the SQLite mirror
    # holds is known by its id, and counted once.
    copied = tmp_path / "copied.jsonl"
    lines = sink_file.read_bytes().splitlines(keepends=True)
    copied.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = worker_file(tmp_path, "worker-a", "http://127.0.0.1:9")
    argv = ["-q", "migrate-state", str(config), "--from-sqlite", str(embedded.state.ledger),
            "--sink", str(copied)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 runs (10 rows)" in out
    assert "sink " in out
    assert ": 11 events copied; 0 were" in out
    assert main(argv) == 0  # again: nothing twice
    out = capsys.readouterr().out
    assert "0 runs (0 rows)" in out
    assert "1 runs were in the database already" in out
    assert ": 0 events copied; 11 were" in out
    assert statuses(pg_url) == {"accepted": 10}

    with EmulatorThread() as api:  # task-00003 exists now
        again = run_pipeline(worker(tmp_path, "worker-a", pg_url, api.url), str(source))
        # only the note that failed in the EMR (its event came from the copied sink file)
        assert api.emulator.requests == 1
        assert api.stored("task-00003", rows[3][1]) == 1
    results = read_results(tmp_path / "worker-a" / "reports" / again.run_id)
    assert sorted(r["final_status"] for r in results) == sorted(
        ["skipped_already_sent"] * 9 + ["awaiting_outcome"])
    earlier = jobs.reconcile(worker(tmp_path, "worker-a", pg_url, "http://127.0.0.1:9"),
                             first.run_id)
    assert earlier.runs[0].report is not None
    statuses_of_first = {r["emr_task_id"]: r["final_status"] for r in read_results(
        tmp_path / "worker-a" / "reports" / first.run_id)}
    assert statuses_of_first["task-00000"] == "confirmed"  # the copied sink events count
    # What the SQLite mirror had read is counted once, what it had not read is counted
    # (the late line); the same figures as the SQLite ledger reading the same file.
    jobs.reconcile(embedded, first.run_id)
    on_sqlite = json.loads((old / "reports" / first.run_id / "summary.json").read_text())
    on_pg = json.loads((tmp_path / "worker-a" / "reports" / first.run_id / "summary.json"
                        ).read_text())
    assert on_pg["events"] == on_sqlite["events"]
    assert on_pg["events"]["other_types"] == {"appointment.updated": 1}
    assert on_pg["events"]["repeated_deliveries"] == 0


def test_migrate_state_refuses_a_database_whose_rows_use_the_same_ids(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "input.csv", notes(2))
    with EmulatorThread() as api:
        run_pipeline(make_config(tmp_path / "old", api={"base_url": api.url}), str(source))
        run_pipeline(worker(tmp_path, "worker-a", pg_url, api.url, "other_clinic"),
                     str(source))
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = worker_file(tmp_path, "worker-b", "http://127.0.0.1:9")
    ledger = tmp_path / "old" / "state" / "ledger.sqlite"
    assert main(["-q", "migrate-state", str(config), "--from-sqlite", str(ledger)]) == 2
    assert "already has rows with the ids of the ledger's rows" in capsys.readouterr().err
    assert statuses(pg_url) == {"accepted": 2}  # nothing copied


def test_migrate_state_from_a_file_that_is_not_a_ledger_or_not_a_sink_copies_nothing(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A CSV or an empty file given as the ledger, or a CSV given as the sink file: one line
    naming the path, exit 2, nothing written to the database (not even its schema)."""
    source = write_csv(tmp_path / "input.csv", notes(3))
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = worker_file(tmp_path, "worker-a", "http://127.0.0.1:9")
    for wrong in (source, empty):
        assert main(["-q", "migrate-state", str(config), "--from-sqlite", str(wrong)]) == 2
        err = capsys.readouterr().err
        assert f"--from-sqlite: {wrong}" in err
        assert "Traceback" not in err
    with connect(pg_url) as conn:  # the database was not touched
        assert conn.execute("SELECT to_regclass('tasknotes_schema')").fetchone() == (None,)
    with EmulatorThread() as api:
        run_pipeline(make_config(tmp_path / "old", api={"base_url": api.url}), str(source))
    ledger = tmp_path / "old" / "state" / "ledger.sqlite"
    assert main(["-q", "migrate-state", str(config), "--from-sqlite", str(ledger),
                 "--sink", str(source)]) == 2
    err = capsys.readouterr().err
    assert f"none of the 4 lines of {source} is a webhook event" in err
    assert "Traceback" not in err
    with connect(pg_url) as conn:  # read before the ledger is copied: nothing copied at all
        assert conn.execute("SELECT to_regclass('tasknotes_schema')").fetchone() == (None,)
    newer = tmp_path / "newer.sqlite"  # written by a newer tasknotes, as SQLite refuses it
    shutil.copy(ledger, newer)
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert main(["-q", "migrate-state", str(config), "--from-sqlite", str(newer)]) == 2
    err = capsys.readouterr().err
    assert f"--from-sqlite: {newer} has schema 99, newer than this tasknotes knows" in err
    with connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('tasknotes_schema')").fetchone() == (None,)


def test_a_renamed_config_and_its_old_self_cannot_run_at_once(
        pg_url: str, tmp_path: Path) -> None:
    """During a rename (config B: account clinicB, formerly [clinicA]) a run of the old
    config A (clinicA) and one of B must not both send: neither found the other's notes,
    and each sent all of them (attacker HIGH: 300 notes twice, both exit 0). B's run also
    takes clinicA's run lock, so whichever starts second is refused, naming it; and once
    A's run is gone, B recovers its in-flight rows (ambiguous), as its own."""
    old = make_config(tmp_path, api={"account": "clinicA"}, state={"url": pg_url})
    new = make_config(tmp_path, api={"account": "clinicB", "formerly": ["clinicA"]},
                      state={"url": pg_url})
    first = open_store(old)
    second = open_store(new)
    try:
        first.lock(holder="run run-old")
        with pytest.raises(StateError, match="holds the run lock of account clinicA"):
            second.lock(holder="run run-new")
        first.start_run("run-old", "clinicA", "fp", {})
        first.add_rows("run-old", [NewRow(0, 2, "T1", row_key("clinicA", "T1", "n"),
                                          "pending")])
        (row,) = [r[0] for r in first.rows_to_send("run-old")]
        first.apply([row], [])  # in flight when the old run's process dies
        first.close()  # its server process lets go of the locks as it exits
        wait_until(lambda: second.lock_holder() is None, timeout=10, what="the lock freed")
        second.lock(holder="run run-new")
        assert second.recover() == 1
        assert second.run("run-old").state == "crashed"
        third = open_store(old)
        try:
            with pytest.raises(StateError, match="holds the run lock of account clinicA"):
                third.lock(holder="run run-old-2")
        finally:
            third.close()
    finally:
        second.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_run_refused_before_the_holder_recorded_its_id_still_names_it(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    """Two workers started together: the second is refused while the first holds the lock
    but has not recorded its run yet (start_run). The message names the first's run id
    all the same (a run locks with ``holder="run <id>"``), not "run (starting)" (newcomer
    LOW); on SQLite too, with its pid."""
    def store() -> Ledger | PgLedger:
        if backend == "sqlite":
            return Ledger(tmp_path / "ledger.sqlite")
        return PgLedger(request.getfixturevalue("pg_url"), "test_clinic")

    first, second = store(), store()
    try:
        first.lock(holder="run 20261201T093000Z-a1b2")
        with pytest.raises(StateError) as refused:
            second.lock(holder="run 20261201T093000Z-c3d4")
        assert "run 20261201T093000Z-a1b2" in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
        assert "(starting)" not in str(refused.value)
        assert second.lock_holder() == os.getpid()
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("holder", "says"), [
    ("sqlite", "let that run end, then migrate; nothing was copied"),
    ("postgres", "holds the run lock of account test_clinic"),
])
def test_migrate_state_refuses_while_a_run_holds_a_lock_it_needs(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], holder: str, says: str) -> None:
    """Refused, naming the holder, nothing copied, while a run holds either lock; copied
    once the run has ended (attacker findings). ``sqlite``: a run still sending on the
    SQLite ledger (a copy taken half-way would let the first run on PostgreSQL send again
    what the rest of it sent). ``postgres``: a run on PostgreSQL of an account the ledger
    has runs of (scanning while the copy is under way it finds no history, and sent again
    every note the copy brought in: 1,500 notes twice, both commands exit 0);
    migrate-state holds those accounts' run locks until its commit."""
    source = write_csv(tmp_path / "input.csv", notes(3))
    with EmulatorThread() as api:
        run_pipeline(make_config(tmp_path / "old", api={"base_url": api.url}), str(source))
    path = tmp_path / "old" / "state" / "ledger.sqlite"
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = worker_file(tmp_path, "worker-a", "http://127.0.0.1:9")
    argv = ["-q", "migrate-state", str(config), "--from-sqlite", str(path)]
    running: Ledger = Ledger(path) if holder == "sqlite" else PgLedger(pg_url, "test_clinic")
    running.lock()  # as a run in progress holds it
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err
        assert says in err
        assert "nothing was copied" in err
        with connect(pg_url) as conn:  # the SQLite lock is found before the database is used
            made = conn.execute("SELECT to_regclass('runs') IS NOT NULL").fetchone() == (True,)
            assert made == (holder == "postgres")
            if made:
                assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    finally:
        running.close()
    assert main(argv) == 0
    assert statuses(pg_url) == {"accepted": 3}


def test_a_run_refused_while_migrate_state_copies_names_migrate_state(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """While migrate-state holds an account's run lock (until its copy commits), a run of
    that account is refused naming it, not "run (starting)" (retest LOW, sixth session)."""
    source = write_csv(tmp_path / "input.csv", notes(2))
    with EmulatorThread() as api:
        run_pipeline(make_config(tmp_path / "old", api={"base_url": api.url}), str(source))
        path = tmp_path / "old" / "state" / "ledger.sqlite"
        monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
        config = worker_file(tmp_path, "worker-a", api.url)
        with contextlib.closing(sqlite3.connect(path)) as copied:
            holding = pg_migrate._lock_accounts(pg_url, copied, path)
        try:
            assert main(["-q", "run", str(config), "--input", str(source),
                         "--no-progress"]) == 2
        finally:
            holding.close()
        assert api.emulator.requests == 2  # the first run's only
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on host" in err
    assert "tasknotes migrate-state of ledger.sqlite" in err
    assert "(starting)" not in err


def test_a_sandbox_run_on_postgres_confirms_its_notes(pg_url: str, tmp_path: Path) -> None:
    """The sandbox's sink stores into the database the run reads its outcomes from."""
    source = write_csv(tmp_path / "input.csv", notes(5))
    config = worker(tmp_path, "worker-a", pg_url, "http://127.0.0.1:9",
                    sandbox={"enabled": True, "wait_s": 30,
                             "emulator": {"outcome_delay_ms": [5, 20]}})
    outcome = run_pipeline(config, str(source))
    results = read_results(config.report.dir / outcome.run_id)
    assert [r["final_status"] for r in results] == ["confirmed"] * 5
    assert sink_count(pg_url) == 5
    assert not (tmp_path / "worker-a" / "state").exists()


def test_the_clear_and_orphan_statements_stay_anti_joins_when_work_mem_is_small(
        pg_url: str) -> None:
    """``x NOT IN (SELECT ...)`` is a plain subplan, re-read for every outer row, once the
    subquery outgrows work_mem (a reconcile of 1M x 1M stalled in it): with 20,000 matched
    rows and claimed events and work_mem at 64kB, each statement is planned as anti-joins
    (the orphans' as two: events claimed, events settled by evidence)."""
    import psycopg  # noqa: PLC0415 - the postgres extra, as in the fixtures

    from pipeline.state import pg_ledger  # noqa: PLC0415 - its statements, not the seam

    PgLedger(pg_url, "test_clinic").close()  # the schema
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET work_mem = '64kB'")
        conn.execute("CREATE TEMP TABLE matched AS SELECT g::bigint AS row_id,"
                     " 'evt_' || g AS event_id, 'evidence' AS settled_by"
                     " FROM generate_series(1, 20000) g")
        conn.execute("CREATE TEMP TABLE claimed AS SELECT 'evt_' || g AS event_id"
                     " FROM generate_series(1, 20000) g")
        conn.execute("ANALYZE matched")
        conn.execute("ANALYZE claimed")
        statements = [pg_ledger._CLEAR_OUTCOMES_SQL, pg_ledger._ORPHANS_SQL[1]]
        plans = ["\n".join(str(r[0]) for r in conn.execute(f"EXPLAIN {s}"))  # type: ignore[arg-type]
                 for s in statements]
    assert [(p.count("Anti Join"), "SubPlan" in p) for p in plans] == [
        (1, False), (2, False)], plans


def test_stored_sink_events_are_read_as_stored_with_their_time_in_utc_to_the_ms(
        pg_url: str) -> None:
    """sink_events_after gives each stored body byte for byte (bytes that are not UTF-8
    too), its verdict, and its receive time as ISO 8601 UTC with milliseconds (the form
    ``outcome_at`` takes from a sink file's receipts), whatever the time zone it was
    stored in; only the events after the given ``seq``, in ``seq`` order."""
    ledger = PgLedger(pg_url, "test_clinic")
    try:
        stored = [(b'{"id":"evt_1"}', "signature-verified", "2026-11-28 23:59:59.005+00"),
                  (b'{"id":"evt_2"}\xff\x00', "polled", "2026-11-29 01:02:03.12+02"),
                  (b'{"id":"evt_3"}', "migrated-no-receipt", "2026-01-02 03:04:05+00")]
        seqs = [ledger._pg.execute(
            "INSERT INTO sink_events (event_id, body_sha256, body, verdict, received_at)"
            " VALUES (?, sha256(?), ?, ?, ?) RETURNING seq",
            (f"evt_{n}", body, body, verdict, at)).fetchone()[0]  # type: ignore[index]
            for n, (body, verdict, at) in enumerate(stored, 1)]
        ledger._pg.execute("SET TimeZone = 'Asia/Kathmandu'")  # UTC+05:45: not the reader's
        assert ledger.sink_events_after(seqs[0], 10) == [
            (seqs[1], b'{"id":"evt_2"}\xff\x00', "polled", "2026-11-28T23:02:03.120Z"),
            (seqs[2], b'{"id":"evt_3"}', "migrated-no-receipt", "2026-01-02T03:04:05.000Z")]
        assert ledger.sink_events_after(0, 1) == [
            (seqs[0], b'{"id":"evt_1"}', "signature-verified", "2026-11-28T23:59:59.005Z")]
    finally:
        ledger.close()


def test_events_stored_behind_the_reading_lose_and_double_nothing(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest_postgres stores each batch (on a second connection) while it decodes the
    next. In batches of 2, seven stored events (one of another type, one unreadable):
    when storing the third batch fails, its error comes out (StateError) and the position
    stays after the second batch, nothing of the third kept; the next ingest stores the
    rest, nothing twice, and counts each event not mirrored once."""
    from test_reconcile import Book  # noqa: PLC0415 - its module imports this one's fixtures

    from pipeline import reconciliation  # noqa: PLC0415 - the batch size set here

    monkeypatch.setattr(reconciliation, "BATCH", 2)
    book = Book(tmp_path, pg_url=pg_url)
    ledger = book.ledger
    assert isinstance(ledger, PgLedger)
    try:
        for n in range(1, 7):
            book.event("appointment.updated" if n == 4 else "task_note.created", str(100 + n),
                       n=n, task=f"T{n}")
        ledger._pg.execute("INSERT INTO sink_events (event_id, body_sha256, body, verdict,"
                           " received_at) VALUES ('evt_7', sha256('x'), 'x',"
                           " 'signature-verified', now())")
        seqs = [s for (s,) in ledger._pg.execute("SELECT seq FROM sink_events ORDER BY seq")]
        with connect(pg_url) as admin:
            admin.execute("ALTER TABLE events ADD CONSTRAINT refuse CHECK (event_id <> 'evt_5')")
        with pytest.raises(StateError, match="refuse"):
            reconciliation.ingest_postgres(ledger, "test_clinic")
        assert ledger.sink_position() == (seqs[3], "")
        assert [e.event_id for e in ledger.events()] == ["evt_1", "evt_2", "evt_3"]
        with connect(pg_url) as admin:
            admin.execute("ALTER TABLE events DROP CONSTRAINT refuse")
        assert reconciliation.ingest_postgres(ledger, "test_clinic") == 2
        assert [e.event_id for e in ledger.events()] == [
            "evt_1", "evt_2", "evt_3", "evt_5", "evt_6"]
        assert [e.line for e in ledger.events()] == [seqs[i] for i in (0, 1, 2, 4, 5)]
        assert ledger.sink_position() == (seqs[6], "")
        tally = ledger.event_tally()
        assert (tally.pop("(set aside)"), sum(tally.values())) == (1, 1)
    finally:
        ledger.close()


def test_run_chunks_left_unread_leave_no_second_connection_open(pg_url: str) -> None:
    """run_chunks reads each next chunk on a second connection: a caller that stops after
    the first chunk (and one that reads them all) leaves only its own session open."""
    from pipeline.state import NewRow, row_key  # noqa: PLC0415 - as the other tests here

    store = PgLedger(pg_url, "test_clinic")
    try:
        store.start_run("r", "test_clinic", "fp", {})
        store.add_rows("r", [NewRow(0, n, f"T{n}", row_key("test_clinic", f"T{n}", "n"),
                                    "pending") for n in range(2, 12)])

        def sessions() -> int:
            found = store._pg.execute("SELECT count(*) FROM pg_stat_activity"
                                      " WHERE datname = current_database()").fetchone()
            return int(found[0]) if found else -1

        chunks = store.run_chunks("r", 4)
        assert len(next(chunks)) == 4
        assert sessions() == 2  # the next chunk is read ahead
        chunks.close()
        wait_until(lambda: sessions() == 1, timeout=10)
        assert [len(c) for c in store.run_chunks("r", 4)] == [4, 4, 2]
        wait_until(lambda: sessions() == 1, timeout=10)
    finally:
        store.close()


def test_add_events_twice_in_one_outer_transaction_stores_both(pg_url: str) -> None:
    """add_events' table of the transaction is gone once it returns: two calls inside one
    outer transaction (its own then a savepoint) both store their events."""
    from pipeline.state import EventRecord  # noqa: PLC0415 - as the other tests here

    store = PgLedger(pg_url, "test_clinic")
    try:
        one, two = (EventRecord(f"evt_{n}", "created", str(n), None, None, None, None, None,
                                None, n) for n in (1, 2))
        with store._conn.transaction():
            assert store.add_events([one], {}, offset=1, head="") == 1
            assert store.add_events([two], {}, offset=2, head="") == 1
        assert [e.event_id for e in store.events()] == ["evt_1", "evt_2"]
    finally:
        store.close()


def _row_updates(pg_url: str) -> tuple[int, int]:
    """(updates, HOT updates) of ``rows`` as the server's statistics count them so far."""
    with connect(pg_url) as conn:
        row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                           " WHERE relname = 'rows'").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_each_outcome_the_join_rules_write_stays_in_its_rows_page(pg_url: str) -> None:
    """A row's outcome is written as a HOT update (migration 8): its new version in the
    same page, no entry in any index of rows. For rows added, marked sending and answered
    as a run does (each a new version of the row), then given their outcomes by a
    reconcile before any vacuum ran, at least 90% of the 2,000 outcome writes are HOT
    (whether a page still has room depends on the sizes of its rows; with pages packed
    full, as before migration 8, under 1% are). The server counts its updates when each
    session ends: waited for, with a deadline."""
    from pipeline.state import EventRecord  # noqa: PLC0415 - as the other tests here
    from pipeline.state.records import Attempt, NewRow, row_key  # noqa: PLC0415

    count = 2_000
    ledger = PgLedger(pg_url, "test_clinic")
    try:
        ledger.start_run("r1", "test_clinic", "fp", {})
        ledger.add_file("r1", 0, "input.csv", ["emr_task_id", "note"], sha256="0", size=0)
        ledger.add_rows("r1", [NewRow(0, i + 2, f"T{i}", row_key("test_clinic", f"T{i}", "n"),
                                      "pending") for i in range(count)])
        ledger.mark_sending(list(range(1, count + 1)))
        ledger.record_attempts([Attempt(i + 1, "accepted", 202, f"tn{i:022x}", str(10_000 + i),
                                        None, "2026-11-28T10:00:00.000Z") for i in range(count)])
    finally:
        ledger.close()
    wait_until(lambda: _row_updates(pg_url)[0] >= 2 * count, what="the send's updates counted")
    sent = _row_updates(pg_url)
    ledger = PgLedger(pg_url, "test_clinic")
    try:
        ledger.add_events([EventRecord(f"evt_{i:020d}", "created", str(10_000 + i),
                                       f"tn{i:022x}", "2026-11-28T10:01:00Z", f"emr-{i}", None,
                                       None, None, i) for i in range(count)], {}, offset=1,
                          head="")
        assert ledger.match_outcomes() == count
    finally:
        ledger.close()
    wait_until(lambda: _row_updates(pg_url)[0] >= sent[0] + count,
               what="the outcome writes counted")
    updates, hot = _row_updates(pg_url)
    assert updates - sent[0] == count
    assert hot - sent[1] >= 0.9 * count
