"""Deadlocks and serialization failures on PostgreSQL (``state.url``), made for real.

Several clinics (accounts) share one database: run B sends while the refresh of another
clinic's run matches outcomes over the rows of every run. Both update rows, and each
statement bumps ``runs.rev`` of each run a changed row belongs to, and of each run
holding a row of the same note, after the rows (pg_ledger.bumping). Run B's group commit
(``PgLedger.apply``: its results, then the rows about to be sent) bumps run B, then,
marking a row whose note run B0 (B's earlier run) sent before, run B0; the match, writing
the outcome of B0's row, bumps run B0, then run B (which sends that note again). Each
holds the ``runs`` row the other waits for: PostgreSQL aborts one (SQLSTATE 40P01).

A third session holds one lock to put the two in that order every time; each test waits
for the server to show a session waiting (pg_stat_activity), never for a time. The
victim is chosen with ``deadlock_timeout``: the session closing the cycle checks after
10 ms, the other only after a minute (PostgreSQL docs, "Lock Management").
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import EmulatorThread, notes, wait_until, write_config, write_csv
from pipeline.cli import main
from pipeline.state import pg_ledger, pg_session
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.postgres import connect
from pipeline.state.records import Attempt, EventRecord, NewRow, row_key

pytestmark = pytest.mark.slow

KEY = row_key("clinic_b", "T-1", "the note sent again")  # run B0's note, sent again by B
OTHER = row_key("clinic_b", "T-2", "another note")
COLUMNS = ("id", "run_id", "status", "attempts", "http_status", "task_note_id", "job_id",
           "outcome", "event_id", "emr_note_id", "settled_by")


@dataclass
class Clinics:
    """Run B0 (done: row ``z`` accepted), run B (row ``x1`` sending, ``x2`` pending, of
    B0's note) on account clinic_b, and the ledger of clinic_a that matches outcomes."""

    sender: PgLedger
    matcher: PgLedger
    z: int
    x1: int
    x2: int

    def close(self) -> None:
        self.sender.close()
        self.matcher.close()


def ids(url: str, run_id: str) -> list[int]:
    with connect(url) as conn:
        return [int(str(r[0])) for r in conn.execute(
            "SELECT id FROM rows WHERE run_id = %s ORDER BY id", (run_id,)).fetchall()]


def clinics(url: str) -> Clinics:
    """The state both sides start from, written through the ledger."""
    earlier = PgLedger(url, "clinic_b")
    earlier.start_run("run-b0", "clinic_b", "fp", {})
    earlier.add_rows("run-b0", [NewRow(1, 2, "T-1", KEY, "pending")])
    (z,) = ids(url, "run-b0")
    earlier.apply([z], [])
    earlier.apply([], [Attempt(z, "accepted", 202, "tn-z", "job-z", None, "2026-01-01T00:00:01Z")])
    earlier.finish_run("run-b0", "finished", {})
    earlier.close()
    sender = PgLedger(url, "clinic_b")
    sender.start_run("run-b", "clinic_b", "fp", {})
    sender.add_rows("run-b", [NewRow(1, 2, "T-2", OTHER, "pending"),
                              NewRow(1, 3, "T-1", KEY, "pending")])
    x1, x2 = ids(url, "run-b")
    sender.apply([x1], [])
    matcher = PgLedger(url, "clinic_a")
    # the EMR's word on B0's note arrives while B sends it again
    matcher.add_events([EventRecord("evt-z", "created", "job-z", "tn-z",
                                    "2026-01-01T00:00:02Z", "emr-z", None, None, KEY, 1)],
                       {}, offset=1, head="")
    return Clinics(sender, matcher, z, x1, x2)


def send(world: Clinics) -> None:
    """Run B's next group commit: x1 answered (accepted), x2 about to be sent."""
    world.sender.apply([world.x2], [Attempt(world.x1, "accepted", 202, "tn-x1", "job-x1",
                                            None, "2026-01-01T00:00:03Z")])


def final_rows(url: str) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        return conn.execute(f"SELECT {', '.join(COLUMNS)} FROM rows ORDER BY id").fetchall()


def one_after_the_other(pg_cluster: Any) -> list[tuple[Any, ...]]:
    """The rows when the same two transactions run one after the other, on a fresh
    database (the same inserts give the same row ids)."""
    name = pg_cluster.create_database()
    try:
        url = pg_cluster.url(name)
        world = clinics(url)
        try:
            send(world)
            assert world.matcher.match_outcomes() == 1
        finally:
            world.close()
        return final_rows(url)
    finally:
        pg_cluster.drop_database(name)


def waiting(url: str, ledger: PgLedger) -> Callable[[], bool]:
    pid = ledger._conn.info.backend_pid

    def check() -> bool:
        with connect(url) as conn:
            row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (pid,)).fetchone()
        return row is not None and row[0] == "Lock"
    return check


def deadlock_timeout(ledger: PgLedger, value: str) -> None:
    ledger._conn.execute(f"SET deadlock_timeout = '{value}'")


@pytest.fixture
def world(pg_url: str) -> Iterator[Clinics]:
    made = clinics(pg_url)
    try:
        yield made
    finally:
        made.close()


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == pg_session.__name__]


def test_a_send_that_deadlocks_with_another_clinics_match_runs_again_and_both_land(
        pg_url: str, pg_cluster: Any, world: Clinics,
        caplog: pytest.LogCaptureFixture) -> None:
    """The group commit closes the cycle and is aborted (40P01): it runs again whole,
    and the rows end as if the match and the send had run one after the other."""
    caplog.set_level(logging.INFO)
    deadlock_timeout(world.sender, "10ms")
    deadlock_timeout(world.matcher, "1min")
    with connect(pg_url) as third, ThreadPoolExecutor(2) as pool:
        third.autocommit = False
        third.execute("SELECT 1 FROM rows WHERE id = %s FOR UPDATE", (world.x2,))
        sent: Future[None] = pool.submit(send, world)  # holds x1 and run B; waits for x2
        wait_until(waiting(pg_url, world.sender), timeout=60, what="the send waiting for x2")
        matched = pool.submit(world.matcher.match_outcomes)  # holds run B0; waits for run B
        wait_until(waiting(pg_url, world.matcher), timeout=60, what="the match waiting")
        third.commit()  # the send marks x2 sending and must bump run B0: the cycle
        sent.result(timeout=120)
        assert matched.result(timeout=120) == 1
    assert [m.split(" again in ")[0] for m in retries(caplog)] == [
        "state: a send's group commit rolled back by PostgreSQL (SQLSTATE 40P01, try 1 of 5);"
        " running it"]
    assert final_rows(pg_url) == one_after_the_other(pg_cluster)
    by_id = {r[0]: r for r in final_rows(pg_url)}
    assert by_id[world.x2][2:4] == ("sending", 1)  # marked once, not twice
    assert by_id[world.z][7] == "created"


def test_a_match_that_deadlocks_with_another_clinics_send_runs_again_and_both_land(
        pg_url: str, pg_cluster: Any, world: Clinics,
        caplog: pytest.LogCaptureFixture) -> None:
    """The match closes the cycle and is aborted (40P01): it runs again whole (a fresh
    snapshot, the send's rows as committed), and the rows end as if one after the other."""
    caplog.set_level(logging.INFO)
    deadlock_timeout(world.sender, "1min")
    deadlock_timeout(world.matcher, "10ms")
    with connect(pg_url) as third, ThreadPoolExecutor(2) as pool:
        third.autocommit = False
        third.execute("SELECT 1 FROM runs WHERE run_id = 'run-b0' FOR UPDATE")
        matched = pool.submit(world.matcher.match_outcomes)  # holds z; waits for run B0
        wait_until(waiting(pg_url, world.matcher), timeout=60, what="the match waiting")
        sent: Future[None] = pool.submit(send, world)  # holds run B; queues for run B0
        wait_until(waiting(pg_url, world.sender), timeout=60, what="the send waiting")
        third.commit()  # the match gets run B0 first, then waits for run B: the cycle
        sent.result(timeout=120)
        assert matched.result(timeout=120) == 1
    assert [m.split(" (")[0] for m in retries(caplog)] == [
        "state: matching outcomes rolled back by PostgreSQL"]
    assert "SQLSTATE 40P01" in retries(caplog)[0]
    assert final_rows(pg_url) == one_after_the_other(pg_cluster)


def test_a_match_that_cannot_serialize_after_a_send_runs_again_on_a_fresh_snapshot(
        pg_url: str, pg_cluster: Any, world: Clinics,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the database's transactions SERIALIZABLE, a match whose snapshot predates a
    send that bumped run B0 cannot commit its own writes (40001, "could not serialize
    access ..."): it runs again from its start, on a new snapshot."""
    caplog.set_level(logging.INFO)
    for ledger in (world.sender, world.matcher):
        ledger._conn.execute("SET default_transaction_isolation = 'serializable'")
    with connect(pg_url) as third, ThreadPoolExecutor(1) as pool:
        third.execute("SELECT pg_advisory_lock(%s)", (pg_ledger._MATCH_LOCK,))
        matched = pool.submit(world.matcher.match_outcomes)  # snapshot taken, then waits
        wait_until(waiting(pg_url, world.matcher), timeout=60, what="the match waiting")
        send(world)  # committed after the match's snapshot: x2 bumps run B0
        third.execute("SELECT pg_advisory_unlock(%s)", (pg_ledger._MATCH_LOCK,))
        assert matched.result(timeout=120) == 1
    assert [m.split(", try")[0] for m in retries(caplog)] == [
        "state: matching outcomes rolled back by PostgreSQL (SQLSTATE 40001"]
    assert final_rows(pg_url) == one_after_the_other(pg_cluster)


@contextlib.contextmanager
def failing_sends(pg_url: str, tmp_path: Path, count: int, sql: str
                  ) -> Iterator[tuple[EmulatorThread, list[str]]]:
    """An emulator, and the arguments of a run of ``count`` notes against it with its state
    in ``pg_url``, whose schema is made and then ``sql`` run in it (a trigger failing the
    send's commits)."""
    source = write_csv(tmp_path / "input.csv", notes(count))
    with EmulatorThread() as api:
        config = write_config(tmp_path, api={"base_url": api.url, "account": "test_clinic"},
                              state={"url": pg_url})
        PgLedger(pg_url, "test_clinic").close()  # the schema
        with connect(pg_url) as conn:
            conn.execute(sql.encode())
        yield api, ["-q", "run", str(config), "--input", str(source), "--no-progress"]


def stopped_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``tasknotes`` run with ``argv``, which must exit 3 with one line on stderr and no
    traceback: that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_conflict_that_persists_stops_the_run_with_exit_3_and_sends_nothing_blind(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every try of the first group commit fails with 40001 (a trigger in the database
    raises it, counting tries in a sequence: sequences are not rolled back): the run
    stops after CONFLICT_TRIES tries with one line and exit 3; no request left, since
    no row was ever committed ``sending``; the next run sends every note once."""
    with failing_sends(pg_url, tmp_path, 3, """
            CREATE SEQUENCE tries;
            CREATE FUNCTION always_conflict() RETURNS trigger AS $$
            BEGIN
                PERFORM nextval('tries');
                RAISE EXCEPTION 'could not serialize access due to concurrent update'
                    USING ERRCODE = 'serialization_failure';
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER always_conflict BEFORE UPDATE ON rows FOR EACH ROW
                WHEN (NEW.status = 'sending') EXECUTE FUNCTION always_conflict();""") as (
            api, argv):
        line = stopped_in_one_line(argv, capsys)
        assert "SQLSTATE 40001" in line
        assert "tried 5 times" in line
        assert api.emulator.requests == 0
        with connect(pg_url) as conn:
            assert conn.execute("SELECT last_value FROM tries").fetchone() == (5,)
            assert conn.execute("SELECT status, count(*) FROM rows GROUP BY status"
                                ).fetchall() == [("pending", 3)]
            conn.execute("DROP TRIGGER always_conflict ON rows")
        assert main(argv) in (0, 1)
        assert api.emulator.requests == 3


def test_a_statement_outside_a_transaction_is_its_own_and_runs_again(
        pg_url: str, world: Clinics, caplog: pytest.LogCaptureFixture) -> None:
    """A lone statement (autocommit) is a whole transaction: the server refusing its
    first try with 40001 (a trigger counting tries), it runs again, and counts once."""
    caplog.set_level(logging.INFO)
    with connect(pg_url) as conn:
        conn.execute("""
            CREATE SEQUENCE tries;
            CREATE FUNCTION first_conflicts() RETURNS trigger AS $$
            BEGIN
                IF nextval('tries') = 1 THEN
                    RAISE EXCEPTION 'could not serialize access due to concurrent update'
                        USING ERRCODE = 'serialization_failure';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER first_conflicts BEFORE UPDATE ON rows FOR EACH ROW
                EXECUTE FUNCTION first_conflicts();""")
    world.sender.mark_sending([world.x2])
    with connect(pg_url) as conn:
        assert conn.execute("SELECT last_value FROM tries").fetchone() == (2,)
    assert [r[3] for r in final_rows(pg_url) if r[0] == world.x2] == [1]
    assert [m.split(", try")[0] for m in retries(caplog)] == [
        "state: a statement rolled back by PostgreSQL (SQLSTATE 40001"]


def test_a_transaction_inside_another_is_not_run_again_alone(world: Clinics) -> None:
    """Only the outermost transaction may run again: inside an open one, a conflict
    goes up as it is, once (the outer one is what must be retried)."""
    calls = threading.local()
    calls.n = 0

    def body() -> None:
        calls.n += 1
        raise pg_session.Conflict("conflict", "40P01")
    with world.sender._transaction(), pytest.raises(pg_session.Conflict):
        world.sender._pg.retrying(body, "an inner transaction")
    assert calls.n == 1
    calls.n = 0
    with pytest.raises(pg_session.Conflict, match="tried 5 times") as caught:
        world.sender._pg.retrying(body, "an outer transaction")
    assert calls.n == 5
    assert caught.value.exit_code == 3


def test_a_unit_that_committed_a_transaction_before_its_conflict_is_not_run_again(
        world: Clinics) -> None:
    """A method of two transactions whose second conflicts: running it again would
    repeat the first, committed (a row marked ``sending`` twice), so it is not."""
    calls = 0

    def body() -> None:
        nonlocal calls
        calls += 1
        with world.sender._transaction():
            world.sender.mark_sending([world.x2])
        raise pg_session.Conflict("conflict", "40001")
    with pytest.raises(pg_session.Conflict):
        world.sender._pg.retrying(body, "two transactions")
    assert calls == 1
    assert [r[3] for r in final_rows(world.sender.url) if r[0] == world.x2] == [1]


def test_a_send_commit_failing_at_its_sync_stops_the_run_with_exit_3_and_sends_nothing_blind(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An error the server reports at the Sync of the send's pipelined group commit (its
    implicit COMMIT: here a deferred trigger raising 40001 there, as SSI does at commit)
    leaves psycopg's pipeline stuck, the answer lost ("cannot exit pipeline mode while
    busy"). It was exit 2, or a traceback, after notes had gone out (attacker finding);
    now the run stops with exit 3 and one line, no request for a row not committed
    ``sending`` leaves, and the next run sends every note once."""
    with failing_sends(pg_url, tmp_path, 30, """
            CREATE FUNCTION conflict_at_commit() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'could not serialize access due to read/write dependencies'
                    USING ERRCODE = 'serialization_failure';
            END $$ LANGUAGE plpgsql;
            CREATE CONSTRAINT TRIGGER conflict_at_commit AFTER UPDATE ON rows
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                WHEN (NEW.status = 'sending') EXECUTE FUNCTION conflict_at_commit();""") as (
            api, argv):
        line = stopped_in_one_line(argv, capsys)
        assert "the answer to a send's group commit was lost" in line
        assert api.emulator.requests == 0
        with connect(pg_url) as conn:
            assert conn.execute("SELECT status, count(*) FROM rows GROUP BY status"
                                ).fetchall() == [("pending", 30)]
            conn.execute("DROP TRIGGER conflict_at_commit ON rows")
        assert main(argv) in (0, 1)
        assert api.emulator.requests == 30


def test_sessions_are_read_committed_whatever_the_databases_default(pg_url: str) -> None:
    """A database whose default is SERIALIZABLE (attacker: clinics writing disjoint rows
    then failed each other's commits, and reconcile and poll exited 3): tasknotes'
    sessions still run READ COMMITTED, the level their transactions are written for."""
    import psycopg  # noqa: PLC0415 - the postgres extra, as in the fixtures

    with connect(pg_url) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET default_transaction_isolation'
                     " = 'serializable'")
    with psycopg.connect(pg_url) as plain:  # a session of another client gets the default
        assert plain.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
    ledger = PgLedger(pg_url, "test_clinic")
    try:
        assert ledger._pg.execute("SHOW transaction_isolation").fetchone() == (
            "read committed",)
        with ledger._transaction():
            assert ledger._pg.execute("SHOW transaction_isolation").fetchone() == (
                "read committed",)
    finally:
        ledger.close()


def test_sessions_never_jit_compile_whatever_the_databases_default(pg_url: str) -> None:
    """JIT compilation (PostgreSQL's default: on, for statements whose estimated cost
    passes jit_above_cost) took tenths of a second per statement of the join rules,
    whose work is a few milliseconds (bench/state.py): tasknotes' sessions run with it
    off, even where the database compiles every statement."""
    import psycopg  # noqa: PLC0415 - the postgres extra, as in the fixtures

    with connect(pg_url) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET jit = on')
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET jit_above_cost = 0')
    with psycopg.connect(pg_url) as plain:
        assert plain.execute("SHOW jit").fetchone() == ("on",)
    ledger = PgLedger(pg_url, "test_clinic")
    reader = ledger.reader()
    try:
        assert ledger._pg.execute("SHOW jit").fetchone() == ("off",)
        assert reader._pg.execute("SHOW jit").fetchone() == ("off",)
    finally:
        reader.close()
        ledger.close()


def test_a_unit_that_only_read_before_its_conflict_runs_again(world: Clinics) -> None:
    """A method that reads outside a transaction (finish_run and update_run_info read the
    run's record first), then conflicts in its write: the read committed nothing, so the
    whole method runs again (it stopped the command with exit 3 after one try)."""
    calls = 0

    def body() -> None:
        nonlocal calls
        calls += 1
        assert world.sender._pg.execute("SELECT count(*) FROM rows").fetchone() is not None
        assert world.sender._pg.execute("SHOW transaction_isolation").fetchone() is not None
        if calls == 1:
            raise pg_session.Conflict("conflict", "40P01")
        with world.sender._transaction():
            world.sender.mark_sending([world.x2])
    world.sender._pg.retrying(body, "a read, then a write")
    assert calls == 2
    assert [r[3] for r in final_rows(world.sender.url) if r[0] == world.x2] == [1]
    assert pg_session._reads(b" select\n 1")
    assert pg_session._reads(b"SHOW work_mem")
    assert not pg_session._reads(b"SELECT * INTO copied FROM rows")
    assert not pg_session._reads(b"SELECT id FROM rows FOR UPDATE")
    assert not pg_session._reads(b"SELECT id FROM rows\nFOR NO KEY UPDATE")
    assert not pg_session._reads(b"UPDATE rows SET status = 'x'")
