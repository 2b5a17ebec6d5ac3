"""The seam between the stages and where state is kept: the operations they call.

Each stage names the narrow protocol it needs, never a store class: the scan
(plan.py) ``ScanStore``, the send (runner.py; submit.py's ``AttemptRecorder`` is the
part of it that records attempts) ``SendStore``, reconcile's ingest, reasons.py and
sandbox.py ``OutcomeStore``, status and the report ``ReportStore`` (``RunBook`` +
``OpenItems``), prune ``RetentionStore``; what does several (runner.py, jobs.py,
retention.py, reconcile's ``Reconciler``) takes ``StateStore``, all of them. Stores are
made only by ``store.open_store`` / ``store.existing_store``, typed as ``StateStore``,
so mypy checks every store those return against it: ``Ledger`` (sqlite.py, SQLite)
and ``PgLedger`` (pg_ledger.py, PostgreSQL; today it reuses ``Ledger``'s statements
through a session that speaks PostgreSQL). A store that also holds the sink's events
(``PgLedger``) is a ``SinkEventsTable``; reconcile reads them there, not the sink file.

Rows cross the seam as the records of records.py, or as the tuples and DataFrame
columns named below (``PendingRow``, ``EmrFailure``, ``RUN_CHUNK_COLUMNS``,
``STATUS_CHUNK_COLUMNS``). Every
write raises StorageFull when the store has no room, StateError when it cannot be used.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from pipeline.state.records import (
    Attempt,
    Earlier,
    EventRecord,
    InputFile,
    NewRow,
    OpenRow,
    Orphan,
    RunInfoChanges,
    RunRecord,
    RunState,
)

if TYPE_CHECKING:
    import pandas as pd

# (id, file_no, line, emr_task_id, key) of a pending row (``SendStore.rows_to_send``).
PendingRow = tuple[int, int, int, str, bytes]
# (run_id, key, failure_reason, reason_codes, outcome_at) of a note that failed in the EMR
# and that no run has delivered since (``OpenItems.emr_failures``).
EmrFailure = tuple[str, bytes, str | None, str | None, str | None]
# The rows' own columns: one per field a row holds (schema.py's ``rows`` table: times
# ISO 8601 UTC text, ``key`` the 32-byte ``row_key`` or None, ``passthrough`` a JSON list).
ROW_COLUMNS: Final = (
    "id", "run_id", "file_no", "line", "emr_task_id", "key", "status", "attempts",
    "http_status", "task_note_id", "job_id", "error", "ref_id", "submitted_at",
    "answered_at", "outcome", "event_id", "emr_note_id", "failure_reason", "outcome_at",
    "settled_by", "passthrough", "reason_codes", "outcome_clock", "written_off_at", "account",
)  # fmt: skip
# The columns of each DataFrame ``OutcomeStore.run_chunks`` yields (reconciliation.py reads
# them by name): the row's own, its input file's path, the row it refers to (``ref_*``:
# the earlier attempt of a held or already-sent row) and ``via_*``: the send of the same
# note by another run that speaks for it (rule 5 in rules.py), None where there is none;
# ``via_status`` says whether that send delivered the note or may have (``in_doubt``).
RUN_CHUNK_COLUMNS: Final = (
    *ROW_COLUMNS, "source_file", "ref_run_id", "ref_job_id", "ref_outcome",
    "via_run_id", "via_job_id", "via_outcome", "via_task_note_id", "via_submitted_at",
    "via_outcome_at", "via_event_id", "via_emr_note_id", "via_outcome_clock", "via_status",
)  # fmt: skip
# The columns of each DataFrame ``OutcomeStore.status_chunks`` yields: what a row's final
# status is decided from (reconciliation.py's rules, without their detail texts), and
# ``via_*`` as above.
STATUS_CHUNK_COLUMNS: Final = (
    "id", "key", "status", "outcome", "event_id", "written_off_at", "ref_outcome",
    *(column for column in RUN_CHUNK_COLUMNS if column.startswith("via_")),
)  # fmt: skip


class RunBook(Protocol):
    """Runs: one sending run at a time (the run lock), its record, its end."""

    @property
    def where(self) -> str:
        """Where the state is, for people (a path, or ``PostgreSQL host:port/db``; never
        a password)."""
        ...

    def close(self) -> None: ...
    def lock(self, holder: str | None = None) -> None: ...
    def lock_holder(self) -> int | None: ...
    def account_labels(self) -> set[str]: ...
    def recover(self) -> int: ...
    def start_run(self, run_id: str, account: str, fingerprint: str,
                  info: RunInfoChanges) -> None: ...
    def finish_run(self, run_id: str, state: RunState, info: RunInfoChanges) -> None: ...
    def refuse_run(self, run_id: str, info: RunInfoChanges) -> int: ...
    def update_run_info(self, run_id: str, info: RunInfoChanges) -> None: ...
    def run(self, run_id: str) -> RunRecord: ...
    def latest_run(self) -> str | None: ...
    def runs_in_progress(self) -> list[str]: ...
    def run_ids(self) -> list[str]: ...
    def effective_state(self, record: RunRecord) -> RunState: ...
    def status_counts(self, run_id: str) -> dict[str, int]: ...


class ScanStore(Protocol):
    """The scan: input files and rows as first written, and what earlier runs did."""

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None: ...
    def files(self, run_id: str) -> list[InputFile]: ...
    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None: ...
    def adopt_keys(self, run_id: str, pairs: Sequence[tuple[bytes, bytes]]) -> int: ...
    def earlier(self, run_id: str, keys: Sequence[bytes]) -> dict[bytes, Earlier]: ...
    def sent_accounts(self, ignore: Collection[str] = ()) -> dict[str, int]: ...


class SendStore(Protocol):
    """The send: pending rows out, ``sending`` committed before a request leaves."""

    def reader(self) -> StateStore:
        """A second, read-only handle on the same state (the send reads pending rows on it
        while this one records attempts); the caller closes it."""
        ...

    def rows_to_send(self, run_id: str) -> Iterator[PendingRow]: ...
    def apply(self, sending: Sequence[int], attempts: Sequence[Attempt]) -> None: ...


class OutcomeStore(Protocol):
    """Outcomes: the events mirror, the join rules, a run's rows read back."""

    def sink_position(self) -> tuple[int, str]: ...
    def add_events(self, events: Sequence[EventRecord], tally: dict[str, int], *,
                   offset: int, head: str, count_repeats: bool = True,
                   others: Sequence[tuple[str, str]] = ()) -> int: ...
    def events(self) -> list[EventRecord]: ...
    def event_tally(self) -> dict[str, int]: ...
    def connections(self) -> dict[str, str]: ...
    def register_connections(self, named: Mapping[str, str]) -> None: ...
    def rows_of_jobs(self, job_ids: Iterable[str],
                     task_note_ids: Iterable[str]) -> list[tuple[Any, ...]]: ...
    def match_outcomes(self) -> int: ...
    def orphans(self, limit: int = 50) -> tuple[int, list[Orphan]]: ...
    def run_chunks(self, run_id: str, size: int = 20_000) -> Iterator[pd.DataFrame]:
        """A run's rows in input order, ``size`` at a time: columns ``RUN_CHUNK_COLUMNS``."""
        ...

    def status_chunks(self, run_id: str, size: int = 100_000) -> Iterator[pd.DataFrame]:
        """A run's rows in input order, ``size`` at a time, with only the columns their
        final status is decided from: ``STATUS_CHUNK_COLUMNS``."""
        ...

    def frame(self, run_id: str | None = None, *, columns: str = "*") -> pd.DataFrame:
        """Rows (of one run, or of every run) in input order: ``ROW_COLUMNS``, or the
        comma-separated ``columns`` among them."""
        ...
    def job_ids(self, run_id: str | None = None, *, unresolved: bool = False,
                account: str | None = None) -> set[str]: ...
    def earliest_submission(self, job_ids: Iterable[str]) -> str | None: ...
    def ambiguous_keys(self, run_ids: Iterable[str]
                       ) -> tuple[frozenset[bytes], str | None]: ...


class OpenItems(Protocol):
    """What is still open, and which reports say what is no longer true."""

    def unresolved_runs(self) -> list[str]: ...
    def run_settled(self, run_id: str) -> bool: ...
    def reports_to_rewrite(self, context: str = "", now: float | None = None) -> list[str]: ...
    def report_exit_code(self, run_id: str) -> int | None: ...
    def unchanged_reports(self, context: str = "", now: float | None = None
                          ) -> list[tuple[str, int | None]]: ...
    def report_marker(self, run_id: str, context: str = "") -> str: ...
    def report_written(self, run_id: str, *, redrive_digest: str | None, context: str = "",
                       marker: str | None = None, stale_due: float | None = None,
                       exit_code: int | None = None) -> None: ...
    def runs_following(self, run_id: str) -> list[str]: ...
    def not_read(self) -> list[tuple[str, list[str]]]: ...
    def open_rows(self, running: Sequence[str]) -> dict[str, list[OpenRow]]: ...
    def redrive_row_ids(self, run_id: str
                        ) -> list[tuple[int, str, str | None, str | None]]: ...
    def emr_failures(self) -> list[EmrFailure]: ...
    def send_failed_rows(self, running: Sequence[str], limit: int = 20,
                         skip: Collection[bytes] = ()
                         ) -> tuple[int, list[tuple[str, str | None, int]]]: ...
    def write_off(self, run_id: str, at: str) -> int: ...
    def key_accounts(self) -> dict[bytes, str]: ...


class ReportStore(RunBook, OpenItems, Protocol):
    """What status and the report read: runs, and what is still open."""


class RetentionStore(Protocol):
    """Retention (prune): which runs are old, and giving freed room back."""

    def runs_started_before(self, cutoff: str) -> list[str]:
        """Ids of the runs started before ``cutoff`` (ISO 8601 UTC) and not running, oldest
        first."""
        ...

    def vacuum(self) -> int:
        """Give the store's free space back; returns the bytes it shrank by (0: none).
        Raises StorageFull."""
        ...


# The verdict each stored sink event carries (``sink_events_after``): how it came to be
# stored. Only a signed webhook's receive time measures latency (ingest_postgres).
SIGNED: Final = "signature-verified"  # a webhook the sink verified, stored as received
POLLED: Final = "polled"  # fetched by tasknotes poll (GET /v1/webhook-events)
NO_RECEIPT: Final = "migrated-no-receipt"  # copied from a sink file with no receipt of it


@runtime_checkable
class SinkEventsTable(OutcomeStore, Protocol):
    """A store that also holds the sink's events (state.url): reconcile mirrors them from
    here rather than from the sink file (reconcile.ingest_postgres)."""

    @property
    def where(self) -> str: ...

    def sink_events_after(self, seq: int, limit: int
                          ) -> list[tuple[int, bytes, str, str]]:
        """(seq, body, verdict, received_at) of up to ``limit`` events after ``seq``;
        ``verdict``: ``SIGNED``, ``POLLED`` or ``NO_RECEIPT``."""
        ...

    def events_writer(self) -> AbstractContextManager[OutcomeStore]:
        """A second handle on the same state, open while the block runs, whose
        ``add_events`` may run (on another thread) while this one reads the sink's events:
        ingest_postgres stores one batch while it decodes the next."""
        ...


class StateStore(RunBook, ScanStore, SendStore, OutcomeStore, OpenItems, RetentionStore,
                 Protocol):
    """Everything the stages ask of the state store."""
