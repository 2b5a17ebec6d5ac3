"""Run bookkeeping on the ledger: a run's record, its end, and what is still open."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import StateError
from pipeline.state import rules
from pipeline.state.records import (
    OpenRow,
    RunInfo,
    RunInfoChanges,
    RunRecord,
    RunState,
    info_json,
)

if TYPE_CHECKING:
    pass

from pipeline.state.rows import SQLiteRows

# Keys report_written records in a run's info: not part of what the report is made from.
_REPORT_KEYS = frozenset({"report_final", "redrive_digest", "report_marker",
                          "report_stale_due", "report_exit_code"})



# ``write_off``'s statement (both backends; PostgreSQL's bumps runs.rev with it): a run's
# unsent rows whose note no run delivered, not yet written off, closed at ``?`` (a time).
WRITE_OFF_SQL: Final = f"""UPDATE rows SET written_off_at = ?
    WHERE run_id = ? AND status IN ('pending', 'failed') AND key IS NOT NULL
      AND written_off_at IS NULL
      AND {rules.NOT_DELIVERED.format(row="rows")}"""  # noqa: S608 - constants

class SQLiteRuns(SQLiteRows):
    """Runs: their records, and which runs (and reports) are still open."""

    def runs_in_progress(self) -> list[str]:
        """Runs being written by a live process right now (state ``running``, lock held).

        A run left ``running`` with the lock free has crashed: see ``effective_state``.
        """
        if self.lock_holder() is None:
            return []
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs WHERE state='running' ORDER BY started_at, run_id")]

    def effective_state(self, record: RunRecord) -> RunState:
        """A run record's state as it is now: ``running`` only while its process lives."""
        if record.state == "running" and self.lock_holder() is None:
            return "crashed"
        return record.state

    def update_run_info(self, run_id: str, info: RunInfoChanges) -> None:
        """Merge ``info`` into a run's recorded info (e.g. the exit code it ended with)."""
        merged = {**self._stored_info(run_id), **info_json(info)}
        with self._transaction():
            self._db.execute("UPDATE runs SET info=? WHERE run_id=?",
                             (json.dumps(merged, sort_keys=True), run_id))

    def recover(self) -> int:
        """After a crash: rows left ``sending`` become ``ambiguous``; returns how many."""
        assert self._lock_fd is not None, "recover() only under the run lock"
        with self._transaction():
            cur = self._db.execute(
                "UPDATE rows SET status='ambiguous', error=? WHERE status='sending'",
                ("the process stopped while this request was in flight",),
            )
            self._db.execute("UPDATE runs SET state='crashed' WHERE state='running'")
        return cur.rowcount

    def start_run(self, run_id: str, account: str, fingerprint: str,
                  info: RunInfoChanges) -> None:
        """Record a run as ``running`` from now, with its account, config fingerprint and
        info. Raises StorageFull."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs (run_id, started_at, state, account, config_fingerprint, info)"
                " VALUES (?, ?, 'running', ?, ?, ?)",
                (run_id, self._clock(), account, fingerprint,
                 json.dumps(info_json(info), sort_keys=True)),
            )

    def finish_run(self, run_id: str, state: RunState, info: RunInfoChanges) -> None:
        """Record a run's end now: its final ``state`` and ``info`` merged into what it
        recorded. Raises StateError if there is no such run, StorageFull."""
        merged = {**self._stored_info(run_id), **info_json(info)}
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET finished_at=?, state=?, info=? WHERE run_id=?",
                (self._clock(), state, json.dumps(merged, sort_keys=True), run_id),
            )

    def refuse_run(self, run_id: str, info: RunInfoChanges) -> int:
        """End a run whose input was refused before anything was sent (exit 2): its rows,
        scanned from an input the tool would not trust, are forgotten, so no later count
        (``status``, a report) offers them as unsent notes; the run stays, ``aborted``,
        with ``info``. Returns how many rows were forgotten. Raises StorageFull."""
        with self._transaction():
            forgotten = self._db.execute(
                "DELETE FROM rows WHERE run_id=? AND status IN "
                "('pending','rejected','duplicate','already_sent','held')", (run_id,),
            ).rowcount
        self.finish_run(run_id, "aborted", info)
        return forgotten

    def run(self, run_id: str) -> RunRecord:
        """One run's record; StateError if there is no such run."""
        found = self._db.execute(
            "SELECT run_id, started_at, finished_at, state, account, config_fingerprint, info"
            " FROM runs WHERE run_id=?", (run_id,),
        ).fetchone()
        if found is None:
            raise StateError(f"no run {run_id!r} in the ledger {self.path}")
        run, started, finished, state, account, fingerprint, info = found
        return RunRecord(run, started, finished, state, account, fingerprint,
                         RunInfo.from_json(json.loads(info)))

    def _stored_info(self, run_id: str) -> dict[str, Any]:
        """A run's info as stored (keys a newer version wrote included)."""
        found = self._db.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if found is None:
            raise StateError(f"no run {run_id!r} in the ledger {self.path}")
        stored: dict[str, Any] = json.loads(found[0])
        return stored

    def latest_run(self) -> str | None:
        """The id of the run started last, or None if there is none."""
        found = self._db.execute(
            "SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return None if found is None else str(found[0])

    def unresolved_runs(self) -> list[str]:
        """Runs with rows still waiting for an outcome or held as ambiguous."""
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT run_id FROM rows INDEXED BY rows_open WHERE outcome IS NULL"
            " AND status IN ('accepted', 'ambiguous', 'held', 'sending') ORDER BY run_id"
        )]

    def run_settled(self, run_id: str) -> bool:
        """Whether nothing can change ``run_id``'s report any more: no row's truth waits on
        an outcome, a review, another run's send or a send that did not happen, and the
        run's scan did not stop before the end of an input no later run has read. A run
        whose every row is settled (confirmed, rejected, skipped as a duplicate, or
        following a confirmed send of its note by any run) is settled."""
        if self._db.execute(rules.UNSETTLED_RUNS_SQL.format(where="AND u.run_id = ?"),
                            (run_id,)).fetchone() is not None:
            return False
        return all(r != run_id for r, _ in self.not_read())

    def reports_to_rewrite(self, context: str = "", now: float | None = None) -> list[str]:
        """Runs whose written report may no longer say what is true now (oldest first):
        every run whose report was not written from what the ledger holds now for it
        (``report_marker`` differs from the one ``report_written`` recorded: a row of
        the run or one it follows changed, its record changed, the events' tallies
        changed, ``context`` differs), and every run one of whose awaiting rows crossed
        ``report.stale_after`` since (``now``: Unix seconds; None: not checked). A run
        with open rows and nothing new is left alone. ``context``: what else the report
        is made from (the report settings: see report.report_context)."""
        return [run_id for run_id, rewrite, _ in self._report_states(context, now) if rewrite]

    def report_exit_code(self, run_id: str) -> int | None:
        """The exit code ``run_id``'s report gave when last written (``report_written``);
        None if no report was recorded (or the run is unknown)."""
        found = self._db.execute("SELECT info FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        code = json.loads(found[0]).get("report_exit_code") if found else None
        return code if isinstance(code, int) else None

    def unchanged_reports(self, context: str = "", now: float | None = None
                          ) -> list[tuple[str, int | None]]:
        """Runs ``reports_to_rewrite`` leaves alone whose report was not final when written
        (some row was open), with the exit code (``exit_code_now``) that report gave:
        what ``tasknotes reconcile`` counts without rewriting them (oldest first)."""
        return [(run_id, stored.get("report_exit_code"))
                for run_id, rewrite, stored in self._report_states(context, now)
                if not rewrite and not stored.get("report_final")]

    def _report_states(self, context: str, now: float | None
                       ) -> list[tuple[str, bool, dict[str, Any]]]:
        """Each run, oldest first: whether its report is to be written again (see
        ``reports_to_rewrite``) and its info as stored; one read of the runs."""
        runs = [(run_id, json.loads(info)) for run_id, info in self._db.execute(
            "SELECT run_id, info FROM runs ORDER BY started_at, run_id")]
        markers = self._report_markers(context, dict(runs))
        out = []
        for run_id, stored in runs:
            due = stored.get("report_stale_due")
            rewrite = (stored.get("report_marker") != markers[run_id]
                       or (now is not None and due is not None and due <= now))
            out.append((run_id, rewrite, stored))
        return out

    def _report_markers(self, context: str, infos: dict[str, dict[str, Any]] | None = None
                        ) -> dict[str, str]:
        """Each run's ``report_marker``: a digest of what its report is made from, read from
        the run records and small tables only (never the rows: ``runs.rev`` stands for
        them, see schema.TRIGGERS). ``infos``: the runs' info as stored, if already read.

        The digest is of ``json.dumps([shared, state, finished, rev, info, unread])``; the
        part every run shares is serialised once (the same text: a JSON list is its items'
        texts joined by ", "), so each run costs its own record only."""
        unread = dict(self.not_read(infos))
        held = self.lock_holder() is not None
        shared = json.dumps([
            context,
            self._db.execute("SELECT name, count FROM event_tally ORDER BY name").fetchall(),
            self._db.execute("SELECT value FROM meta WHERE key = 'orphans'").fetchall(),
            self._db.execute("SELECT event_id FROM orphans ORDER BY event_id").fetchall()],
            sort_keys=True, default=str)
        out = {}
        for run_id, state, finished, rev, info in self._db.execute(
                "SELECT run_id, state, finished_at, rev, info FROM runs"):
            found = infos[run_id] if infos is not None and run_id in infos else json.loads(info)
            stored = {k: v for k, v in found.items() if k not in _REPORT_KEYS}
            now_state = "crashed" if state == "running" and not held else state
            own = json.dumps([now_state, finished, rev, stored, unread.get(run_id)],
                             sort_keys=True, default=str)
            text = f"[{shared}, {own[1:]}"
            out[run_id] = hashlib.sha256(text.encode()).hexdigest()[:32]
        return out

    def report_marker(self, run_id: str, context: str = "") -> str:
        """A digest of what ``run_id``'s report is made from now (see ``reports_to_rewrite``);
        taken before a report is written, so a change while it is written shows next time.
        Raises KeyError for a run the ledger does not hold."""
        return self._report_markers(context)[run_id]

    def report_written(self, run_id: str, *, redrive_digest: str | None, context: str = "",
                       marker: str | None = None, stale_due: float | None = None,
                       exit_code: int | None = None) -> None:
        """Record that ``run_id``'s report was just written: whether it is final (the run
        was settled, so no later change can make it wrong), the fingerprint of the rows
        its redrive.csv offers (None: it has none), what it was written from (its
        ``report_marker`` with ``context``), when its next awaiting row turns stale
        (``stale_due``, Unix seconds; None: none will) and the exit code it gave.
        ``marker``: ``report_marker`` as taken before the report was written (None: now)."""
        marker = marker or self._report_markers(context)[run_id]
        self.update_run_info(run_id, {"report_final": self.run_settled(run_id),
                                      "redrive_digest": redrive_digest,
                                      "report_marker": marker,
                                      "report_stale_due": stale_due,
                                      "report_exit_code": exit_code})

    def runs_following(self, run_id: str) -> list[str]:
        """Other runs with a row whose note (ledger key) ``run_id`` sent and Cobalt took, or
        may have (ambiguous): their reports (and redrive.csv) change when this run ends
        (oldest first; rule 5 of rules.py)."""
        found = {r[0] for r in self._db.execute(
            """SELECT DISTINCT o.run_id FROM rows r JOIN rows o INDEXED BY rows_key
                    ON o.key = r.key AND o.run_id != r.run_id
                 WHERE r.run_id = ? AND r.status IN ('accepted', 'ambiguous')
                   AND r.key IS NOT NULL""",
            (run_id,))}
        return [r for r in self._runs_in_order() if r in found]

    def runs_started_before(self, cutoff: str) -> list[str]:
        """Ids of the runs started before ``cutoff`` (ISO 8601 UTC, as ``utcnow`` writes)
        and no longer running: a run in progress still writes its input copies and report
        (one that crashed is marked so by the next run, then listed)."""
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs WHERE started_at < ? AND state != 'running'"
            " ORDER BY started_at", (cutoff,))]

    def run_ids(self) -> list[str]:
        """Every run's id, oldest first (by start time)."""
        return self._runs_in_order()

    def account_labels(self) -> set[str]:
        """The account labels runs were recorded under (``runs.account``), each once."""
        return {str(a) for (a,) in self._db.execute("SELECT DISTINCT account FROM runs")}

    def _runs_in_order(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT run_id FROM runs ORDER BY started_at, run_id")]

    def not_read(self, infos: dict[str, dict[str, Any]] | None = None
                 ) -> list[tuple[str, list[str]]]:
        """Runs whose scan stopped before the end of some input file (a full disk, a
        signal, an input error), with those files, while no later run read each to its
        end: (run_id, paths), oldest first. ``--limit`` is not a stop: it says what it
        left unread. ``infos``: the runs' info as stored (run_id -> JSON object), if the
        caller has read them already.

        Only the runs from the first that stopped on are read as RunInfo records: usually
        none did, and the others' records are not built at all."""
        stored = [(r, infos[r] if infos is not None and r in infos else json.loads(i))
                  for r, i in self._db.execute(
                      "SELECT run_id, info FROM runs ORDER BY started_at, run_id")]
        first = next((n for n, (_, info) in enumerate(stored) if info.get("scan_stopped")),
                     None)
        if first is None:
            return []
        runs = [(r, RunInfo.from_json(info)) for r, info in stored[first:]]
        out = []
        for n, (run_id, info) in enumerate(runs):
            stopped = info.scan_stopped
            if stopped is None:
                continue
            left = [p for p in stopped.unread_files
                    if not any(self._read_whole(p, later_info)
                               for _, later_info in runs[n + 1:])]
            if left:
                out.append((run_id, left))
        return out

    @staticmethod
    def _read_whole(path: str, info: RunInfo) -> bool:
        """Whether a run (by its recorded info) read ``path`` to its end: its scan counted
        the file's every record, none left beyond ``--limit``."""
        return any(f.path == path and not f.beyond_limit for f in info.input_records)

    def open_rows(self, running: Sequence[str]) -> dict[str, list[OpenRow]]:
        """The rows behind each kind of open item over every run (open_items.py documents the
        kinds and counts each note once), as (run_id, key, since) tuples.

        ``ambiguous`` includes conflicts (a sent row whose events contradict each other
        or name another account's connection): report.html shows them ``ambiguous``,
        whatever else delivered the note, so they count here as long as they stand.
        ``running``: the runs in progress; their unsent rows are ``in_progress``, never
        ``send_failed``. ``since`` (ISO 8601 UTC, or None): when the row was submitted
        (``awaiting_outcome``: its latest send, which staleness is measured from), or
        when its run ended (``send_failed``). ``failed_retryable`` is not here: its
        reasons are matched in Python (``emr_failures``).
        """
        marks = ",".join("?" * len(running))

        def live(alias: str) -> str:
            return f"{alias}run_id IN ({marks})" if running else "(1 = 0)"

        params = tuple(running)
        return {
            "in_progress": self._db.execute(
                f"SELECT run_id, key, submitted_at FROM rows WHERE {live('')}"  # noqa: S608
                " AND status IN ('pending', 'sending') AND key IS NOT NULL", params).fetchall()
            if running else [],
            "awaiting_outcome": self._db.execute(
                "SELECT run_id, key, submitted_at FROM rows INDEXED BY rows_open"
                " WHERE status = 'accepted' AND outcome IS NULL AND key IS NOT NULL").fetchall(),
            "ambiguous": self._db.execute(
                f"""WITH doubt AS (
                    SELECT r.run_id, r.key, r.submitted_at FROM rows r INDEXED BY rows_open
                     WHERE r.outcome IS NULL AND (r.status = 'ambiguous'
                           OR (r.status = 'sending' AND NOT {live('r.')}))
                    UNION ALL
                    -- a held row is its earlier attempt's note: counted under that row's key
                    -- (another one when found under a former name), so once with it
                    SELECT h.run_id, COALESCE(ref.key, h.key), ref.submitted_at
                      FROM rows h INDEXED BY rows_open JOIN rows ref ON ref.id = h.ref_id
                     WHERE h.status = 'held' AND h.outcome IS NULL AND ref.outcome IS NULL
                       AND ref.status IN ('ambiguous', 'sending'))
                SELECT run_id, key, submitted_at FROM doubt
                 WHERE key IS NOT NULL AND {rules.NOT_DELIVERED.format(row="doubt")}
                UNION ALL
                SELECT run_id, key, submitted_at FROM rows
                 WHERE outcome = 'conflict' AND key IS NOT NULL
                   AND status IN ('accepted', 'ambiguous', 'sending')""",  # noqa: S608
                params).fetchall(),
            "send_failed": self._db.execute(
                f"""SELECT r.run_id, r.key, COALESCE(r.answered_at, u.finished_at, u.started_at)
                      FROM rows r INDEXED BY rows_unsent JOIN runs u ON u.run_id = r.run_id
                     WHERE r.status IN ('pending', 'failed') AND NOT {live('r.')}
                       AND r.key IS NOT NULL AND r.written_off_at IS NULL
                       AND {rules.NOT_DELIVERED.format(row="r")}""",  # noqa: S608
                params).fetchall(),
        }

    def redrive_row_ids(self, run_id: str) -> list[tuple[int, str, str | None, str | None]]:
        """The rows of ``run_id`` its redrive.csv should offer now, before the reason
        check: (id, status, failure_reason, reason_codes) of rows not sent (``pending``,
        ``failed``) and of rows that failed in the EMR, whose note no run delivered
        since (reconciliation.py's ``send_failed`` and ``failed_in_emr``)."""
        return self._db.execute(
            """SELECT id, status, failure_reason, reason_codes FROM rows
                 WHERE run_id = ? AND key IS NOT NULL
                   AND ((status IN ('pending', 'failed') AND written_off_at IS NULL)
                        OR (status = 'accepted' AND outcome = 'failed'))
                   AND NOT EXISTS (SELECT 1 FROM rows o INDEXED BY rows_key
                        WHERE o.key = rows.key AND o.run_id != rows.run_id
                          AND (o.outcome = 'created'
                               OR (o.status = 'accepted' AND o.outcome IS NULL)))""",
            (run_id,)).fetchall()

    def send_failed_rows(self, running: Sequence[str], limit: int = 20,
                         skip: Collection[bytes] = ()
                         ) -> tuple[int, list[tuple[str, str | None, int]]]:
        """Rows behind ``send_failed`` in ``open_rows`` (not sent, not written off, their note
        delivered by no run, their run not in ``running``) whose note is not in ``skip``
        (the notes status counts under a kind before ``send_failed``): how many, and the
        first ``limit`` as (run_id, source file path or None, line), oldest run first."""
        marks = ",".join("?" * len(running))
        live = f"AND r.run_id NOT IN ({marks})" if running else ""
        where = f"""FROM rows r INDEXED BY rows_unsent
                   LEFT JOIN files f ON f.run_id = r.run_id AND f.file_no = r.file_no
                   WHERE r.status IN ('pending', 'failed') {live} AND r.key IS NOT NULL
                     AND r.written_off_at IS NULL AND {rules.NOT_DELIVERED.format(row="r")}"""
        found = self._db.execute(f"SELECT r.key, r.run_id, f.path, r.line {where}"
                                 " ORDER BY r.id", tuple(running))
        count = 0
        shown: list[tuple[str, str | None, int]] = []
        for key, run_id, path, line in found:
            if bytes(key) in skip:
                continue
            count += 1
            if len(shown) < limit:
                shown.append((str(run_id), path, int(line)))
        return count, shown

    def write_off(self, run_id: str, at: str) -> int:
        """Close ``run_id``'s unsent rows (``send_failed`` in ``open_rows``) without sending
        them: ``written_off_at`` = ``at`` (ISO 8601 UTC). Returns how many; a row whose note
        a run delivered, or already written off, is left as it is. The run's report must be
        written again (``report_final`` is cleared). The caller checks the run is not in
        progress."""
        with self._transaction():
            changed = self._db.execute(WRITE_OFF_SQL, (at, run_id)).rowcount
        if changed:
            self.update_run_info(run_id, {"report_final": False})
        return int(changed)

    def emr_failures(self) -> list[tuple[str, bytes, str | None, str | None, str | None]]:
        """(run_id, key, failure_reason, reason_codes, outcome_at) of notes that failed in the
        EMR and that no run has delivered since."""
        return self._db.execute(rules.EMR_FAILURES_SQL).fetchall()
