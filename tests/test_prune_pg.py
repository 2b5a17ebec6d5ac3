"""``tasknotes prune`` with ``state.url``: the note text of old events stored in PostgreSQL
(``sink_events``) goes, everything that matches and de-duplicates them stays, the sink's
inserts meanwhile are all kept, and an interrupted prune leaves each batch whole or
untouched (a real throwaway server: tests/pg.py)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from helpers import EmulatorThread, make_config, notes, run_pipeline, write_config, write_csv
from pipeline.cli import main
from pipeline.errors import StateError
from pipeline.events import compact_json as compact
from pipeline.events import decode_event, is_pruned
from pipeline.reconciliation import ingest_postgres
from pipeline.retention import prune
from pipeline.state.pg_events import PgEventStore
from pipeline.state.postgres import connect, open_state
from pipeline.state.store import open_store

pytestmark = pytest.mark.slow

OLD = "2026-01-05T10:00:00Z"
NEW = "2099-01-01T00:00:00Z"
SECRET = "Zoë's PHI: called patient about the biopsy"


def created(event_id: str, job_id: str, task_id: str, note: str, when: str = OLD) -> bytes:
    return compact({"id": event_id, "access_token_reference_id": "user_1", "object": "event",
                    "created": when, "type": "task_note.created", "job_id": job_id,
                    "data": {"task_note_id": f"tn_{event_id}", "emr_note_id": "f862b0a0",
                             "emr_task_id": task_id, "note": note}})


def store(url: str, bodies: list[bytes]) -> None:
    """Insert bodies as the sink stores them (signed, now), one transaction each."""
    with connect(url) as conn:
        for body in bodies:
            conn.execute(
                "INSERT INTO sink_events (event_id, body_sha256, body, verdict, received_at)"
                " VALUES (%s, %s, %s, 'signature-verified', now()) ON CONFLICT DO NOTHING",
                (decode_event(body)["id"], hashlib.sha256(body).digest(), body))


def stored(url: str) -> dict[str, tuple[dict[str, Any], bytes]]:
    """event id -> (decoded body, body_sha256); every body must decode."""
    with connect(url) as conn:
        return {str(i): (decode_event(bytes(b)), bytes(h)) for i, b, h in conn.execute(
            "SELECT event_id, body, body_sha256 FROM sink_events ORDER BY seq").fetchall()}


def test_prune_removes_note_text_in_postgres_and_a_rerun_sends_nothing(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = notes(4)
    rows[0][1] = SECRET
    data = write_csv(tmp_path / "input.csv", rows)
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    with EmulatorThread() as server:
        config = make_config(tmp_path, api={"base_url": server.url}, state={"url": pg_url})
        run_pipeline(config, str(data))
        with connect(pg_url) as conn:
            sent = conn.execute("SELECT job_id, emr_task_id FROM rows ORDER BY id").fetchall()
            conn.execute("UPDATE runs SET started_at = '2026-01-05T09:00:00.000Z'")
        by_task = dict(map(tuple, rows))
        old = [created(f"evt_{i}", str(job), str(task), by_task[str(task)])
               for i, (job, task) in enumerate(sent)]
        store(pg_url, [*old, created("evt_new", "999", "T-new", SECRET, when=NEW)])
        path = write_config(tmp_path, api={"base_url": server.url},
                            state={"url": "${TASKNOTES_STATE_URL}"})

        assert main(["prune", str(path), "--older-than", "30", "--dry-run"]) == 0
        assert "would remove the note text of 4 events" in capsys.readouterr().out
        assert stored(pg_url)["evt_0"][0]["data"]["note"] == SECRET  # a dry run: untouched

        assert main(["prune", str(path), "--older-than", "30"]) == 0
        out = capsys.readouterr().out
        assert "removed the note text of 4 events" in out
        assert "rewrote 1 report (report.html) without note previews" in out  # the old run's
        assert SECRET not in out
        found = stored(pg_url)
        for i, body in enumerate(old):
            event, digest = found[f"evt_{i}"]
            assert is_pruned(event)
            assert event["data"]["note"] is None
            assert event["job_id"] == str(sent[i][0])  # what matches it to its row stays
            assert digest == hashlib.sha256(body).digest()  # a redelivery: still a duplicate
        assert found["evt_new"][0]["data"]["note"] == SECRET
        store(pg_url, old)  # the originals redelivered: nothing new stored
        assert len(stored(pg_url)) == 5
        with connect(pg_url) as conn:
            assert SECRET.encode() not in b"".join(
                bytes(b) for (b,) in conn.execute(
                    "SELECT body FROM sink_events WHERE event_id != 'evt_new'").fetchall())

        assert main(["prune", str(path), "--older-than", "30"]) == 0  # again: nothing to do
        assert "removed the note text of 0 events" in capsys.readouterr().out
        again = run_pipeline(config, str(data))
        assert (again.scan.to_send, again.scan.already_sent) == (0, 4)
        for task, note in rows:
            assert server.stored(task, note) == 1


def test_prune_in_postgres_keeps_every_event_the_sink_inserts_meanwhile(
        pg_url: str, tmp_path: Path) -> None:
    """Many small batches while another connection inserts events as the sink does: every
    insert is there whole, every old event mirrored before the prune is pruned, and the
    old ones the ledger had not read yet are kept whole."""
    open_state(pg_url).close()
    store(pg_url, [created(f"evt_old_{i}", str(i), f"T{i}", SECRET) for i in range(60)])
    config = make_config(tmp_path, state={"url": pg_url})
    make_ledger_read_them(config)
    unread = [created(f"evt_unread_{i}", str(500 + i), f"U{i}", SECRET) for i in range(5)]
    store(pg_url, unread)  # old, but stored after the ledger read: their text is kept
    done = threading.Event()
    inserted: list[bytes] = []

    def sink() -> None:
        n = 0
        while not done.is_set() and n < 5000:  # bounded: stops by itself
            body = created(f"evt_live_{n}", str(10_000 + n), f"L{n}", SECRET, when=NEW)
            store(pg_url, [body])
            inserted.append(body)
            n += 1

    writer = threading.Thread(target=sink)
    writer.start()
    try:
        result = prune(config, 30, db_batch=3)
    finally:
        done.set()
        writer.join(timeout=60)
    assert (result.events_pruned, result.not_mirrored) == (60, 5)
    assert inserted  # the sink did insert while the prune ran
    found = stored(pg_url)
    for body in inserted:
        event = decode_event(body)
        assert found[event["id"]][0] == event
    assert all(is_pruned(found[f"evt_old_{i}"][0]) for i in range(60))
    assert [found[decode_event(b)["id"]][0]["data"]["note"] for b in unread] == [SECRET] * 5


def test_prune_in_postgres_interrupted_leaves_each_batch_whole_and_a_rerun_finishes(
        pg_url: str, tmp_path: Path) -> None:
    open_state(pg_url).close()
    old = [created(f"evt_{i:02d}", str(i), f"T{i}", SECRET) for i in range(10)]
    store(pg_url, old)
    config = make_config(tmp_path, state={"url": pg_url})
    make_ledger_read_them(config)
    calls = 0

    def interrupted(step: str) -> None:
        nonlocal calls
        calls += step == "event"
        if calls == 7:  # inside the second batch of 4, before its UPDATE
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(config, 30, checkpoint=interrupted, db_batch=4)
    found = stored(pg_url)
    assert [is_pruned(found[f"evt_{i:02d}"][0]) for i in range(10)] == [True] * 4 + [False] * 6
    for i in range(4, 10):  # untouched: byte for byte as received
        assert compact(found[f"evt_{i:02d}"][0]) == old[i]
    assert prune(config, 30, db_batch=4).events_pruned == 6
    assert all(is_pruned(e) for e, _ in stored(pg_url).values())


def make_ledger_read_them(config: Any) -> None:
    """Mirror the stored events into the ledger (a reconcile's first step), so the prune may
    take their text (an event the ledger has not read yet is kept whole)."""
    ledger = open_store(config)
    try:
        ingest_postgres(ledger, config.api.account_id())
    finally:
        ledger.close()


def test_a_second_prune_of_one_database_is_refused_and_changes_nothing(
        pg_url: str, tmp_path: Path) -> None:
    """One prune at a time per database: while another holds the prune lock, a prune stops
    with one line naming the database (no password) and rewrites nothing; once it lets
    go, the prune runs."""
    open_state(pg_url).close()
    old = [created(f"evt_{i}", str(i), f"T{i}", SECRET) for i in range(3)]
    store(pg_url, old)
    config = make_config(tmp_path, state={"url": pg_url})
    make_ledger_read_them(config)
    other = PgEventStore(pg_url, application="another prune")
    other.open()
    try:
        with other.prune_lock(), pytest.raises(StateError) as refused:
            prune(config, 30)
    finally:
        other.close()
    assert "another tasknotes prune is pruning the events in PostgreSQL" in str(refused.value)
    password = urlsplit(pg_url).password
    assert password is None or password not in str(refused.value)
    assert [compact(e) for e, _ in stored(pg_url).values()] == old
    assert prune(config, 30).events_pruned == 3
