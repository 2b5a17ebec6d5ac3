"""The SQLite store: every input row of every run, what was sent, what came back.

``Ledger`` is assembled from one class per concern, each in its own module over the
one connection: connection.py (opening, transactions, the run lock, the storage-full
reserve), rows.py (the scan and the send), runs.py (run bookkeeping, open items),
outcomes.py (the events mirror and the join rules of rules.py).

The ledger is the single source of truth for "was this note sent?". It never
holds a note's text: a row is identified across runs by ``key`` =
SHA-256(account, emr_task_id, note). Only pipeline/state/ speaks SQL.

Row ``status`` values (the submission statuses of docs/architecture.md, plus how a row that
was never sent ended):

    pending -> sending -> accepted | api_rejected | ambiguous | failed
    rejected        failed validation (reasons in ``error``)
    duplicate       same task id and note as an earlier row of the run (``ref_id``)
    already_sent    an earlier run delivered this key (``ref_id``)
    held            an earlier attempt of this key may have landed; not sent blind

A row is marked ``sending`` and committed before its request leaves; a run
that dies leaves it ``sending`` and the next run (holding the lock, so the
writer is provably gone) turns it into ``ambiguous``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.state.connection import RESERVE_BYTES
from pipeline.state.outcomes import SQLiteOutcomes

if TYPE_CHECKING:
    from pipeline.state.protocol import StateStore

__all__ = ["RESERVE_BYTES", "Ledger"]


class Ledger(SQLiteOutcomes):
    """A SQLite ledger file: the ``StateStore`` of the embedded install. Not thread-safe:
    one caller at a time (see Committer)."""

    @property
    def where(self) -> str:
        """The ledger file's path, for messages."""
        return str(self.path)

    def reader(self) -> Ledger:
        """The same file opened again, read-only (the send reads pending rows on it while
        this handle records attempts). Raises StateError if it cannot be opened."""
        return Ledger(self.path, readonly=True)


if TYPE_CHECKING:
    def _implements(ledger: Ledger) -> StateStore:  # mypy checks Ledger against the seam
        return ledger
