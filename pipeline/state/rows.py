"""The scan's and the send's operations on the ledger: input files, rows, attempts."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from pipeline.errors import StateError
from pipeline.state import rules
from pipeline.state.records import (
    Attempt,
    Earlier,
    InputFile,
    NewRow,
)

if TYPE_CHECKING:
    pass

from pipeline.state.connection import SQLiteConnection


class SQLiteRows(SQLiteConnection):
    """Input files and rows: written by the scan, sent and answered by the send."""

    def add_file(
        self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
        sha256: str | None = None, size: int | None = None,
    ) -> None:
        """Record input file ``file_no`` of a run (replacing what was recorded): its path,
        header names, and its SHA-256 and size in bytes if known. Raises StorageFull."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, file_no, path, sha256, size, json.dumps(list(header))),
            )

    def status_counts(self, run_id: str) -> dict[str, int]:
        """How many of the run's rows are in each ledger status (statuses absent: none)."""
        return dict(self._db.execute(
            "SELECT status, COUNT(*) FROM rows WHERE run_id=? GROUP BY status", (run_id,)))

    def files(self, run_id: str) -> list[InputFile]:
        """The input files a run recorded, by file number."""
        return [InputFile(file_no, path, sha, size, tuple(json.loads(header)))
                for file_no, path, sha, size, header in self._db.execute(
                    "SELECT file_no, path, sha256, size, header FROM files WHERE run_id=?"
                    " ORDER BY file_no", (run_id,))]

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        """Write a batch of a run's rows, in input order, in one transaction."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO rows (run_id, file_no, line, emr_task_id, key, status, error,"
                " ref_id, passthrough, account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((run_id, r.file_no, r.line, r.emr_task_id, r.key, r.status, r.error, r.ref_id,
                  json.dumps(r.passthrough, ensure_ascii=False) if r.passthrough else None,
                  r.account)
                 for r in rows),
            )

    def adopt_keys(self, run_id: str, pairs: Sequence[tuple[bytes, bytes]]) -> int:
        """Give the rows of other runs under each pair's former key (``formerly``: the note
        under an account's old name) that did not deliver their note (Earlier.delivered:
        not sent, send failed, failed in the EMR, or in doubt), the pair's current key, in
        one transaction; returns rows changed.

        The run ``run_id`` (under the new name) is about to send those notes, or hold them
        while an attempt is in doubt: with one key, the old rows follow its send (rule 5
        of rules.py), an outcome event this config mirrors (keyed under its account)
        settles an ambiguous one by evidence, status counts each note once, and no old
        redrive.csv offers it. Rows that delivered it keep their key (the scan found them
        under the former name and skips the note)."""
        if not pairs:
            return 0
        with self._transaction():  # rowcount: not total_changes, which counts the bumps
            return sum(max(self._db.execute(ADOPT_KEY_SQL, (new, old, run_id)).rowcount, 0)
                       for old, new in pairs)

    def earlier(self, run_id: str, keys: Sequence[bytes]) -> dict[bytes, Earlier]:
        """For each key, the most telling row of another run (delivered first, then in doubt)."""
        found: dict[bytes, Earlier] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, *rest in self._db.execute(
                f"SELECT key, id, run_id, status, job_id, outcome FROM rows"  # noqa: S608
                f" WHERE key IN ({marks}) AND run_id != ? ORDER BY id", (*chunk, run_id),
            ):
                candidate = Earlier(*rest)
                if rules.rank(candidate) > rules.rank(found.get(key)):
                    found[key] = candidate
        return found

    def sent_accounts(self, ignore: Collection[str] = ()) -> dict[str, int]:
        """Account label -> how many notes were delivered under it (Earlier.delivered): a
        row's own account (api.accounts), else its run's (api.account or ``token:...``).
        Labels in ``ignore`` (those the config names) are left out, uncounted.

        Flat as the ledger grows: the labels come from the runs and from the index of the
        rows that name their own account (empty without api.accounts); only the delivered
        rows of a label not ignored are counted (usually none: a warning is due then)."""
        delivered = ("(r.outcome = 'created' OR (r.status = 'accepted'"
                     " AND (r.outcome IS NULL OR r.outcome <> 'failed')))")
        found: dict[str, int] = {}
        for (label,) in self._db.execute(
                "SELECT DISTINCT account FROM rows INDEXED BY rows_account"
                " WHERE account IS NOT NULL AND account != ''").fetchall():
            if label not in ignore:
                found[str(label)] = int(self._db.execute(
                    "SELECT COUNT(*) FROM rows r INDEXED BY rows_account WHERE r.account = ?"  # noqa: S608
                    f" AND r.account IS NOT NULL AND r.account != '' AND {delivered}",
                    (label,)).fetchone()[0])
        for (label,) in self._db.execute("SELECT DISTINCT account FROM runs").fetchall():
            if label not in ignore:
                count = int(self._db.execute(
                    "SELECT COUNT(*) FROM runs u JOIN rows r ON r.run_id = u.run_id"  # noqa: S608
                    " WHERE u.account = ? AND (r.account IS NULL OR r.account = '')"
                    f" AND {delivered}", (label,)).fetchone()[0])
                found[str(label)] = found.get(str(label), 0) + count
        return {label: count for label, count in found.items() if count}

    def key_accounts(self) -> dict[bytes, str]:
        """Ledger key -> the account its rows named (rows of api.accounts runs only)."""
        return {bytes(key): account for key, account in self._db.execute(
            "SELECT key, account FROM rows WHERE key IS NOT NULL AND account IS NOT NULL"
            " AND account != ''")}

    def rows_to_send(self, run_id: str) -> Iterator[tuple[int, int, int, str, bytes]]:
        """(id, file_no, line, emr_task_id, key) of the run's pending rows, in input order."""
        last = 0
        while True:
            batch = self._db.execute(
                "SELECT id, file_no, line, emr_task_id, key FROM rows WHERE run_id=? AND id>?"
                " AND status='pending' ORDER BY id LIMIT 5000", (run_id, last),
            ).fetchall()
            yield from batch
            if len(batch) < 5000:
                return
            last = batch[-1][0]

    def mark_sending(self, row_ids: Sequence[int]) -> None:
        """Mark rows ``sending`` (one more attempt, submitted now), in the caller's
        transaction."""
        now = self._clock()  # one commit, one moment
        self._db.executemany(
            "UPDATE rows SET status='sending', attempts=attempts+1, submitted_at=? WHERE id=?",
            ((now, i) for i in row_ids),
        )

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        """Record what sending rows gave, in the caller's transaction."""
        self._db.executemany(
            "UPDATE rows SET status=?, http_status=?, task_note_id=?, job_id=?,"
            " error=?, answered_at=? WHERE id=?",
            ((a.status, a.http_status, a.task_note_id, a.job_id, a.error,
              a.answered_at, a.row_id) for a in attempts),
        )

    def apply(self, sending: Sequence[int], attempts: Sequence[Attempt]) -> None:
        """One group commit: results first, then the rows about to be sent.

        In that order because a row's "back to pending" (a retryable failure)
        and its next "sending" may share a batch; the reverse never can, as a
        row's request leaves only after its "sending" is committed.
        """
        try:
            with self._transaction():
                if attempts:
                    self.record_attempts(attempts)
                if sending:
                    self.mark_sending(sending)
        except sqlite3.Error as exc:
            raise StateError(f"ledger {self.path} cannot be written: {exc}") from None

    def job_ids(self, run_id: str | None = None, *, unresolved: bool = False,
                account: str | None = None) -> set[str]:
        """job ids of accepted rows (of one run, or all); ``unresolved``: only without outcome;
        ``account``: only rows naming that account (api.accounts)."""
        sql = "SELECT job_id FROM rows WHERE status='accepted' AND job_id IS NOT NULL"
        params: tuple[str, ...] = ()
        if run_id is not None:
            sql += " AND run_id=?"
            params = (run_id,)
        if unresolved:
            sql += " AND outcome IS NULL"
        if account is not None:
            sql += " AND account=?"
            params = (*params, account)
        return {r[0] for r in self._db.execute(sql, params)}

    def earliest_submission(self, job_ids: Iterable[str]) -> str | None:
        """The earliest submitted_at among rows with these job ids."""
        ids = list(job_ids)
        earliest: str | None = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found = self._db.execute(
                f"SELECT MIN(submitted_at) FROM rows WHERE job_id IN ({marks})",  # noqa: S608
                chunk,
            ).fetchone()[0]
            if found is not None and (earliest is None or found < earliest):
                earliest = found
        return earliest

    def ambiguous_keys(self, run_ids: Iterable[str]) -> tuple[frozenset[bytes], str | None]:
        """Keys of the ambiguous rows of ``run_ids`` that no outcome settles yet, and the
        earliest ``submitted_at`` among them (ISO 8601 UTC; None when there are none).

        Such a row has no job id: only a ``task_note.created`` event carrying the same
        note for the same task (rule 4 in rules.py) can settle it.
        """
        keys: set[bytes] = set()
        earliest: str | None = None
        for run_id in run_ids:
            for key, at in self._db.execute(
                    "SELECT key, submitted_at FROM rows WHERE run_id=? AND status='ambiguous'"
                    " AND key IS NOT NULL AND outcome IS NULL", (run_id,)):
                keys.add(bytes(key))
                if at is not None and (earliest is None or at < earliest):
                    earliest = at
        return frozenset(keys), earliest


# ``adopt_keys``: a row under the former key that did not deliver its note
# (Earlier.delivered false) takes the current key.
ADOPT_KEY_SQL: Final = """
UPDATE rows SET key = ? WHERE key = ? AND run_id != ?
   AND NOT (COALESCE(outcome, '') = 'created'
            OR (status = 'accepted' AND COALESCE(outcome, '') <> 'failed'))"""
