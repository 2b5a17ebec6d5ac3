"""Compact storage (schema 3): outcome_clock stored as a one-letter code, the events mirror a
WITHOUT ROWID table; a schema-2 ledger is migrated in place when opened, reports read the
same, and a rerun of its input sends nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from helpers import (
    EmulatorThread,
    make_config,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.events import compact_json as compact
from pipeline.state import Ledger
from pipeline.state.schema import CLOCK_CODES, EVENTS_TABLE

OLD = "2026-01-05T10:00:00Z"


def _send_and_settle(tmp_path: Path, server: EmulatorThread, n: int) -> tuple[Path, Path, str]:
    """Send ``n`` notes, append their created events to the sink file (no receipts: clock
    event_created_no_receipt), reconcile; returns (config file, input, run id)."""
    data = write_csv(tmp_path / "input.csv", notes(n))
    config = make_config(tmp_path, api={"base_url": server.url})
    run = run_pipeline(config, str(data))
    wait_until(lambda: len(server.emulator.events) == n, what="the outcomes")
    config.webhooks.sink.parent.mkdir(parents=True, exist_ok=True)
    with config.webhooks.sink.open("ab") as fh:
        for item in server.emulator.events:
            fh.write(compact({"id": item["event_id"], "access_token_reference_id": "u",
                              "object": "event", "created": OLD, "type": item["event_type"],
                              "job_id": item["job_id"], "data": item["data"]}) + b"\n")
    path = write_config(tmp_path, api={"base_url": server.url})
    assert main(["-q", "reconcile", str(path)]) == 0
    return path, data, run.run_id


def _as_schema_2(ledger: Path) -> None:
    """Rewrite a ledger as schema 2 wrote it: clock names in rows and events, the events
    mirror a rowid table with an index for its key, ``schema_version`` 2."""
    names = {code: name for name, code in CLOCK_CODES.items()}
    db = sqlite3.connect(ledger, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.execute("DROP TRIGGER rows_changed")
        db.execute("DROP TRIGGER rows_followed")
        for code, name in names.items():
            db.execute("UPDATE rows SET outcome_clock = ? WHERE outcome_clock = ?", (name, code))
        db.execute(EVENTS_TABLE.format(name="events_v2").replace(" WITHOUT ROWID", ""))
        db.execute("INSERT INTO events_v2 SELECT * FROM events")
        for code, name in names.items():
            db.execute("UPDATE events_v2 SET outcome_clock = ? WHERE outcome_clock = ?",
                       (name, code))
        db.execute("DROP TABLE events")
        db.execute("ALTER TABLE events_v2 RENAME TO events")
        db.execute("DELETE FROM meta WHERE key = 'events_stored'")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        db.execute("COMMIT")
    finally:
        db.close()


def _layout(ledger: Path) -> dict[str, object]:
    with sqlite3.connect(ledger) as db:
        return {
            "version": db.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone()[0],
            "events index": db.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'index'"
                                       " AND tbl_name = 'events'").fetchone()[0],
            "row clocks": {r[0] for r in db.execute("SELECT outcome_clock FROM rows")},
            "event clocks": {r[0] for r in db.execute("SELECT outcome_clock FROM events")},
            "events": db.execute("SELECT count(*) FROM events").fetchone()[0],
        }


def test_a_new_ledger_stores_clock_codes_and_no_index_beside_its_events(tmp_path: Path) -> None:
    with EmulatorThread() as server:
        _, _, run_id = _send_and_settle(tmp_path, server, 4)
    config = make_config(tmp_path)
    assert _layout(config.state.ledger) == {"version": "3", "events index": 0,
                                            "row clocks": {"n"}, "event clocks": {"n"},
                                            "events": 4}
    results = read_results(config.report.dir / run_id)
    assert {r["outcome_clock"] for r in results} == {"event_created_no_receipt"}
    ledger = Ledger(config.state.ledger, readonly=True)
    try:
        assert {e.outcome_clock for e in ledger.events()} == {"event_created_no_receipt"}
        assert set(ledger.frame(run_id)["outcome_clock"]) == {"event_created_no_receipt"}
    finally:
        ledger.close()


def test_a_schema_2_ledger_is_migrated_in_place_reads_the_same_and_sends_nothing_again(
        tmp_path: Path) -> None:
    with EmulatorThread() as server:
        path, data, run_id = _send_and_settle(tmp_path, server, 5)
        config = make_config(tmp_path, api={"base_url": server.url})
        report = config.report.dir / run_id
        before = read_results(report)
        _as_schema_2(config.state.ledger)
        assert _layout(config.state.ledger) == {
            "version": "2", "events index": 1, "row clocks": {"event_created_no_receipt"},
            "event clocks": {"event_created_no_receipt"}, "events": 5}

        assert main(["-q", "reconcile", str(path)]) == 0  # opens it: migrated
        assert _layout(config.state.ledger) == {"version": "3", "events index": 0,
                                                "row clocks": {"n"}, "event clocks": {"n"},
                                                "events": 5}
        assert read_results(report) == before
        assert {r["final_status"] for r in before} == {"confirmed"}

        again = run_pipeline(config, str(data))
        assert (again.scan.to_send, again.scan.already_sent) == (0, 5)
        for task, note in notes(5):
            assert server.stored(task, note) == 1
        assert main(["-q", "reconcile", str(path)]) == 0  # a new event is still mirrored
    ledger = Ledger(config.state.ledger, readonly=True)
    try:
        assert len(ledger.events()) == 5
    finally:
        ledger.close()
