"""The send's group commit and the change counter on PostgreSQL (``state.url``), against
a real server (tests/pg.py): a wave's results and its ``sending`` rows are one transaction,
durable when ``apply`` returns, sent in one round trip; ``runs.rev`` grows with every change
a run's report shows, one bump per statement."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import pytest

from pipeline.errors import StateError
from pipeline.state import Attempt, EventRecord, NewRow, row_key
from pipeline.state.pg_ledger import PgLedger
from pipeline.state.postgres import MIGRATIONS, connect, migrate
from pipeline.submit import remote_commits

pytestmark = pytest.mark.slow
pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")

ACCOUNT = "test_clinic"


def ledger(url: str, runs: dict[str, list[str]]) -> tuple[PgLedger, dict[str, list[int]]]:
    """A ledger holding the run lock, with ``runs`` (run id -> its rows' task ids, each
    with the note "a note"), every row pending; the rows' ids by run."""
    store = PgLedger(url, ACCOUNT)
    store.lock()
    ids: dict[str, list[int]] = {}
    for run_id, tasks in runs.items():
        store.start_run(run_id, ACCOUNT, "fp", {})
        store.add_rows(run_id, [NewRow(0, line, task, row_key(ACCOUNT, task, "a note"),
                                       "pending") for line, task in enumerate(tasks, 2)])
        ids[run_id] = [row[0] for row in store.rows_to_send(run_id)]
    return store, ids


def seen(url: str, row_ids: list[int]) -> list[tuple[str, int, str | None]]:
    """(status, attempts, job_id) of rows, as another session sees them (committed only)."""
    with connect(url) as other:
        return [(str(s), int(str(a)), None if j is None else str(j))
                for s, a, j in other.execute(
                    "SELECT status, attempts, job_id FROM rows WHERE id = ANY(%s) ORDER BY id",
                    (row_ids,)).fetchall()]


def revs(url: str) -> dict[str, int]:
    with connect(url) as other:
        return {str(r): int(str(v)) for r, v in other.execute("SELECT run_id, rev FROM runs")}


@contextlib.contextmanager
def syncs(store: PgLedger) -> Iterator[list[int]]:
    """Counts the Sync messages the session sends meanwhile (each one a round trip that
    waits for the server): yields a list holding that count once the block ends."""
    count: list[int] = []
    with tempfile.TemporaryFile("w+") as trace:
        with store.trace(trace):
            yield count
        trace.seek(0)
        count.append(sum(1 for line in trace if line.startswith("F") and "\tSync" in line))


def test_a_group_commit_is_durable_when_apply_returns_in_one_round_trip(pg_url: str) -> None:
    """apply: the wave's rows are ``sending`` for any other session as soon as it returns
    (the request may leave), with the previous wave's answers, in one Sync. Each is a
    round trip: the submit stage gathers its waves for it (submit.remote_commits)."""
    store, ids = ledger(pg_url, {"run-1": ["T1", "T2", "T3", "T4"]})
    one, two = ids["run-1"][:2], ids["run-1"][2:]
    assert remote_commits(store)
    try:
        store.apply(one, [])
        assert seen(pg_url, ids["run-1"]) == [("sending", 1, None)] * 2 + [("pending", 0, None)] * 2
        with syncs(store) as count:
            store.apply(two, [Attempt(i, "accepted", 202, f"tn-{i}", f"job-{i}") for i in one])
        assert count == [1]
        assert seen(pg_url, ids["run-1"]) == [
            ("accepted", 1, f"job-{one[0]}"), ("accepted", 1, f"job-{one[1]}"),
            ("sending", 1, None), ("sending", 1, None)]
    finally:
        store.close()


def test_a_group_commit_that_fails_keeps_nothing_of_its_batch(pg_url: str) -> None:
    """One transaction a wave: when marking a row ``sending`` fails, the answers of the same
    batch are not recorded either (StateError; the caller keeps them for the next commit),
    and the session goes on: the same batch then commits whole."""
    store, ids = ledger(pg_url, {"run-1": ["T1", "T2"]})
    first, second = ids["run-1"]
    answer = [Attempt(first, "accepted", 202, "tn-1", "job-1")]
    try:
        store.apply([first], [])
        with connect(pg_url) as admin:  # the server refuses to mark the second row sending
            admin.execute(f"ALTER TABLE rows ADD CONSTRAINT refuse CHECK (id <> {second}"
                          " OR status <> 'sending')")
        with pytest.raises(StateError, match="refuse"):
            store.apply([second], answer)
        assert seen(pg_url, [first, second]) == [("sending", 1, None), ("pending", 0, None)]
        with connect(pg_url) as admin:
            admin.execute("ALTER TABLE rows DROP CONSTRAINT refuse")
        store.apply([second], answer)
        assert seen(pg_url, [first, second]) == [("accepted", 1, "job-1"), ("sending", 1, None)]
    finally:
        store.close()


def test_rev_grows_for_the_runs_a_change_shows_in_and_no_other(pg_url: str) -> None:
    """run-1 and run-2 share note T1; run-3 is unrelated. A change to run-2's T1 row bumps
    run-2 and run-1 (whose report follows that note), not run-3; a statement that changes
    no row bumps nothing; forgetting run-3's rows bumps run-3 only."""
    store, ids = ledger(pg_url, {"run-1": ["T1", "T2"], "run-2": ["T1"], "run-3": ["T9"]})
    try:
        before = revs(pg_url)
        store.apply(ids["run-2"], [])
        after = revs(pg_url)
        assert after["run-2"] > before["run-2"]
        assert after["run-1"] > before["run-1"]
        assert after["run-3"] == before["run-3"]
        store.apply([], [Attempt(max(max(v) for v in ids.values()) + 1, "accepted")])
        assert revs(pg_url) == after  # no such row: nothing changed
        assert store.refuse_run("run-3", {}) == 1
        final = revs(pg_url)
        assert final["run-3"] > after["run-3"]
        assert [final["run-1"], final["run-2"]] == [after["run-1"], after["run-2"]]
    finally:
        store.close()


def _answer(store: PgLedger, row: int) -> None:
    store.apply([], [Attempt(row, "accepted", 202, "tn-1", "job-1", None,
                             "2026-01-01T00:00:01Z")])


def _confirm(store: PgLedger, row: int) -> None:
    store.add_events([EventRecord("evt-1", "created", "job-1", "tn-1", "2026-01-01T00:00:02Z",
                                  "emr-1", None, None, row_key(ACCOUNT, "T1", "a note"), 1)],
                     {}, offset=1, head="")
    assert store.match_outcomes() == 1


def _unconfirm(store: PgLedger, row: int) -> None:
    with connect(store.url) as other:  # the event is gone (a mirror rebuilt without it)
        other.execute("DELETE FROM events")
    assert store.match_outcomes() == 1


# Each UPDATE of rows the PostgreSQL ledger runs (pg_ledger.bumping): what it is given to
# do first (``before``), then the change whose bumps are checked.
CHANGES = {
    "send": (None, lambda store, row: store.apply([row], [])),
    "answer": (lambda store, row: store.apply([row], []), _answer),
    "recover": (lambda store, row: store.apply([row], []), lambda store, row: store.recover()),
    "write off": (None, lambda store, row: store.write_off("run-2", "2026-01-02T00:00:00Z")),
    "outcome": (lambda store, row: (store.apply([row], []), _answer(store, row)), _confirm),
    "outcome cleared": (lambda store, row: (store.apply([row], []), _answer(store, row),
                                            _confirm(store, row)), _unconfirm),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_to_a_row_bumps_its_run_and_the_runs_sharing_its_note(
        pg_url: str, change: str) -> None:
    """The rows table has no UPDATE trigger (migration 10): each statement that changes a
    row bumps ``runs.rev`` itself. Whatever the change to run-2's T1 row, run-2 (its
    report shows the row) and run-1 (its T1 row follows that later send, rule 5) are
    bumped, and run-4, whose row skipped T1 as already sent by run-2's under the
    account's former name (it refers to that row, under another key: rows_ref). Not
    run-1 nor run-4 for a write-off (its date shows in run-2's report only); never run-3
    (another note)."""
    before, act = CHANGES[change]
    store, ids = ledger(pg_url, {"run-1": ["T1", "T2"], "run-2": ["T1"], "run-3": ["T9"]})
    row = ids["run-2"][0]
    store.start_run("run-4", "renamed_clinic", "fp", {})
    store.add_rows("run-4", [NewRow(0, 2, "T1", row_key("renamed_clinic", "T1", "a note"),
                                    "already_sent", "already sent in run run-2", row)])
    try:
        if before is not None:
            before(store, row)
        was = revs(pg_url)
        act(store, row)
        now = revs(pg_url)
        assert now["run-2"] > was["run-2"]
        if change == "write off":  # the date shows in run-2's report only, as on SQLite
            assert (now["run-1"], now["run-4"]) == (was["run-1"], was["run-4"])
        else:
            assert now["run-1"] > was["run-1"]
            assert now["run-4"] > was["run-4"]
        assert now["run-3"] == was["run-3"]
    finally:
        store.close()


def test_an_update_of_rows_from_a_session_that_does_not_bump_is_refused(pg_url: str) -> None:
    """A tasknotes older than migration 10, still connected when a newer one migrated the
    database, sends plain UPDATEs of rows that bump no run (reviewer HIGH: the reports of
    runs sharing their notes then stayed stale). A session that does not say it bumps
    (SESSION_OPTIONS' tasknotes.bumps_rev, as every session of this tasknotes does) is
    refused, with a line saying why; nothing changed."""
    import psycopg  # noqa: PLC0415 - the postgres extra, as in the fixtures

    store, ids = ledger(pg_url, {"run-1": ["T1"], "run-2": ["T1"]})
    try:
        with psycopg.connect(pg_url, autocommit=True) as older:  # as an older tasknotes
            with pytest.raises(psycopg.Error, match="upgraded by a newer tasknotes"):
                older.execute("UPDATE rows SET status = 'sending' WHERE id = %s",
                              (ids["run-2"][0],))
            older.execute("DELETE FROM rows WHERE id = -1")  # not an UPDATE: not refused
        assert seen(pg_url, ids["run-2"]) == [("pending", 0, None)]
        store.apply(ids["run-2"], [])  # this tasknotes' sessions say they bump
        assert seen(pg_url, ids["run-2"]) == [("sending", 1, None)]
    finally:
        store.close()


def test_a_database_at_version_4_changes_to_the_per_statement_counter(pg_url: str) -> None:
    """Migrating a version-4 database replaces its per-row trigger: the rows table then has
    the DELETE trigger and the guard against sessions that do not bump (each UPDATE bumps
    by itself: pg_ledger.bumping), so no change is counted twice."""
    with connect(pg_url) as conn:
        assert migrate(conn, MIGRATIONS[:4]) == [1, 2, 3, 4]
        assert migrate(conn) == [m.version for m in MIGRATIONS[4:]]
        triggers = {str(name) for (name,) in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'rows'::regclass"
            " AND NOT tgisinternal").fetchall()}
    assert triggers == {"rows_deleted", "rows_unbumped"}
    store, ids = ledger(pg_url, {"run-1": ["T1"]})
    try:
        before = revs(pg_url)["run-1"]
        store.apply(ids["run-1"], [])
        assert revs(pg_url)["run-1"] == before + 1  # one statement, one bump
    finally:
        store.close()

