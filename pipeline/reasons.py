"""Free text in webhook events made safe to keep: ``failure_reason`` never carries the note.

A ``task_note.failed`` event's ``failure_reason`` is Cobalt's (or the EMR's)
own words and may quote the note it failed to append ("Could not append note
"<the note>": task is closed"). The event does not carry the note, and the
ledger holds only its hash, so the note is read back from the input file the
row came from, at the row's line, and accepted only if its ledger key (the
hash) is the row's. The text is then passed through ``redact``
(pipeline/redaction.py) against that note and every secret; what quotes the note
re-encoded is withheld whole.

Where no row's note can be read back (the input file moved, changed, or was read
with other settings; an event for a job no row has), the text is withheld and
only the machine-readable reason codes (``reasons[].code``) are kept, so the
ledger, results.csv, summary.json and report.html never hold what could not be
checked. The withheld text stays only in the sink file (0600).

Reason codes are kept only when they look like codes (``CODE_PATTERN``) and do
not quote the note either.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.config import InputConfig
from pipeline.errors import PipelineError
from pipeline.redaction import MAX_MESSAGE, quotes, redact, safe_id
from pipeline.source import CsvFile, clean_name
from pipeline.state import EventRecord, OutcomeStore, row_key

log = logging.getLogger(__name__)

CODE_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
QUOTED: Final = "[reason withheld: it quoted the note]"
UNCHECKED: Final = "[reason withheld: the note was not read back to check it]"
_MAX_TEXT: Final = 8192  # longer free text is withheld unread (a reason is a sentence)
_PREPARE_MAX: Final = 100_000  # failed events whose notes ``prepare`` holds at once, at most


def _key(job_id: object, data: object) -> tuple[str, str]:
    """(job id, task note id) of an event, as an EventRecord holds them ("" for none)."""
    task_note_id = data.get("task_note_id") if isinstance(data, dict) else None
    return ("" if job_id is None else str(job_id).strip(),
            "" if task_note_id is None else str(task_note_id))


def codes_of(reasons: object) -> list[str]:
    """The ``code`` of each ``reasons[]`` item that looks like a code (``CODE_PATTERN``);
    anything else is free text and dropped."""
    if not isinstance(reasons, list):
        return []
    return [str(r["code"]) for r in reasons if isinstance(r, dict) and r.get("code")
            and CODE_PATTERN.fullmatch(str(r["code"]))]


def safe_emr_note_id(value: object, note: object) -> str | None:
    """A created event's ``emr_note_id`` as kept: as given when it looks like an id and
    does not show ``note`` (the event's own note, when it is a string), else withheld
    (``redaction.safe_id``)."""
    return safe_id(value, [note] if isinstance(note, str) else [])


@dataclass
class ReasonRedactor:
    """Redacts the ``failure_reason`` of failed events against their rows' notes.

    ``inputs``: how input files are read (the config's ``input``); None reads
    nothing back, so every reason text is withheld. ``secrets``: credentials
    also kept out. Counts what it withheld (``withheld``), for one warning, and the
    input files it read back (``files_read``: each at most once per batch of events,
    once per ingest for what ``prepare`` found).
    """

    ledger: OutcomeStore
    inputs: InputConfig | None
    secrets: Sequence[str] = ()
    withheld: int = 0
    files_read: int = 0
    unread: set[str] = field(default_factory=set)
    _known: dict[tuple[str, str], list[str] | None] = field(default_factory=dict)

    def prepare(self, sink: Path, offset: int) -> None:
        """Learn at once the notes of the failed events the sink file gained from ``offset``
        (at most 100,000 of them), so each input file is read once per ingest, not once per
        batch of events. A quick pass: only lines naming ``task_note.failed`` are parsed;
        what it misses (a line it cannot parse, events written since) ``clean`` resolves."""
        if self.inputs is None:
            return  # nothing can be read back: every text is withheld, nothing to learn
        keys: set[tuple[str, str]] = set()
        try:
            with sink.open("rb") as fh:
                fh.seek(offset)
                for raw in fh:
                    if b"task_note.failed" not in raw:
                        continue
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        keys.add(_key(event.get("job_id"), event.get("data")))
                        if len(keys) >= _PREPARE_MAX:
                            break
        except OSError:
            return
        self._resolve(keys)

    def clean(self, records: list[EventRecord]) -> list[EventRecord]:
        """``records`` with every ``failure_reason`` made safe (see the module docstring),
        in the same order. Reads each input file it needs at most once per call."""
        wanted = [i for i, r in enumerate(records) if r.failure_reason is not None]
        if not wanted:
            return records
        keys = {i: (records[i].job_id or "", records[i].task_note_id or "") for i in wanted}
        self._resolve({k for k in keys.values() if k not in self._known})
        out = list(records)
        for i in wanted:
            record = records[i]
            failure, listed = record.failure_reason, record.reason_codes
            private = self._known[keys[i]]
            codes = [c for c in (listed or "").split(";") if c]
            if private:
                codes = [c for c in codes if not quotes(c, private)]
            shown = ";".join(codes)
            text = str(failure)
            if not text.strip():
                reason: str | None = shown or None
            elif private is None or len(text) > _MAX_TEXT:
                reason = f"{shown} {UNCHECKED}".strip()
                self.withheld += 1
            else:
                reason = redact(text, [*private, *self.secrets],
                                withheld=f"{shown} {QUOTED}".strip(), limit=MAX_MESSAGE)
            out[i] = record._replace(failure_reason=reason, reason_codes=shown or None)
        return out

    def _resolve(self, keys: set[tuple[str, str]]) -> None:
        """Learn, for each (job id, task note id), the notes of every row it may belong to
        (matched by job id, else task note id), each proven by its ledger key; None for a
        key with no row, or with any row whose note could not be proven."""
        if not keys:
            return
        if self.inputs is None:
            self.unread.add("input settings not given")
            self._known.update(dict.fromkeys(keys))
            return
        jobs = {k[0] for k in keys if k[0]}
        task_notes = {k[1] for k in keys if k[1]}
        rows = rows_for(self.ledger.rows_of_jobs(jobs, task_notes))
        by_file: dict[tuple[str | None, str | None], dict[int, list[_Row]]] = {}
        for row in rows:
            by_file.setdefault((row.path, row.header), {}).setdefault(row.line, []).append(row)
        proven: dict[int, list[str]] = {}
        for (path, header), lines in by_file.items():
            if path is not None and header is not None:
                self._read_back(Path(path), json.loads(header), lines, proven)
            else:
                self.unread.add("a run that never recorded its input file")
        by_job: dict[str, list[_Row]] = {}
        by_task_note: dict[str, list[_Row]] = {}
        for row in rows:
            if row.job_id:
                by_job.setdefault(row.job_id, []).append(row)
            if row.task_note_id:
                by_task_note.setdefault(row.task_note_id, []).append(row)
        for key in keys:
            mine = by_job.get(key[0]) or by_task_note.get(key[1]) or []
            self._known[key] = ([n for r in mine for n in proven[r.row_id]]
                                if mine and all(r.row_id in proven for r in mine) else None)

    def _read_back(self, path: Path, header: list[str], lines: dict[int, list[_Row]],
                   proven: dict[int, list[str]]) -> None:
        inputs = self.inputs
        if inputs is None:  # _resolve reads nothing back without them
            return
        clean = [clean_name(n) for n in header]
        if inputs.columns.note not in clean:
            self.unread.add(f"{path.name}: no {inputs.columns.note!r} column")
            return
        column = clean.index(inputs.columns.note)
        self.files_read += 1
        try:
            with CsvFile(path, inputs) as reader:
                for batch in reader.batches():
                    for line, cells in zip(batch.lines, batch.rows, strict=True):
                        for row in lines.get(line, ()):
                            if column < len(cells) and (notes := self._proof(row, cells[column])):
                                proven[row.row_id] = notes
        except PipelineError:
            self.unread.add(f"{path}: not readable")
        missing = sum(1 for rows in lines.values() for r in rows if r.row_id not in proven)
        if missing:
            self.unread.add(f"{path}: {missing} row(s) changed since the run")

    def _proof(self, row: _Row, cell: str) -> list[str]:
        """The forms of ``cell`` a run may have sent, if one has the row's ledger key."""
        text = cell
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.inputs is not None and self.inputs.unescape_newlines:
            text = text.replace("\\n", "\n")
        forms = {cell, cell.strip(), text.strip(), unicodedata.normalize("NFC", text).strip(),
                 unicodedata.normalize("NFC", cell).strip()}
        for form in forms:
            if form and row.key in (row_key(row.account, row.emr_task_id, form),
                                    row_key(row.account, row.emr_task_id, form, nfc=False)):
                return sorted(forms - {""})
        return []

    def warn(self) -> None:
        """One warning for what was withheld unchecked (no note text in it)."""
        if self.withheld:
            why = "; ".join(sorted(self.unread)[:5]) or "no input row for the job"
            log.warning("%d failure reason(s) withheld (reason codes kept): the note could not "
                        "be read back to check them (%s)", self.withheld, why)
        self.withheld, self.unread, self._known = 0, set(), {}


@dataclass(frozen=True, slots=True)
class _Row:
    row_id: int
    job_id: str | None
    task_note_id: str | None
    line: int
    emr_task_id: str
    key: bytes
    account: str
    path: str | None
    header: str | None


def rows_for(found: Iterable[tuple[Any, ...]]) -> list[_Row]:
    """Ledger tuples (``Ledger.rows_of_jobs``'s SQL) as rows."""
    return [_Row(*r) for r in found]
