"""The records the state package hands to the stages, and takes from them.

Frozen values, so a stage cannot change what another reads. JSON exists only at the
edge: a run's ``info`` is stored as a JSON object (``RunInfo.from_json`` /
``RunInfoChanges``) and summary.json is written by report.py.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, TypedDict

Status = Literal[
    "pending", "sending", "accepted", "api_rejected", "ambiguous", "failed",
    "rejected", "duplicate", "already_sent", "held",
]  # fmt: skip


_second: list[tuple[int, str]] = [(-1, "")]


def utcnow() -> str:
    """Now, as the ledger and the reports write time: ISO 8601, UTC, milliseconds.

    Called twice per request; the text up to the second is cached for that second.
    """
    now = time.time()
    second = int(now)
    cached, text = _second[0]
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = (second, text)
    return f"{text}.{int((now - second) * 1000):03d}Z"


def row_key(account: str, emr_task_id: str, note: str, *, nfc: bool = True) -> bytes:
    """The ledger key of a note: the same note for the same task on the same account.

    Task id and note are compared in Unicode NFC (UAX #15), so ``é`` as one code
    point and as ``e`` + U+0301 give one key: the same visible note never lands twice.
    ``nfc=False`` gives the key versions before that gave a note not written in NFC.
    """
    text = f"{account}\x1f{emr_task_id}\x1f{note}"
    if nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True, slots=True)
class NewRow:
    """One input row as first written for a run."""

    file_no: int
    line: int
    emr_task_id: str
    key: bytes | None
    status: Status
    error: str | None = None
    ref_id: int | None = None
    passthrough: tuple[str, ...] = ()
    account: str | None = None  # the row's own account (api.accounts), else None


@dataclass(frozen=True, slots=True)
class Earlier:
    """What earlier runs did with a key, as far as deciding whether to send it again."""

    row_id: int
    run_id: str
    status: str
    job_id: str | None
    outcome: str | None

    @property
    def delivered(self) -> bool:
        """Cobalt has (or provably had) this note: sending it again would double it."""
        if self.outcome == "created":
            return True
        return self.status == "accepted" and self.outcome not in ("failed",)

    @property
    def maybe_delivered(self) -> bool:
        """An attempt may have landed and nothing has settled it."""
        return self.status in ("ambiguous", "sending") and self.outcome is None


OpenRow = tuple[str, bytes, str | None]  # (run_id, key, since): one row behind an open item


@dataclass(frozen=True, slots=True)
class OpenGroup:
    """Open rows of one kind over every run: how many, how many stale, since when, where."""

    count: int
    stale: int
    oldest: str | None  # ISO 8601 UTC: the earliest submission (or end of run) among them
    run_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of sending one row, as the ledger records it."""

    row_id: int
    status: Status
    http_status: int | None = None
    task_note_id: str | None = None
    job_id: str | None = None
    error: str | None = None
    answered_at: str | None = None


class EventRecord(NamedTuple):
    """One ``task_note.*`` event as the events mirror stores it (never a note's text).

    A named tuple rather than a dataclass: a million of them go to the store in one
    ``executemany`` per batch, as they are. ``ekey``: the ``row_key`` of the note a
    created event carries (None otherwise); ``line``: the sink file's byte offset
    just after the event's line.
    """

    event_id: str
    kind: str  # created | failed
    job_id: str | None
    task_note_id: str | None
    created: str | None
    emr_note_id: str | None
    failure_reason: str | None
    reason_codes: str | None  # Cobalt's reason codes, ';'-separated
    ekey: bytes | None
    line: int
    outcome_at: str | None = None  # the sink's receive time, else ``created``
    outcome_clock: str = "event_created_no_receipt"  # see schema.OUTCOME_CLOCKS
    account: str | None = None  # the api.accounts account its reference id names, if known


@dataclass(frozen=True, slots=True)
class Orphan:
    """A ``task_note.*`` event no row of any run owns."""

    event_id: str
    kind: str
    job_id: str | None
    created: str | None


@dataclass(frozen=True, slots=True)
class InputFile:
    """An input file as a run recorded it before reading its first row.

    ``sha256``/``size`` (bytes) are None when the run never fingerprinted it;
    ``header``: the header names as written.
    """

    file_no: int
    path: str
    sha256: str | None
    size: int | None
    header: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InputRecords:
    """One input file of a run: its physical records after the header, and where they went.

    ``to_send + rejected + skipped + blank + beyond_limit == records`` once the file is
    read (``accounted``); ``skipped``: duplicates, rows an earlier run sent and rows
    held; ``beyond_limit``: records ``--limit`` left unread. Counts are records.
    """

    path: str
    records: int = 0
    to_send: int = 0
    rejected: int = 0
    skipped: int = 0
    blank: int = 0
    beyond_limit: int = 0
    accounted: bool = False

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> InputRecords:
        """From its stored JSON object (keys this version does not know are ignored)."""
        return cls(**{k: v for k, v in stored.items() if k in _INPUT_RECORDS_KEYS})

    def as_json(self) -> dict[str, Any]:
        """As a JSON object (run info, summary.json's ``input_records``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class ScanStopped:
    """Where a run's scan stopped before the end of its input (a full disk, a signal, an
    input error): the file, its last line recorded (None: before its first row), and
    every file whose rest was not read, that one first."""

    path: str
    after_line: int | None
    unread_files: tuple[str, ...]

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> ScanStopped:
        """From its stored JSON object."""
        return cls(str(stored["path"]), stored.get("after_line"),
                   tuple(stored.get("unread_files") or ()))

    def as_json(self) -> dict[str, Any]:
        """As a JSON object (run info ``scan_stopped``)."""
        return {"path": self.path, "after_line": self.after_line,
                "unread_files": list(self.unread_files)}


_INPUT_RECORDS_KEYS = frozenset(f.name for f in fields(InputRecords))


class RunInfoChanges(TypedDict, total=False):
    """Keys of a run's info a stage records (merged into what is stored); see RunInfo.
    The store writes them as JSON (``info_json``)."""

    argv: list[str]
    limit: int | None
    force: bool
    passthrough: list[str]
    dry_run: bool
    stop_reason: str | None
    timings_s: dict[str, float]
    throughput_per_s: float | None
    send: dict[str, int]
    problems: dict[str, int]
    blank_rows: int
    input_records: tuple[InputRecords, ...]
    truncated_at: tuple[str, int] | None
    scan_stopped: ScanStopped
    exit_code: int
    report_final: bool
    redrive_digest: str | None
    report_marker: str
    report_stale_due: float | None
    report_exit_code: int | None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a run recorded about itself besides its state (stored as a JSON object).

    ``timings_s``: seconds per stage; ``throughput_per_s``: requests per second of
    the send stage; ``send``: requests, retries, ledger_commits; ``problems``:
    rejected rows per reason code; ``input_records``: per input file, its path,
    records and whether ``--limit`` left some unread (``beyond_limit``);
    ``truncated_at``: where ``--limit`` stopped reading (the input file's name as
    given, the line of the first row it left unread); ``scan_stopped``: where a scan
    that stopped early stopped (path, after_line, unread_files); ``exit_code``: what
    the run's process ended with;
    ``report_final``/``redrive_digest``: see ``Ledger.report_written``.
    A key absent from the stored JSON reads as the default here.
    """

    argv: tuple[str, ...] = ()
    limit: int | None = None
    force: bool = False
    passthrough: tuple[str, ...] = ()
    dry_run: bool = False
    stop_reason: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    throughput_per_s: float | None = None
    send: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)
    blank_rows: int = 0
    input_records: tuple[InputRecords, ...] = ()
    truncated_at: tuple[str, int] | None = None
    scan_stopped: ScanStopped | None = None
    exit_code: int | None = None
    report_final: bool = False
    redrive_digest: str | None = None

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> RunInfo:
        """The info from its stored JSON object: keys this version does not know are
        ignored, a key absent (or null) reads as the default, lists become tuples."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in stored.items() if k in known and v is not None}
        if "input_records" in values:
            values["input_records"] = tuple(InputRecords.from_json(f)
                                            for f in values["input_records"])
        if "truncated_at" in values:
            path, line = values["truncated_at"]
            values["truncated_at"] = (str(path), int(line))
        if values.get("scan_stopped"):
            values["scan_stopped"] = ScanStopped.from_json(values["scan_stopped"])
        else:
            values.pop("scan_stopped", None)
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        """The info as a JSON object (tuples as lists, records as objects)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}

    def merged(self, changes: RunInfoChanges) -> RunInfo:
        """This info with ``changes`` recorded over it."""
        return RunInfo.from_json({**self.as_json(), **info_json(changes)})


def _json_value(value: object) -> object:
    if isinstance(value, InputRecords | ScanStopped):
        return value.as_json()
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def info_json(changes: RunInfoChanges) -> dict[str, Any]:
    """``changes`` as the JSON object the store merges into a run's stored info (records
    as objects, tuples as lists): the only place they become JSON."""
    return {key: _json_value(value) for key, value in changes.items()}


RunState = Literal["running", "finished", "aborted", "crashed", "dry_run"]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as the ledger holds it. Times are ISO 8601 UTC (``utcnow``);
    ``finished_at`` is None while it runs, or if it never finished; ``fingerprint``:
    the config's fingerprint."""

    run_id: str
    started_at: str
    finished_at: str | None
    state: RunState
    account: str
    fingerprint: str
    info: RunInfo
