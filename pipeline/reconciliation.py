"""Ledger rows joined with sink events -> one final status per row.

The sink file's ``task_note.*`` events are mirrored into the ledger (their ids,
job ids, outcome fields and a hash of the note they carry: never its text),
reading only what the file gained since the last time. The join rules then
run in SQL over indexed columns (``Ledger.match_outcomes``), and a run's rows
are read back a chunk at a time, so memory does not grow with the run.

The join rules, numbered, sit with the SQL that applies them in
pipeline/state/rules.py; this module turns what they matched into each row's
final status and detail (``_final_status``).

The same ledger and sink file always give the same result (no clock is read
here; staleness is the report's business).

Over 400 lines: mirroring the sink file (what it gained, the lines it refuses) and
turning matches into final statuses are the two halves of one reconcile, read together.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
import pandas as pd

from pipeline import exits
from pipeline.config import InputConfig, RunConfig
from pipeline.errors import PipelineError, StateError
from pipeline.events import (
    Receipt,
    SetAside,
    UnreadableEvent,
    decode_event,
    is_pruned,
    keep_set_aside,
    read_receipts,
    read_sink_from,
    rotated_copies,
    set_aside_path,
)
from pipeline.reasons import ReasonRedactor, codes_of
from pipeline.redaction import safe_id, safe_ids
from pipeline.state import (
    EventRecord,
    InputFile,
    Orphan,
    OutcomeStore,
    RunRecord,
    SinkEventsTable,
    StateStore,
    Status,
    row_key,
)
from pipeline.state.protocol import NO_RECEIPT, SIGNED

log = logging.getLogger(__name__)

# Each row ends in exactly one final status (docs/architecture.md), in this order in reports.
FinalStatus = Literal[
    "confirmed", "failed_in_emr", "awaiting_outcome", "rejected_invalid", "rejected_by_api",
    "ambiguous", "send_failed", "skipped_duplicate", "skipped_already_sent",
]  # fmt: skip
FINAL_STATUSES: Final[tuple[FinalStatus, ...]] = get_args(FinalStatus)
# How one-line summaries (the command's last line, a notification) name each final status.
FINAL_STATUS_LABELS: Final[Mapping[FinalStatus, str]] = {
    "confirmed": "confirmed", "awaiting_outcome": "awaiting outcome",
    "failed_in_emr": "failed in EMR", "rejected_invalid": "rejected (invalid)",
    "rejected_by_api": "rejected by API", "ambiguous": "ambiguous", "send_failed": "not sent",
    "skipped_duplicate": "duplicates skipped", "skipped_already_sent": "already sent",
}
# Final statuses that end a row well (exit 0): delivered, on its way, or rightly not sent.
GOOD_STATUSES: Final[frozenset[FinalStatus]] = frozenset({
    "confirmed", "awaiting_outcome", "skipped_duplicate", "skipped_already_sent",
})
# The submission statuses a row's ``submit_status`` column shows (the rest show "").
SUBMIT_STATUSES: Final[frozenset[Status]] = frozenset({
    "pending", "sending", "accepted", "api_rejected", "ambiguous", "failed",
})
_KINDS: Final = {"task_note.created": "created", "task_note.failed": "failed"}
BATCH: Final = 10_000  # events mirrored into the ledger per transaction (ingest's default)


def ingest(ledger: OutcomeStore, sink: Path, account: str | None, *,
           redactor: ReasonRedactor | None = None,
           accounts: Mapping[str, str] | None = None, batch_size: int = BATCH) -> int:
    """Mirror what the sink file gained since last time into the ledger; returns new events.

    ``account`` keys the note hash of each created event, as ``row_key`` keys rows;
    ``accounts`` (api.accounts: access_token_reference_id -> account) the hash of an
    event of a known connection. ``batch_size``: events (and set-aside lines) mirrored
    per ledger transaction.
    Free text is untrusted: each ``failure_reason`` is redacted against its rows'
    notes, read back from the input by ``redactor``, or withheld (reason codes kept)
    where they cannot be (pipeline/reasons.py); without a ``redactor`` it is withheld.
    A sink file that is not the one read before (rotated, replaced) is read
    from its start; events already mirrored are not stored twice, nor counted as
    repeated deliveries. The file is opened once: its fingerprint, its size and its
    lines all come from that one file, even if a prune renames its rewrite over the
    path meanwhile (the next ingest then reads the new file from its start). A line the
    event codec refuses is kept in ``<sink>.set-aside`` (with its byte offset),
    counted as ``(set aside)`` in the event tally, and reading goes on.

    Each event's ``outcome_at`` is the time the sink received it, from the sink's
    receipts (``events.read_receipts``), clock ``sink_received``. An event ``poll``
    fetched, or one with no receipt (a sink file older than receipts), takes the
    event's own ``created`` time instead, clock ``event_created_polled`` or
    ``event_created_no_receipt`` (``state.schema.OUTCOME_CLOCKS``): reports measure
    latency on the first clock only, and count the others.
    """
    try:
        fd = os.open(sink, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StateError(f"sink file {sink} cannot be read: {exc.strerror}") from None
    try:
        return _ingest(ledger, sink, fd, account,
                       redactor=redactor or ReasonRedactor(ledger, None),
                       accounts=accounts or {}, batch_size=batch_size)
    finally:
        os.close(fd)


def _ingest(ledger: OutcomeStore, sink: Path, fd: int, account: str | None, *,
            redactor: ReasonRedactor, accounts: Mapping[str, str], batch_size: int) -> int:
    """``ingest``, reading the sink file open as ``fd`` (and nothing else)."""
    offset, head = ledger.sink_position()
    current = _fd_head(fd)
    # Measure first, then the receipts, then the lines up to that size only: the sink
    # writes a receipt before its line, so no line read here lacks its receipt to a race.
    stop = os.fstat(fd).st_size
    again = False  # a file read again from its start: what it holds is mostly mirrored
    if not _same_head(head, current) or offset > stop:
        again, offset = bool(head) and offset > 0, 0
    redactor.prepare(sink, offset)
    # The receipts file grows with every event and is read whole: not when no line is new.
    receipts = read_receipts(sink, offset) if stop > offset else None
    if receipts is None and stop > offset:
        log.info("%s has no receipts file: outcome times are the events' own created times",
                 sink)
    added = 0
    batch: list[EventRecord] = []
    tally: Counter[str] = Counter()
    others: list[tuple[str, str]] = []  # events of other types: counted once per id
    end = offset
    aside: list[SetAside] = []
    pruned = 0
    for _, end, event in read_sink_from(sink, offset, stop, fd=fd):
        if isinstance(event, SetAside):
            aside.append(event)
            # a file read again holds the lines set aside before (the side file keeps
            # each once): counted the first time only, as repeats are
            if not again:
                tally["(set aside)"] += 1
        elif (record := _record(event, end, account, tally, receipts or {},
                                event_account=accounts.get(
                                    str(event.get("access_token_reference_id"))),
                                others=others, again=again)) is not None:
            batch.append(record)
            pruned += (not again and record[1] == "created" and record[8] is None
                       and is_pruned(event))
        if len(batch) + len(aside) + len(others) >= batch_size:
            if aside:
                _set_aside(sink, aside)
            added += ledger.add_events(redactor.clean(batch), dict(tally), offset=end,
                                       head=current, count_repeats=not again, others=others)
            batch, tally, aside, others = [], Counter(), [], []
    if aside:
        _set_aside(sink, aside)
    if batch or tally or others or end != offset:
        added += ledger.add_events(redactor.clean(batch), dict(tally), offset=end, head=current,
                                   count_repeats=not again, others=others)
    redactor.warn()
    _said_after_ingest(sink, offset=offset, added=added, pruned=pruned)
    return added


def _said_after_ingest(sink: Path, *, offset: int, added: int, pruned: int) -> None:
    """What an ingest of ``sink`` from ``offset`` tells the operator once it is done."""
    if offset == 0 or added:  # once per new file or new events, not every reconcile
        _warn_rotated(sink)
    if pruned:
        log.warning("%s: %d task_note.created events read here have had their note text pruned"
                    " (tasknotes prune): one this ledger had not mirrored before the prune"
                    " cannot settle an ambiguous row by note text; matching by job id still"
                    " works", sink, pruned)
    if added:
        log.info("%d new task_note events from %s", added, sink)


def _warn_rotated(sink: Path) -> None:
    """Warn of files beside the sink file that look like rotated copies of it (never read:
    events.rotated_copies)."""
    found = rotated_copies(sink)
    if found:
        log.warning("%s: %d file(s) beside it look like rotated copies of it (first: %s);"
                    " reconcile does not read them and prune does not prune them: any event"
                    " in them not mirrored before the rotation is missing here (README,"
                    " Retention: do not rotate the sink file)", sink, len(found), found[0].name)


def ingest_postgres(ledger: SinkEventsTable, account: str | None, *,
                    redactor: ReasonRedactor | None = None,
                    accounts: Mapping[str, str] | None = None) -> int:
    """``ingest`` with ``state.url``: mirror what the sink table (``sink_events``) gained
    since last time, in commit order (``seq`` is the position); returns new events.

    The same records as from the sink file: ``outcome_at`` is the receive time of a
    webhook the sink verified (clock ``sink_received``), else (an event ``poll``
    stored) the event's ``created`` (``event_created_polled``; ``event_created_no_receipt``
    for one copied from a sink file without receipts: pg_migrate.py). A body the event codec
    refuses is counted as ``(set aside)`` and stays in the table.
    """
    redactor = redactor or ReasonRedactor(ledger, None)
    position, _ = ledger.sink_position()
    found = ledger.sink_events_after(position, BATCH)
    added = 0
    if found:
        # Each batch is stored (add_events, on a second connection, by a thread) while the
        # next one is read and decoded here: the server's work on one overlaps the
        # client's on the other. One batch in flight at most, each committed with its
        # position in turn, so a failure leaves the position after the last batch stored.
        with ledger.events_writer() as writer, ThreadPoolExecutor(
                1, thread_name_prefix="tasknotes-ingest") as pool:
            storing: Future[int] | None = None
            while found:
                batch, tally = _stored_records(found, account, accounts or {})
                position = found[-1][0]
                cleaned = redactor.clean(batch)
                if storing is not None:
                    added += storing.result()
                storing = pool.submit(writer.add_events, cleaned, dict(tally),
                                      offset=position, head="")
                found = (ledger.sink_events_after(position, BATCH) if len(found) == BATCH
                         else [])
            if storing is not None:
                added += storing.result()
    redactor.warn()
    if added:
        log.info("%d new task_note events from %s", added, ledger.where)
    return added


def _stored_records(found: list[tuple[int, bytes, str, str]], account: str | None,
                    accounts: Mapping[str, str]) -> tuple[list[EventRecord], Counter[str]]:
    """The mirror's records of stored sink events (``sink_events_after``'s rows), and the
    tally of what was not one (``ingest_postgres``)."""
    batch: list[EventRecord] = []
    tally: Counter[str] = Counter()
    for seq, body, verdict, received_at in found:
        try:
            event = decode_event(body)
        except UnreadableEvent:
            tally["(set aside)"] += 1
            continue
        receipt = (Receipt(received_at, polled=False) if verdict == SIGNED
                   else Receipt(None, polled=True, fetched_at=received_at))
        event_id = event.get("id")
        receipts = ({event_id: receipt} if isinstance(event_id, str)
                    and verdict != NO_RECEIPT else {})
        if (record := _record(event, seq, account, tally, receipts,
                              event_account=accounts.get(
                                  str(event.get("access_token_reference_id"))))) is not None:
            batch.append(record)
    return batch, tally


def _set_aside(sink: Path, lines: list[SetAside]) -> None:
    """Keep unreadable lines in the side file before the ledger moves past them.

    If the side file cannot be written, the lines are still in the sink file
    (never rewritten): say so, and go on all the same.
    """
    try:
        keep_set_aside(sink, lines)
    except OSError as exc:
        log.error("%s: cannot keep unreadable lines in %s (%s); they stay in the sink file",  # noqa: TRY400 - the cause is the disk
                  sink, set_aside_path(sink), exc.strerror or exc)
    first = lines[0]
    log.warning("%s: %d unreadable line(s) set aside in %s (first at byte %d: %s)", sink,
                len(lines), set_aside_path(sink), first.offset, first.code)


def _record(event: dict[str, Any], end: int, account: str | None, tally: Counter[str],
            receipts: dict[str, Receipt], *, event_account: str | None = None,
            others: list[tuple[str, str]] | None = None, again: bool = False
            ) -> EventRecord | None:
    """The event as the mirror stores it; ``event_account``: the account its
    access_token_reference_id names (api.accounts), which keys its note hash and which a
    matched row's own account must agree with (rules.py). None for an event of another
    type, counted in ``tally`` under its type, or (``others`` given) put in ``others``
    with its id, for the ledger to count once per id; one with no id is counted, unless
    ``again`` (a sink file read again from its start: counted when first read)."""
    kind = _KINDS.get(str(event.get("type")))
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id:
        if not again:
            tally["(no id)"] += 1
        return None
    if kind is None:
        name = str(safe_id(event.get("type")))  # upstream text: as an id, or withheld
        if others is None:
            tally[name] += 1
        else:
            others.append((event_id, name))
        return None
    found = event.get("data")
    data: dict[str, Any] = found if isinstance(found, dict) else {}
    reasons = data.get("reasons")
    codes = "" if reasons is None else ";".join(codes_of(reasons))
    ekey = None
    task_id, note = data.get("emr_task_id"), data.get("note")
    keyed_by = event_account or account  # None: a connection not known to be this config's
    if kind == "created" and isinstance(task_id, str) and isinstance(note, str) and keyed_by:
        ekey = row_key(keyed_by, task_id, note)
    job_id = event.get("job_id")
    # failure_reason is untrusted free text: ReasonRedactor.clean makes it safe before storing.
    reason = data.get("failure_reason")
    if reason is None and kind == "failed" and isinstance(reasons, list):
        reason = ""  # the descriptions are free text too: codes only, checked the same way
    created = _text(event.get("created"))
    # Ids are untrusted too: one that does not look like an id, or shows the event's own
    # note, is withheld (safe_id). The note of a failed event is not in it: the shape rule.
    shown, job, task_note_id, emr_note_id = safe_ids(
        (event_id, None if job_id is None else str(job_id).strip(), data.get("task_note_id"),
         data.get("emr_note_id")), note)
    receipt: Receipt | None = None
    if receipts:  # keyed by the id as the sink kept it: as given when it passes the shape rule
        kept = shown if shown == event_id else str(safe_id(event_id))
        receipt = receipts.get(kept) or receipts.get(event_id)
    outcome_at: str | None
    if receipt is not None and receipt.received_at is not None:
        outcome_at, clock = receipt.received_at, "sink_received"
    else:
        clock = "event_created_polled" if receipt is not None else "event_created_no_receipt"
        outcome_at = created
    return EventRecord(str(shown), kind, job, task_note_id, created, emr_note_id,
                       _text(reason), codes or None, ekey, end, outcome_at, clock,
                       event_account)


def _text(value: object) -> str | None:
    """Upstream text as the mirror keeps it: a NUL (which a PostgreSQL text column cannot
    hold, so one such event would stop every later reconcile) and the other C0 control
    characters each become U+FFFD; None stays None."""
    if value is None:
        return None
    text = str(value)
    # printable text holds no control character: most values, kept without a regex pass
    return text if text.isprintable() else _CONTROL.sub("\ufffd", text)


_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _head(path: Path) -> str:
    """A fingerprint of the sink file, ``<inode>:<hash of its first line>``: tells one file
    from its replacement (a rotation, or ``tasknotes prune``'s rewrite, whose first line
    may be the same)."""
    try:
        with path.open("rb") as fh:
            return _fd_head(fh.fileno())
    except OSError:
        return ""


def _fd_head(fd: int) -> str:
    """``_head`` of the file open as ``fd``."""
    with os.fdopen(os.dup(fd), "rb") as fh:
        fh.seek(0)
        return f"{os.fstat(fd).st_ino}:{hashlib.sha256(fh.readline()).hexdigest()[:16]}"


def sink_head(path: Path) -> str:
    """The fingerprint ``ingest`` keeps with its position in the sink file (``_head``)."""
    return _head(path)


def mirrored_through(ledger: OutcomeStore, sink: Path) -> int:
    """How many bytes of the sink file ``sink`` the events mirror of ``ledger`` (a SQLite
    ledger) has read: its position if it was taken of a file that begins as this one
    (its first line's hash, ``_head``: a copy of the file, taken to another host, has
    another inode), else 0 (none of it counts as read)."""
    offset, head = ledger.sink_position()
    first = head.partition(":")[2] if ":" in head else head
    return offset if first and first == _head(sink).partition(":")[2] else 0


def _same_head(stored: str, current: str) -> bool:
    """``current`` fingerprints the file ``stored`` was taken of; a ``stored`` one kept
    before fingerprints named the inode is compared by its first line only."""
    return stored == current or (":" not in stored and bool(stored)
                                 and current.partition(":")[2] == stored)


@dataclass
class RunResult:
    """One run, reconciled: its rows come a chunk at a time, each with its final status."""

    run: RunRecord
    files: list[InputFile]
    orphan_count: int
    orphans: list[Orphan]
    tally: dict[str, int]
    ledger: StateStore = field(repr=False)

    def chunks(self, size: int = 20_000) -> Iterator[pd.DataFrame]:
        """The run's rows in input order, with final_status, detail and outcome columns."""
        for frame in self.ledger.run_chunks(self.run.run_id, size):
            yield _finalise(frame, self.run)

    def frame(self) -> pd.DataFrame:
        """Every row at once: for tests and small runs; reports use ``chunks()``."""
        chunks = list(self.chunks())
        return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()

    @cached_property
    def counts(self) -> dict[str, int]:
        """How many of the run's rows end in each final status (every FINAL_STATUSES
        name, in order): the final statuses ``chunks()`` gives, decided by the same rules
        from the columns they read (``status_chunks``), without the detail texts."""
        found: Counter[str] = Counter()
        for frame in self.ledger.status_chunks(self.run.run_id):
            final, _ = _final_status(frame, self.run, details=False)
            found.update(final.tolist())
        return {status: int(found.get(status, 0)) for status in FINAL_STATUSES}

    @property
    def exit_code(self) -> int:
        """0 when every row ended well, else 1 (the README's exit codes)."""
        return exits.for_counts(self.counts, GOOD_STATUSES)


class Reconciler:
    """Reconciles runs of one ledger against one sink file, reading the file once."""

    def __init__(self, ledger: StateStore, sink: Path, *, inputs: InputConfig | None = None,
                 secrets: Sequence[str] = (), references: Mapping[str, str] | None = None,
                 named: Mapping[str, str] | None = None, own: str | None = None,
                 former: Mapping[str, Sequence[str]] | None = None, multi: bool = False
                 ) -> None:
        """``inputs`` (the config's ``input``) lets a webhook's ``failure_reason`` be redacted
        against its row's note read back from the input; without it the text is withheld
        and only reason codes are kept. ``secrets``: credentials also kept out of it.
        ``references``: access_token_reference_id -> account (api.accounts). ``named``:
        the connections the config names with a reference id (``ApiConfig.connections``),
        recorded in the state so that any config sharing it keys their events alike.
        ``own``: the config's account label when it is known (else the account a caller
        passes to ``refresh`` stands in); ``former``: account -> its former names;
        ``multi``: the config has api.accounts (for the keys messages name)."""
        self._references = dict(references or {})
        self._named = dict(named or {})
        self._own = own
        self._former = {k: tuple(v) for k, v in (former or {}).items()}
        self._multi = multi
        self._ledger = ledger
        self._sink = sink
        self._redactor = ReasonRedactor(ledger, inputs, tuple(secrets))
        self._refreshed = False

    @classmethod
    def of(cls, ledger: StateStore, config: RunConfig) -> Reconciler:
        """The reconciler a command uses: the config's sink file, its input settings (to
        read notes back) and every secret it knows (to keep them out of reasons)."""
        secrets: list[str] = []
        api = config.api
        for value in (api.client_id, api.client_secret, api.access_token):
            if value is not None and value.get_secret_value():
                secrets.append(value.get_secret_value())
        for settings in (api.accounts or {}).values():
            if settings.access_token is not None and settings.access_token.get_secret_value():
                secrets.append(settings.access_token.get_secret_value())
        with contextlib.suppress(PipelineError):
            secrets += [s.decode() for s in config.webhooks.all_secrets()]
        # an event's connection -> its account (reference_id; the name in a sandbox's emulator)
        references = {a.reference_id or name: name for name, a in (api.accounts or {}).items()}
        token = api.access_token.get_secret_value() if api.access_token else ""
        own = api.account_id() if (api.multi or api.account or token) else None
        return cls(ledger, config.webhooks.sink, inputs=config.input, secrets=secrets,
                   references=references, named=api.connections(), own=own,
                   former=api.former_names(), multi=api.multi)

    def refresh(self, account: str) -> None:
        """Learn every outcome the sink file holds (a run does so before choosing what to send)."""
        if not self._refreshed:
            accounts = self._known_connections()
            # An event of a connection no config named: this config's own, as far as it
            # can tell, unless it names its own connections (then it is another clinic's,
            # and keyed under none: it settles no row by evidence rather than a wrong one).
            # A config whose own label is not known (a token's fingerprint, the token not
            # set) takes the run's account only where every run is of one account.
            fallback = None if self._named else self._own
            if fallback is None and not self._named and len(
                    self._ledger.account_labels()) <= 1:
                fallback = account
            if isinstance(self._ledger, SinkEventsTable):
                ingest_postgres(self._ledger, fallback, redactor=self._redactor,
                                accounts=accounts)
            else:
                ingest(self._ledger, self._sink, fallback, redactor=self._redactor,
                       accounts=accounts)
            changed = self._ledger.match_outcomes()
            if changed:
                log.info("%d rows have a new outcome", changed)
            self._refreshed = True

    def _known_connections(self) -> dict[str, str]:
        """access_token_reference_id -> account for the events about to be mirrored: what
        every config sharing this state named (``Ledger.connections``; this config's own
        recorded first), then this config's own names. An event of a connection no config
        named is keyed under the mirroring command's account, as before (README: "Known
        limit")."""
        recorded = self._ledger.connections()
        for reference, account in self._named.items():
            other = recorded.get(reference)
            if other is not None and other != account and other not in self._former.get(
                    account, ()):
                key = (f"api.accounts.{account}.reference_id" if self._multi
                       else "api.reference_id")
                raise StateError(
                    f"{key}: {reference!r} is recorded in the state for account {other!r} "
                    "(another config using it): a Cobalt connection has one reference id, "
                    "so one of the two configs is wrong; if that clinic was renamed "
                    f"{account!r}, list {other!r} in its formerly")
        if self._named:
            try:
                self._ledger.register_connections(self._named)
            except (StateError, sqlite3.Error) as exc:  # a read-only store: known for now
                log.debug("connections not recorded in the state: %s", exc)
        return {**recorded, **self._named, **self._references}

    def run(self, run_id: str) -> RunResult:
        """Every row of ``run_id`` with its final status, outcome and evidence.

        A run left ``running`` by a process that is gone reads as ``crashed``.
        """
        record = self._ledger.run(run_id)
        record = replace(record, state=self._ledger.effective_state(record))
        self.refresh(record.account)
        count, orphans = self._ledger.orphans()
        return RunResult(record, self._ledger.files(run_id), count, orphans,
                         self._ledger.event_tally(), self._ledger)


def _finalise(rows: pd.DataFrame, record: RunRecord) -> pd.DataFrame:
    out = rows
    final, detail = _final_status(out, record)
    out["final_status"] = final
    out["detail"] = detail
    out["submit_status"] = out["status"].where(out["status"].isin(SUBMIT_STATUSES), "")
    out.loc[out["status"] == "accepted", "outcome"] = out["outcome"].fillna("pending")
    # A row that sent nothing itself shows the send that speaks for it: run, job, outcome.
    follows = out["via_run_id"].notna() & (out["status"] != "accepted")
    for column in ("job_id", "task_note_id", "submitted_at", "outcome_at", "event_id",
                   "emr_note_id", "outcome_clock"):
        out.loc[follows, column] = out.loc[follows, f"via_{column}"]
    # an attempt in doubt has no outcome to wait for ("pending" is a delivered send's)
    delivered = follows & (out["via_status"] != "in_doubt")
    out.loc[follows, "outcome"] = out.loc[follows, "via_outcome"]
    out.loc[delivered, "outcome"] = out.loc[delivered, "via_outcome"].fillna("pending")
    already = (out["status"] == "already_sent") & ~follows
    out.loc[already, "job_id"] = out.loc[already, "ref_job_id"]
    return out


def _final_status(out: pd.DataFrame, record: RunRecord, *, details: bool = True
                  ) -> tuple[pd.Series, pd.Series]:
    """Each row's final status and (``details``) its detail text, as object Series on
    ``out``'s index: the first of ``_status_rules`` that takes a row decides. A rule's
    mask is computed only while some row is still untaken, its text only for the rows
    it takes (most rows are plain ``accepted``: their rules come early and need none);
    without ``details`` (counting) no text at all ("" for every row), the statuses the
    same."""
    final = np.full(len(out), "", dtype=object)
    detail = np.full(len(out), "", dtype=object)
    unset = np.ones(len(out), dtype=bool)  # final == "": no rule has taken the row yet
    for mask, name, text in _status_rules(out, record):
        todo = mask & unset
        if todo.any():
            unset &= ~todo
            final[todo] = name
            if details:
                detail[todo] = text if isinstance(text, str) else text()[todo]
            if not unset.any():
                break
    index = out.index
    return (pd.Series(final, index=index, dtype=object),
            pd.Series(detail, index=index, dtype=object))


_Text = str | Callable[[], np.ndarray]


def _status_rules(out: pd.DataFrame, record: RunRecord
                  ) -> Iterator[tuple[np.ndarray, FinalStatus, _Text]]:
    """The rules deciding a row's final status, in order: (mask of the rows it takes,
    the status, the detail: a text, or a function giving one per row). A generator, so
    a rule's mask is computed only when asked for."""
    def column(name: str) -> np.ndarray:
        return out[name].to_numpy(dtype=object)

    def text(name: str) -> Callable[[], np.ndarray]:
        return lambda: out[name].fillna("").to_numpy(dtype=object)

    def sent(mask: np.ndarray, prefix: str, tail: str,
             lead: str = "sent in run ") -> Callable[[], np.ndarray]:
        return lambda: (_sent_in(out, mask, prefix, lead) + tail).to_numpy(dtype=object)

    status, outcome = column("status"), column("outcome")
    stopped = record.info.stop_reason or f"the run {record.state}"
    # each comparison made once per chunk, not once per rule naming it
    accepted, already = status == "accepted", status == "already_sent"
    failed = outcome == "failed"
    via = ~pd.isna(column("via_run_id"))
    doubt = via & (column("via_status") == "in_doubt")
    landed = via & (column("via_outcome") == "created")
    waiting = via & ~landed & ~doubt
    mine = _any_of(status, ("pending", "failed", "already_sent", "held"))
    yield status == "rejected", "rejected_invalid", text("error")
    yield status == "duplicate", "skipped_duplicate", text("error")
    yield mine & landed, "skipped_already_sent", sent(via, "via", ": confirmed")
    yield mine & waiting, "awaiting_outcome", sent(via, "via", ": no outcome yet")
    again = "failed in the EMR; sent again in run "
    yield (accepted & failed & landed, "skipped_already_sent",
           sent(via & accepted, "via", ": confirmed", again))
    yield (accepted & failed & waiting, "awaiting_outcome",
           sent(via & accepted, "via", ": no outcome yet", again))
    maybe = ": may have reached Cobalt (no answer came back); check the chart before sending again"
    yield (accepted & failed & doubt, "ambiguous", sent(doubt & accepted, "via", maybe, again))
    ref_outcome = column("ref_outcome")
    yield (already & (ref_outcome == "failed") & doubt, "ambiguous",
           sent(doubt & already, "via", maybe, "failed in the EMR; sent again in run "))
    yield (already & (ref_outcome == "failed"), "failed_in_emr",
           sent(already, "ref", ": failed in the EMR (that run's report has the reason)"))
    yield (already & (ref_outcome == "conflict"), "ambiguous",
           sent(already, "ref", ": conflict, both task_note.created and task_note.failed"))
    yield already, "skipped_already_sent", text("error")
    yield status == "held", "ambiguous", text("error")
    yield accepted & (outcome == "created"), "confirmed", ""
    yield accepted & failed, "failed_in_emr", ""
    conflict = accepted & (outcome == "conflict")
    yield (conflict & np.asarray(out["event_id"].fillna("").str.contains(";", regex=False),
                                 dtype=bool), "ambiguous",
           "conflict: both task_note.created and task_note.failed for this job")
    yield (conflict, "ambiguous",
           "conflict: the event came from another account's connection "
           "(its access_token_reference_id is not this row's account's reference_id)")
    yield accepted, "awaiting_outcome", "no outcome event yet"
    yield status == "api_rejected", "rejected_by_api", ""
    yield ((status == "ambiguous") & (outcome == "created"), "confirmed",
           "settled by evidence: a task_note.created event carries this note")
    yield (_any_of(status, ("ambiguous", "sending")), "ambiguous",
           "the request may have reached Cobalt; check the chart before sending again")
    written_off = (out["written_off_at"] if "written_off_at" in out
                   else pd.Series(None, index=out.index, dtype=object))
    yield (_any_of(status, ("failed", "pending")) & written_off.notna().to_numpy(),
           "send_failed", lambda: ("never sent; written off by operator at "
                                   + written_off.fillna("")).to_numpy(dtype=object))
    yield (_any_of(status, ("failed", "pending")) & doubt, "ambiguous",
           sent(doubt, "via", maybe, "not sent by this run; sent in run "))
    yield status == "failed", "send_failed", ""
    yield status == "pending", "send_failed", f"not sent: {stopped}; the next run sends it"


def _any_of(values: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """Where ``values`` (an object array) equals one of ``wanted``."""
    found = np.zeros(len(values), dtype=bool)
    for one in wanted:
        found |= values == one
    return found


def _sent_in(out: pd.DataFrame, mask: np.ndarray, prefix: str,
             lead: str = "sent in run ") -> pd.Series:
    """"sent in run X as job J" for the masked rows (from ``<prefix>_run_id`` and
    ``<prefix>_job_id``), "" elsewhere: built only where needed, as most rows need none."""
    text = pd.Series("", index=out.index, dtype=object)
    if mask.any():
        rows = out.loc[mask]
        text[mask] = (lead + rows[f"{prefix}_run_id"].fillna("?").astype(str)
                      + rows[f"{prefix}_job_id"].map(
                          lambda j: f" as job {j}" if isinstance(j, str) and j else ""))
    return text
