"""The ledger's tables, and the migrations from older versions of them.

``SCHEMA`` is SQLite DDL, applied idempotently on every open; ``meta`` holds
``schema_version``. Version 2 added the events mirror and ``rows.reason_codes``;
version 3 made the ledger smaller at no cost to any query: ``outcome_clock`` holds a
one-letter code (``CLOCK_CODES``) instead of its 13-24 letter name, and the events
mirror is a WITHOUT ROWID table (its event id key is the table, not an index beside
it). Older ledgers are migrated in place when opened; a newer one is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final, TypeVar

from pipeline.errors import StateError

_T = TypeVar("_T")
SCHEMA_VERSION: Final = 3
# WITHOUT ROWID: the event id is the table's key, not a second B-tree beside it (schema 3).
EVENTS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS {name} (
    event_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,             -- created | failed
    job_id TEXT,
    task_note_id TEXT,
    created TEXT,
    emr_note_id TEXT,
    failure_reason TEXT,
    reason_codes TEXT,
    ekey BLOB,
    line INTEGER,
    outcome_at TEXT,                -- the receipt's time, else the event's created
    outcome_clock TEXT,             -- a CLOCK_CODES code (schema 3; its name before)
    account TEXT                    -- api.accounts: the account its reference id names
) WITHOUT ROWID;
"""
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    state TEXT NOT NULL,            -- running | finished | aborted | crashed | dry_run
    account TEXT NOT NULL,
    config_fingerprint TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}', -- JSON: argv, limit, abort reason, counts, timings
    rev INTEGER NOT NULL DEFAULT 0  -- bumped when a row its report shows changes (TRIGGERS)
);
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    file_no INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    header TEXT NOT NULL,           -- JSON list of the header names as written
    PRIMARY KEY (run_id, file_no)
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,         -- input order within a run
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    file_no INTEGER NOT NULL,
    line INTEGER NOT NULL,
    emr_task_id TEXT NOT NULL,
    key BLOB,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    task_note_id TEXT,
    job_id TEXT,
    error TEXT,
    ref_id INTEGER,
    submitted_at TEXT,
    answered_at TEXT,
    outcome TEXT,                   -- created | failed | conflict (from reconcile)
    event_id TEXT,
    emr_note_id TEXT,
    failure_reason TEXT,
    outcome_at TEXT,
    settled_by TEXT,                -- job_id | task_note_id | evidence
    passthrough TEXT,               -- JSON list, when input.passthrough names columns
    reason_codes TEXT,              -- Cobalt's failure reason codes, ';'-separated
    outcome_clock TEXT,             -- what outcome_at is: a CLOCK_CODES code
    written_off_at TEXT,            -- a human closed this unsent row without sending it
    account TEXT                    -- the row's own account (api.accounts), else NULL
);
-- A mirror of the sink file's task_note.* events (never a note's text: ekey is the hash a
-- ledger key would have), so join rules run in SQL on indexes, not on frames in memory.
""" + EVENTS_TABLE.format(name="events") + """
-- task_note events no row owns (the first few, and how many), as of the last match.
CREATE TABLE IF NOT EXISTS orphans (event_id TEXT PRIMARY KEY, kind TEXT, job_id TEXT,
                                    created TEXT);
-- No secondary indexes on events: the joins scan it and probe the rows indexes (random
-- keys in three more B-trees made reading a million events three times slower).
DROP INDEX IF EXISTS events_job;
DROP INDEX IF EXISTS events_task_note;
DROP INDEX IF EXISTS events_ekey;
CREATE TABLE IF NOT EXISTS event_tally (name TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- The ids of the events of other types the tally counted (a replaced sink file read again
-- from its start counts each once: Ledger.add_events's ``others``).
CREATE TABLE IF NOT EXISTS tallied (event_id TEXT PRIMARY KEY) WITHOUT ROWID;
-- Every Cobalt connection a config that used this state named (its reference id, and the
-- account it sends for), so that whichever config mirrors an event keys its note under
-- the account it belongs to (Ledger.connections).
CREATE TABLE IF NOT EXISTS connections (reference_id TEXT PRIMARY KEY, account TEXT NOT NULL,
                                        since TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rows_run ON rows (run_id, id);
CREATE INDEX IF NOT EXISTS rows_key ON rows (key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_job ON rows (job_id) WHERE job_id IS NOT NULL;
-- The rows that refer to an earlier attempt (already sent, held): a change to that attempt
-- bumps their runs (TRIGGERS: rows_linked), whose keys may differ from its (formerly, NFC).
CREATE INDEX IF NOT EXISTS rows_ref ON rows (ref_id) WHERE ref_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_sending ON rows (status) WHERE status = 'sending';
CREATE INDEX IF NOT EXISTS rows_task_note ON rows (task_note_id) WHERE task_note_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS rows_ambiguous ON rows (id) WHERE status = 'ambiguous';
-- What `status` asks about: rows with no outcome (awaiting, ambiguous, held, unsent) and
-- EMR failures; small beside the confirmed rows, so status does not read every row.
CREATE INDEX IF NOT EXISTS rows_open ON rows (status) WHERE outcome IS NULL;
CREATE INDEX IF NOT EXISTS rows_failed ON rows (status) WHERE outcome = 'failed';
CREATE INDEX IF NOT EXISTS rows_conflict ON rows (status) WHERE outcome = 'conflict';
CREATE INDEX IF NOT EXISTS rows_unsent ON rows (status) WHERE status IN ('pending', 'failed');
"""


# What a run's report shows changes only through its rows, the rows of other runs with
# the same note (rule 5 in rules.py: the send it follows), the earlier attempts its held
# and already-sent rows refer to (``ref_id``; under another key when that attempt was
# found under an account's former name, ``formerly``, or in the form a version before NFC
# gave the note) and its run record: each row change bumps ``runs.rev`` of the runs it can
# show in, so reconcile rewrites only reports whose run changed
# (``Ledger.report_marker``), and the join rules are not re-run when no row and no event
# changed (``Ledger.match_outcomes``).
# A change to a row that other runs' reports show (as the send they follow, rule 5, or the
# earlier attempt they refer to): not a write-off date, a failure text or an attempt count.
_SHOWN_CHANGED: Final = """(OLD.status IS NOT NEW.status OR OLD.outcome IS NOT NEW.outcome
      OR OLD.job_id IS NOT NEW.job_id OR OLD.task_note_id IS NOT NEW.task_note_id
      OR OLD.submitted_at IS NOT NEW.submitted_at OR OLD.outcome_at IS NOT NEW.outcome_at
      OR OLD.event_id IS NOT NEW.event_id OR OLD.emr_note_id IS NOT NEW.emr_note_id
      OR OLD.outcome_clock IS NOT NEW.outcome_clock OR OLD.key IS NOT NEW.key)"""
TRIGGERS: Final = (
    """CREATE TRIGGER IF NOT EXISTS rows_changed AFTER UPDATE ON rows BEGIN
    UPDATE runs SET rev = rev + 1 WHERE run_id = NEW.run_id;
END""",
    f"""CREATE TRIGGER IF NOT EXISTS rows_followed AFTER UPDATE ON rows
 WHEN NEW.key IS NOT NULL AND {_SHOWN_CHANGED}
BEGIN
    UPDATE runs SET rev = rev + 1 WHERE run_id IN (
        SELECT run_id FROM rows WHERE key = NEW.key AND run_id != NEW.run_id);
END""",  # noqa: S608 - _SHOWN_CHANGED: a constant
    f"""CREATE TRIGGER IF NOT EXISTS rows_linked AFTER UPDATE ON rows WHEN {_SHOWN_CHANGED}
BEGIN
    UPDATE runs SET rev = rev + 1 WHERE run_id IN (
        SELECT run_id FROM rows INDEXED BY rows_ref WHERE ref_id = NEW.id
           AND run_id != NEW.run_id);
END""",  # noqa: S608 - _SHOWN_CHANGED: a constant
    """CREATE TRIGGER IF NOT EXISTS rows_gone AFTER DELETE ON rows BEGIN
    UPDATE runs SET rev = rev + 1 WHERE run_id = OLD.run_id;
END""",
)


# The rows' triggers that bump ``runs.rev`` on an UPDATE (``SQLiteOutcomes._write_outcomes``
# sets them aside for a large write of outcomes and bumps the same runs itself).
TRIGGER_NAMES: Final = ("rows_changed", "rows_followed", "rows_linked")


def check_version(db: sqlite3.Connection, path: Path) -> None:
    """Migrate the ledger at ``path`` to SCHEMA_VERSION, inside the caller's transaction.

    Raises StateError if SQLite is older than 3.33 (``UPDATE ... FROM``) or the
    ledger was written by a newer schema.
    """
    if sqlite3.sqlite_version_info < (3, 33):
        raise StateError(f"SQLite {sqlite3.sqlite_version} is too old: 3.33 or newer is needed")
    found = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if found is not None and int(found[0]) == 1:  # v2 added the events mirror and this:
        columns = {r[1] for r in db.execute("PRAGMA table_info(rows)")}
        if "reason_codes" not in columns:
            db.execute("ALTER TABLE rows ADD COLUMN reason_codes TEXT")
    for table, added in ADDED_COLUMNS.items():  # additive, so still schema 2
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for column in added:
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
    db.execute(ACCOUNT_INDEX)  # on a column added after schema 2: made once it is there
    have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    if "rev" not in have:  # additive: a report written before it is rewritten once
        db.execute("ALTER TABLE runs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0")
    if found is None or int(found[0]) < 3:
        # Events of a ledger older than schema 3 may lack their clock; from 3 on add_events
        # always stores one, so this full pass over the events (which grow every night)
        # is not made on every open, only on the way to schema 3.
        db.execute(OLD_EVENTS_SQL)
    if found is not None and int(found[0]) < 3:
        _compact(db)
    for trigger in TRIGGERS:
        db.execute(trigger)
    if found is None or int(found[0]) < SCHEMA_VERSION:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                   (SCHEMA_VERSION,))
    elif int(found[0]) != SCHEMA_VERSION:
        raise StateError(f"ledger {path} has schema {found[0]}, expected {SCHEMA_VERSION}")


# The accounts rows name themselves (api.accounts; empty without): the scan's check of the
# account labels the ledger holds (``sent_accounts``) reads it, not every row.
ACCOUNT_INDEX: Final = """CREATE INDEX IF NOT EXISTS rows_account ON rows (account)
 WHERE account IS NOT NULL AND account != ''"""
# What a row's outcome_at means: the time the sink received the webhook (UTC, ms); or,
# for an event poll fetched or one stored before the sink kept receipts, the event's own
# ``created`` time (Cobalt's clock, whole seconds). Only the first is a latency.
OUTCOME_CLOCKS: Final = ("sink_received", "event_created_polled", "event_created_no_receipt")
# Columns added after schema 2 shipped (additive: a ledger gains them when opened).
ADDED_COLUMNS: Final = {"rows": ("outcome_clock", "written_off_at", "account"),
                        "events": ("outcome_at", "outcome_clock", "account")}
# How outcome_clock is stored (schema 3): a letter per OUTCOME_CLOCKS name.
CLOCK_CODES: Final = {"sink_received": "r", "event_created_polled": "p",
                      "event_created_no_receipt": "n"}
CLOCK_NAMES: Final = {code: name for name, code in CLOCK_CODES.items()}
OLD_EVENTS_SQL: Final = """
UPDATE events SET outcome_at = created, outcome_clock = 'n' WHERE outcome_clock IS NULL"""
# outcome_clock names to CLOCK_CODES (a code, or NULL, is left as it is).
_ROWS_TO_CODES: Final = """UPDATE rows SET outcome_clock = CASE outcome_clock
    WHEN 'sink_received' THEN 'r' WHEN 'event_created_polled' THEN 'p'
    WHEN 'event_created_no_receipt' THEN 'n' END
 WHERE outcome_clock IN ('sink_received', 'event_created_polled', 'event_created_no_receipt')"""
_COPY_EVENTS: Final = """INSERT INTO events_v3 (event_id, kind, job_id, task_note_id, created,
    emr_note_id, failure_reason, reason_codes, ekey, line, outcome_at, outcome_clock, account)
SELECT event_id, kind, job_id, task_note_id, created, emr_note_id, failure_reason,
       reason_codes, ekey, line, outcome_at, CASE outcome_clock WHEN 'sink_received' THEN 'r'
       WHEN 'event_created_polled' THEN 'p' WHEN 'event_created_no_receipt' THEN 'n'
       ELSE outcome_clock END, account
  FROM events"""


def clock_name(code: _T) -> _T | str:
    """The OUTCOME_CLOCKS name a stored ``outcome_clock`` code stands for; anything else
    (None, NaN, a name an older ledger stored) as it is."""
    return CLOCK_NAMES.get(code, code) if isinstance(code, str) else code


def _compact(db: sqlite3.Connection) -> None:
    """Schema 2 to 3 in place: outcome_clock names to CLOCK_CODES, and the events mirror
    rebuilt WITHOUT ROWID. No report changes (the names read back are the same), so the
    rows' triggers are dropped for the update (recreated by the caller) and no run's
    ``rev`` moves."""
    db.execute("DROP TRIGGER IF EXISTS rows_changed")
    db.execute("DROP TRIGGER IF EXISTS rows_followed")
    db.execute("DROP TRIGGER IF EXISTS rows_linked")
    db.execute(_ROWS_TO_CODES)
    without_rowid = db.execute("SELECT sql LIKE '%WITHOUT ROWID%' FROM sqlite_schema"
                               " WHERE type = 'table' AND name = 'events'").fetchone()
    if without_rowid is not None and without_rowid[0]:  # a version-1 ledger: made new
        return
    db.execute("DROP TABLE IF EXISTS events_v3")
    db.execute(EVENTS_TABLE.format(name="events_v3"))
    db.execute(_COPY_EVENTS)
    db.execute("DROP TABLE events")
    db.execute("ALTER TABLE events_v3 RENAME TO events")
    db.execute("INSERT OR REPLACE INTO meta SELECT 'events_stored', COUNT(*) FROM events")
