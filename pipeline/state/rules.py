"""The reconciliation join rules: what they say, and the SQL that applies them.

Ledger rows are joined with the mirrored sink events (``Ledger.match_outcomes``),
in this order:

1. Events collapse by event id; only ``task_note.*`` events take part, other
   types are counted and left alone.
2. A row is matched to events by ``job_id`` compared as text (an integer in
   Cobalt's response, a string in its webhooks), and, for a row with no
   ``job_id`` match, by ``task_note_id``. Matching covers the rows of every
   run, so an event that belongs to another run is not an orphan.
3. A row with ``created`` events only is ``created``; ``failed`` only is
   ``failed``; both is a ``conflict`` (shown with both event ids). With
   api.accounts, an event whose ``access_token_reference_id`` names another
   account than the row's is a ``conflict`` too.
4. Evidence: an ``ambiguous`` row (no answer came back) is settled when a
   ``task_note.created`` event that no row claims carries the same note for
   the same task (their ledger keys are equal). Rows and events sharing a key
   pair up in order (rows by id, events by time): one event settles one row.
5. A note's evidence follows it. A row whose own attempt did not deliver its
   note (never sent, send failed, skipped as already sent, held, or failed in
   the EMR) follows the send of the same note (same ledger key) by another run,
   earlier or later, that delivered it: a confirmed send first, else one still
   awaiting its outcome. The row then shows that run's id, job id and outcome,
   and its final status is that send's as known now: ``skipped_already_sent``
   ("sent in run X as job J: confirmed") once confirmed, ``awaiting_outcome``
   while pending (never counted as ended well before it is confirmed). A row
   so followed is not open and goes into no redrive.csv. When no run delivered
   it but an attempt of another run may have (ambiguous, in flight, or a
   conflict of events: ``IN_DOUBT``), a row not sent, whose send failed, or
   that failed in the EMR, is ``ambiguous`` too ("sent in run X: may have
   reached Cobalt"): its note may be in the chart, so no redrive.csv offers it.
6. ``task_note.*`` events that match no row of any run are orphans.

Rules 1-4 and 6 are the statements below; rule 5 is ``VIA_SQL`` (read with a
run's rows) and ``UNSETTLED_RUNS_SQL``; the final status each row takes from
them is decided in pipeline/reconciliation.py. SQLite dialect (``UPDATE ... FROM``,
``INDEXED BY``, window functions).
"""

from __future__ import annotations

from typing import Final

from pipeline.state.records import Earlier

# What the rules read of a claimed event (not its job id, task note id, key or line: a
# copy of each for every row claimed, a million at 1M rows, read by no rule).
_CLAIMED: Final = ("e.event_id, e.kind, e.created, e.emr_note_id, e.failure_reason,"
                   " e.reason_codes, e.outcome_at, e.outcome_clock, e.account")
# matched by job_id, or, for a row with no job_id match, by task_note_id.
MATCH_SQL: Final = (
    f"""CREATE TEMP TABLE claimed AS
    SELECT r.id AS row_id, {_CLAIMED}, 'job_id' AS settled_by
      FROM events e JOIN rows r INDEXED BY rows_job ON r.job_id = e.job_id
     WHERE e.job_id IS NOT NULL""",  # noqa: S608 - constants only
    """CREATE INDEX temp.claimed_row ON claimed (row_id)""",
    f"""INSERT INTO claimed
    SELECT r.id, {_CLAIMED}, 'task_note_id'
      FROM events e JOIN rows r INDEXED BY rows_task_note ON r.task_note_id = e.task_note_id
     WHERE e.task_note_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM claimed c WHERE c.row_id = r.id)""",  # noqa: S608
    # Most rows have one event: taken as it is, grouped on the row index, no sorting.
    """CREATE TEMP TABLE matched AS
    SELECT row_id, kind AS outcome, event_id, emr_note_id, failure_reason, reason_codes,
           outcome_at, settled_by, outcome_clock
      FROM claimed GROUP BY row_id HAVING COUNT(*) = 1""",
    """CREATE UNIQUE INDEX temp.matched_row ON matched (row_id)""",
    # Rows with several events: the earliest of each kind; created and failed: a conflict.
    """INSERT INTO matched
    WITH several AS (
        SELECT * FROM claimed
         WHERE row_id IN (SELECT row_id FROM claimed GROUP BY row_id HAVING COUNT(*) > 1)),
    firsts AS (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY row_id, kind ORDER BY created, event_id) AS n
          FROM several),
    c AS (SELECT * FROM firsts WHERE n = 1 AND kind = 'created'),
    f AS (SELECT * FROM firsts WHERE n = 1 AND kind = 'failed')
    SELECT c.row_id, CASE WHEN f.row_id IS NULL THEN 'created' ELSE 'conflict' END,
           CASE WHEN f.row_id IS NULL THEN c.event_id ELSE c.event_id || ';' || f.event_id END,
           c.emr_note_id, f.failure_reason, f.reason_codes, c.outcome_at, c.settled_by,
           c.outcome_clock
      FROM c LEFT JOIN f ON f.row_id = c.row_id
    UNION ALL
    SELECT f.row_id, 'failed', f.event_id, NULL, f.failure_reason, f.reason_codes,
           f.outcome_at, f.settled_by, f.outcome_clock
      FROM f WHERE NOT EXISTS (SELECT 1 FROM c WHERE c.row_id = f.row_id)""",
    # api.accounts: an event of another account's connection than its row's: a conflict.
    """UPDATE matched SET outcome = 'conflict' WHERE row_id IN (
    SELECT c.row_id FROM claimed c JOIN rows r ON r.id = c.row_id
     WHERE c.account IS NOT NULL AND r.account IS NOT NULL AND r.account != ''
       AND c.account != r.account)""",
)
ANY_DOUBTFUL_SQL: Final = """
SELECT 1 FROM rows INDEXED BY rows_ambiguous
 WHERE status = 'ambiguous' AND key IS NOT NULL AND id NOT IN (SELECT row_id FROM matched)
 LIMIT 1"""
# Evidence: ambiguous rows and unclaimed created events with the same key, paired in
# order (rows by id, events by time), so one event settles at most one row.
EVIDENCE_SQL: Final = """
INSERT INTO matched
WITH doubtful AS (
    SELECT id AS row_id, key, ROW_NUMBER() OVER (PARTITION BY key ORDER BY id) AS n
      FROM rows INDEXED BY rows_ambiguous
     WHERE status = 'ambiguous' AND key IS NOT NULL
       AND id NOT IN (SELECT row_id FROM matched)),
spare AS (
    SELECT e.*, ROW_NUMBER() OVER (PARTITION BY ekey ORDER BY created, event_id) AS n
      FROM events e
     WHERE kind = 'created' AND ekey IN (SELECT key FROM doubtful)
       AND event_id NOT IN (SELECT event_id FROM claimed))
SELECT d.row_id, 'created', s.event_id, s.emr_note_id, NULL, NULL, s.outcome_at, 'evidence',
       s.outcome_clock
  FROM doubtful d JOIN spare s ON s.ekey = d.key AND s.n = d.n"""
# Owned event ids are keyed (the NOT IN probes that key, no list built from it); every
# owned event is a mirrored event, so the orphans are counted without reading the events
# (their count less the owned), and only when there are some are the first few looked for
# (ORPHAN_LIST_SQL, then temp.owned dropped).
ORPHANS_SQL: Final = (
    "DELETE FROM orphans",
    "CREATE TEMP TABLE owned (event_id TEXT PRIMARY KEY) WITHOUT ROWID",
    """INSERT OR IGNORE INTO owned
    SELECT event_id FROM claimed UNION ALL SELECT event_id FROM matched
     WHERE settled_by = 'evidence'""",
    """INSERT OR REPLACE INTO meta
    SELECT 'orphans', (SELECT COUNT(*) FROM events) - (SELECT COUNT(*) FROM owned)""",
)
ORPHAN_LIST_SQL: Final = """
INSERT INTO orphans
SELECT event_id, kind, job_id, created FROM events
 WHERE event_id NOT IN (SELECT event_id FROM owned) ORDER BY created, event_id LIMIT 50"""
CLEAR_OUTCOMES_SQL: Final = """
UPDATE rows SET outcome = NULL, event_id = NULL, emr_note_id = NULL, failure_reason = NULL,
       outcome_at = NULL, settled_by = NULL, outcome_clock = NULL
 WHERE outcome IS NOT NULL AND id NOT IN (SELECT row_id FROM matched)"""
WRITE_OUTCOMES_SQL: Final = """
UPDATE rows SET outcome = m.outcome, event_id = m.event_id, emr_note_id = m.emr_note_id,
       failure_reason = m.failure_reason, outcome_at = m.outcome_at, settled_by = m.settled_by,
       reason_codes = m.reason_codes, outcome_clock = m.outcome_clock
  FROM matched m
 WHERE m.row_id = rows.id
   AND (rows.outcome IS NOT m.outcome OR rows.event_id IS NOT m.event_id
        OR rows.failure_reason IS NOT m.failure_reason OR rows.settled_by IS NOT m.settled_by
        OR rows.emr_note_id IS NOT m.emr_note_id OR rows.outcome_at IS NOT m.outcome_at
        OR rows.outcome_clock IS NOT m.outcome_clock)"""
# WRITE_OUTCOMES_SQL for many rows at once (``Ledger.match_outcomes``): the rows it would
# change, found first; they are written with the rows' triggers (schema.TRIGGERS) set
# aside, and ``runs.rev`` is bumped once for each run those triggers would have bumped:
# the run of each changed row, and (rows_followed) every other run holding the key of a
# changed row whose outcome, outcome_at, event_id, emr_note_id or outcome_clock moved.
# Per row, the triggers cost more than the write itself (two UPDATEs of ``runs`` and a
# ``rows_key`` lookup per row: 70% of the write of 200,000 outcomes).
CHANGED_OUTCOMES_SQL: Final = """
CREATE TEMP TABLE changed AS
SELECT m.*, r.run_id, r.key,
       r.outcome IS NOT m.outcome OR r.event_id IS NOT m.event_id
       OR r.emr_note_id IS NOT m.emr_note_id OR r.outcome_at IS NOT m.outcome_at
       OR r.outcome_clock IS NOT m.outcome_clock AS moved
  FROM matched m JOIN rows r ON r.id = m.row_id
 WHERE r.outcome IS NOT m.outcome OR r.event_id IS NOT m.event_id
       OR r.failure_reason IS NOT m.failure_reason OR r.settled_by IS NOT m.settled_by
       OR r.emr_note_id IS NOT m.emr_note_id OR r.outcome_at IS NOT m.outcome_at
       OR r.outcome_clock IS NOT m.outcome_clock"""
# The changed rows hold their new outcomes (matched's columns): written in one pass over
# them, each row found by its id.
WRITE_CHANGED_SQL: Final = """
UPDATE rows SET outcome = c.outcome, event_id = c.event_id, emr_note_id = c.emr_note_id,
       failure_reason = c.failure_reason, outcome_at = c.outcome_at, settled_by = c.settled_by,
       reason_codes = c.reason_codes, outcome_clock = c.outcome_clock
  FROM changed c
 WHERE c.row_id = rows.id"""
# The changed rows whose outcome moved and whose key another row holds too (a note sent by
# more than one row), found one of two ways with the same result: {shared} is
# SHARED_PROBED (a probe of rows_key per changed row: a nightly reconcile, few changed rows
# in a large ledger) or SHARED_SCANNED (rows_key read once, in order, for the keys more
# than one row holds: when a large share of the ledger changed, as at its first reconcile,
# where a million probes at random places cost six times the read).
SHARED_PROBED: Final = """
SELECT c.row_id, c.run_id, c.key FROM changed c
 WHERE c.moved AND c.key IS NOT NULL AND EXISTS (
       SELECT 1 FROM rows d INDEXED BY rows_key WHERE d.key = c.key AND d.id != c.row_id)"""
SHARED_SCANNED: Final = """
SELECT c.row_id, c.run_id, c.key FROM changed c
 WHERE c.moved AND c.key IN (SELECT key FROM rows INDEXED BY rows_key
                              WHERE key IS NOT NULL GROUP BY key HAVING COUNT(*) > 1)"""
BUMP_CHANGED_SQL: Final = """
WITH shared AS ({shared})
UPDATE runs SET rev = rev + 1
 WHERE run_id IN (SELECT run_id FROM changed)
    OR run_id IN (SELECT o.run_id FROM shared s JOIN rows o INDEXED BY rows_key
                     ON o.key = s.key AND o.run_id != s.run_id)
    OR run_id IN (SELECT o.run_id FROM changed c JOIN rows o INDEXED BY rows_ref
                     ON o.ref_id = c.row_id AND o.run_id != c.run_id WHERE c.moved)"""
# "No run delivered the note of the row {row} (its key, not NULL)": Cobalt has the note
# (created), or took it and no outcome is in; one probe of rows_key per row (``key NOT IN
# (the delivered keys)`` read every delivered row).
NOT_DELIVERED: Final = """NOT EXISTS (
    SELECT 1 FROM rows d INDEXED BY rows_key WHERE d.key = {row}.key
       AND (d.outcome = 'created' OR (d.status = 'accepted' AND d.outcome IS NULL)))"""
EMR_FAILURES_SQL: Final = f"""
SELECT run_id, key, failure_reason, reason_codes, outcome_at FROM rows INDEXED BY rows_failed
 WHERE status IN ('accepted', 'ambiguous') AND outcome = 'failed'
   AND key IS NOT NULL AND {NOT_DELIVERED.format(row="rows")} ORDER BY id"""  # noqa: S608
RUN_CHUNK_SQL: Final = """
SELECT r.*, f.path AS source_file, ref.run_id AS ref_run_id, ref.job_id AS ref_job_id,
       ref.outcome AS ref_outcome
  FROM rows r
  LEFT JOIN files f ON f.run_id = r.run_id AND f.file_no = r.file_no
  LEFT JOIN rows ref ON ref.id = r.ref_id
 WHERE r.run_id = ? AND r.id > ?
 ORDER BY r.id
 LIMIT ?"""
# What a row's final status is decided from (reconciliation._final_status without the
# detail texts; with ``via_*`` added as for RUN_CHUNK_SQL): counting a run's final
# statuses reads these, not the 30 columns of RUN_CHUNK_SQL (the Python objects made
# for each value read cost more than the query).
RUN_STATUS_SQL: Final = """
SELECT r.id, r.key, r.status, r.outcome, r.event_id, r.written_off_at,
       ref.outcome AS ref_outcome
  FROM rows r
  LEFT JOIN rows ref ON ref.id = r.ref_id
 WHERE r.run_id = ? AND r.id > ?
 ORDER BY r.id
 LIMIT ?"""
# A row's "via": the send of the same note by another run that delivered it (Cobalt has it,
# or took it and no outcome is in): a confirmed send first, then the earliest; else, the
# earliest attempt of another run that may have delivered it (in doubt: ambiguous, in
# flight, or a conflict of events), as the ``ambiguous`` kind of ``status`` counts it.
VIA_COLUMNS: Final = ("run_id", "job_id", "outcome", "task_note_id", "submitted_at",
                       "outcome_at", "event_id", "emr_note_id", "outcome_clock", "status")
IN_DOUBT: Final = """(({o}.status IN ('ambiguous', 'sending') AND {o}.outcome IS NULL)
            OR ({o}.outcome = 'conflict' AND {o}.status IN ('accepted', 'ambiguous', 'sending')))"""
VIA_SQL: Final = f"""
SELECT r.id, via.run_id, via.job_id, via.outcome, via.task_note_id, via.submitted_at,
       via.outcome_at, via.event_id, via.emr_note_id, via.outcome_clock,
       CASE WHEN via.outcome = 'created' OR (via.status = 'accepted' AND via.outcome IS NULL)
            THEN 'delivered' ELSE 'in_doubt' END
  FROM rows r JOIN rows via ON via.id = (
       SELECT o.id FROM rows o INDEXED BY rows_key
        WHERE o.key = r.key AND o.run_id != r.run_id
          AND (o.outcome = 'created' OR (o.status = 'accepted' AND o.outcome IS NULL)
               OR {IN_DOUBT.format(o="o")})
        ORDER BY CASE WHEN o.outcome = 'created' THEN 0
                      WHEN o.status = 'accepted' AND o.outcome IS NULL THEN 1 ELSE 2 END,
                 o.id LIMIT 1)
 WHERE r.id IN ({{marks}})"""  # noqa: S608 - constants only
# A row whose own attempt did not deliver its note follows a confirmed send of that note by
# another run (rule 5 above): settled, even though the row itself has no outcome.
UNSETTLED_RUNS_SQL: Final = """
SELECT run_id FROM runs u WHERE EXISTS (
    SELECT 1 FROM rows r LEFT JOIN rows ref ON ref.id = r.ref_id
     WHERE r.run_id = u.run_id AND (
           (r.status IN ('pending', 'failed', 'sending', 'ambiguous', 'accepted')
            AND r.outcome IS NOT 'created' AND r.written_off_at IS NULL)
        OR (r.status IN ('already_sent', 'held') AND ref.outcome IS NOT 'created'))
       AND NOT ((r.status IN ('pending', 'failed', 'already_sent', 'held')
                 OR (r.status = 'accepted' AND r.outcome = 'failed'))
                AND EXISTS (SELECT 1 FROM rows o INDEXED BY rows_key
                             WHERE o.key = r.key AND o.run_id != r.run_id
                               AND o.outcome = 'created')))
 {where}"""


def rank(row: Earlier | None) -> int:
    """How telling an earlier row of a key is: delivered 3, maybe delivered 2, other 1,
    none 0 (``Ledger.earlier`` keeps the most telling)."""
    if row is None:
        return 0
    if row.delivered:
        return 3
    if row.maybe_delivered:
        return 2
    return 1
