"""The scan stage's room: checked rows + the ledger's history -> what each row becomes;
pending rows -> jobs.

``Scan`` reads and validates every input file and decides, per row, its status in the
ledger (pending / rejected / duplicate / already_sent / held), writing rejected rows to
rejects.csv. A run records the rows in the ledger; a dry run (``run --dry-run``,
``validate``) takes the same path with a recorder that discards them, so both count
alike. ``pending_jobs`` reads the files again for the send stage and pairs each pending
row with its note, checked against its ledger key.

About 400 lines: the scan's rules (one path for runs and dry runs) and the second read
that pairs pending rows with their notes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from pipeline.rejects import RejectsWriter
from pipeline.retry import Control
from pipeline.source import CsvFile, Header, RawBatch, expand_inputs
from pipeline.state import (
    Earlier,
    InputRecords,
    NewRow,
    ScanStopped,
    ScanStore,
    SendStore,
    Status,
    row_key,
    rules,
)
from pipeline.submit import Job
from pipeline.validation import CheckedBatch, ProblemTally, Validator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The command line's say over one run."""

    inputs: tuple[str, ...] = ()
    dry_run: bool = False
    limit: int | None = None
    progress: bool = True
    force: bool = False
    argv: tuple[str, ...] = ()


@dataclass(slots=True)
class ScanCounts:
    """What the scan found, row by row, before anything was sent."""

    rows: int = 0
    to_send: int = 0
    rejected: int = 0
    duplicates: int = 0
    already_sent: int = 0
    held: int = 0
    blank: int = 0
    truncated_at: tuple[str, int] | None = None
    unread: int = 0  # records left unread after --limit (at least this many if not exact)
    unread_exact: bool = True
    problems: ProblemTally = field(default_factory=ProblemTally)
    files: list[FileCounts] = field(default_factory=list)


@dataclass(slots=True)
class FileCounts:
    """Every physical record of one file after its header, and where it went.

    ``to_send + rejected + skipped + blank + beyond_limit == records`` once the
    file is read (``accounted``); ``skipped`` holds duplicates, rows an earlier
    run sent and rows held because an earlier attempt may have landed.
    """

    path: str
    records: int = 0
    to_send: int = 0
    rejected: int = 0
    skipped: int = 0
    blank: int = 0
    beyond_limit: int = 0

    @property
    def accounted(self) -> bool:
        return (self.to_send + self.rejected + self.skipped + self.blank
                + self.beyond_limit) == self.records

    def as_record(self) -> InputRecords:
        """What the run records of this file (run info ``input_records``)."""
        return InputRecords(self.path, self.records, self.to_send, self.rejected,
                            self.skipped, self.blank, self.beyond_limit, self.accounted)


@dataclass(slots=True)
class Inputs:
    """The run's input files, in order, and each one's checked header."""

    paths: list[Path]
    headers: list[Header]

    def name(self, file_no: int) -> str:
        """The path of file ``file_no`` as given (for messages)."""
        return str(self.paths[file_no])


def open_inputs(config: RunConfig, options: RunOptions) -> Inputs:
    """Every input file, its header checked, before a single row is read (exit 2 if not)."""
    paths = expand_inputs(options.inputs or (config.input.path,))
    headers = []
    for file_no, path in enumerate(paths):
        with CsvFile(path, config.input, file_no=file_no) as f:
            headers.append(f.header)
    return Inputs(paths, headers)


class RowRecorder(Protocol):
    """Where the scan writes rows: the ledger, or nowhere (a dry run)."""

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None: ...

    def adopt_keys(self, run_id: str, pairs: Sequence[tuple[bytes, bytes]]) -> int: ...

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None: ...


class Discard:
    """The dry run's recorder: every row classified as a run would, then dropped."""

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        return None

    def adopt_keys(self, run_id: str, pairs: Sequence[tuple[bytes, bytes]]) -> int:
        return 0

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None:
        return None


class Scan:
    """Reads and validates the inputs; decides, per valid row, whether it is to be sent."""

    def __init__(self, config: RunConfig, options: RunOptions, inputs: Inputs, run_id: str, *,
                 lookup: ScanStore | None, recorder: RowRecorder, rejects: RejectsWriter,
                 control: Control | None = None) -> None:
        self._config = config
        self._options = options
        self._inputs = inputs
        self._lookup = None if options.force else lookup
        self._recorder = recorder
        self._run_id = run_id
        self._rejects = rejects
        self._control = control
        self._account = config.api.account_id()
        self._former = {k: v for k, v in config.api.former_names().items() if v}
        # A key is a row's identity in the ledger: needed to look earlier rows up or to
        # record the row; a dry run with no ledger to consult needs none.
        self._records = not isinstance(recorder, Discard)
        self._keyed = self._lookup is not None or self._records
        self.validator = Validator(config.input, config.validation,
                                   accounts=config.api.accounts or ())
        self.counts = ScanCounts()
        self.completed = False  # every input read to its end (or to the --limit cut)
        self.file_no = 0  # the file being read
        self.last_line: int | None = None  # the last line of it recorded in the ledger

    def run(self) -> ScanCounts:
        """Read every input; the files are recorded (path, header) before a row is read,
        so a scan that stops (a full disk, a signal, an input error) still names them."""
        if self._lookup is not None:
            self._warn_of_unnamed_accounts(self._lookup)
        for file_no, path in enumerate(self._inputs.paths):
            self.validator.name_file(file_no, str(path))
            self._recorder.add_file(self._run_id, file_no, str(path),
                                    self._inputs.headers[file_no].names)
        for file_no, path in enumerate(self._inputs.paths):
            self.file_no, self.last_line = file_no, None
            if not self._scan_file(file_no, path):
                if self.counts.truncated_at is not None:
                    self._count_later_files(file_no + 1)
                    self.completed = True
                break
        else:
            self.completed = True
        self.counts.blank += self.validator.blank_rows
        return self.counts

    def header_names(self, file_no: int) -> list[str]:
        return list(self._inputs.headers[file_no].names)

    def stopped(self) -> ScanStopped | None:
        """Where reading stopped, if the scan did not complete: the file, its last line
        recorded, and every file whose rest was not read (run info ``scan_stopped``)."""
        if self.completed:
            return None
        paths = [str(p) for p in self._inputs.paths]
        return ScanStopped(paths[self.file_no], self.last_line, tuple(paths[self.file_no:]))

    def _count_later_files(self, start: int) -> None:
        """The files after the --limit cut: counted as unread, record by record."""
        for file_no, path in enumerate(self._inputs.paths[start:], start):
            with CsvFile(path, self._config.input, file_no=file_no) as f:
                unread = self.counts.unread
                self._count_unread(f.batches())
                self.counts.files.append(FileCounts(
                    str(path), records=f.records, blank=f.blank_lines,
                    beyond_limit=self.counts.unread - unread))

    def _count_unread(self, batches: Iterator[RawBatch]) -> None:
        """Count the records --limit left unread (not validated, not in the ledger)."""
        if not self.counts.unread_exact:
            return
        try:
            for raw in batches:
                self.counts.unread += len(raw.rows)
        except PipelineError as exc:  # e.g. undecodable bytes further on: a lower bound
            log.warning("rows left unread by --limit not all counted: %s", exc)
            self.counts.unread_exact = False

    def _scan_file(self, file_no: int, path: Path) -> bool:
        with CsvFile(path, self._config.input, file_no=file_no) as f:
            complete = True
            before = self._snapshot()
            blank_rows, unread = self.validator.blank_rows, self.counts.unread
            batches = f.batches()
            for raw in batches:
                if self._control is not None and self._control.stopped:
                    return False
                batch = self.validator.check(raw, f.header)
                complete = self._take(batch, str(path))
                if not complete:
                    break
            blank = f.blank_lines  # the lines read: those counted unread are not skipped
            if self.counts.truncated_at is not None:
                self._count_unread(batches)  # reads (so checks) the rest of the file too
            f.check_structure()
            self.counts.blank += blank
            self._file_counts(str(path), f, before, self.validator.blank_rows - blank_rows,
                              self.counts.unread - unread)
            self._recorder.add_file(self._run_id, file_no, str(path), f.header.names,
                                    sha256=f.sha256, size=f.size)
        return complete

    def _snapshot(self) -> tuple[int, int, int]:
        c = self.counts
        return c.to_send, c.rejected, c.duplicates + c.already_sent + c.held

    def _file_counts(self, path: str, f: CsvFile, before: tuple[int, int, int],
                     blank_rows: int, beyond: int) -> None:
        after = self._snapshot()
        self.counts.files.append(FileCounts(
            path, records=f.records, to_send=after[0] - before[0],
            rejected=after[1] - before[1], skipped=after[2] - before[2],
            blank=f.blank_lines + blank_rows, beyond_limit=beyond))

    def _take(self, batch: CheckedBatch, name: str) -> bool:
        """Classify and record one batch; False once --limit rows are to be sent.

        Rows after the --limit cut are not read: they reach neither rejects.csv nor the
        problem table nor the ledger (the CLI says how many were left unread).
        """
        complete = self._classify_batch(batch, name)
        if not complete:
            batch = head(batch, len(batch) - self.counts.unread)
        self._rejects.write(batch, name)
        self.counts.problems.add(batch)
        return complete

    def _classify_batch(self, batch: CheckedBatch, name: str) -> bool:
        """Every row's status (and, when recorded, its ledger row) up to the --limit cut."""
        key_of: dict[int, bytes] = {}
        earlier: dict[bytes, Earlier] = {}
        if self._keyed:
            key_of = {i: row_key(batch.account(i, self._account), batch.task_ids[i],
                                 batch.notes[i])
                      for i in batch.sendable()}
            if self._lookup is not None:
                earlier = self._lookup.earlier(self._run_id, list(key_of.values()))
                if batch.as_written:
                    self._earlier_as_written(batch, key_of, earlier)
                if self._former:
                    self._earlier_former(batch, key_of, earlier)
        limit = self._options.limit
        room = None if limit is None else limit - self.counts.to_send
        statuses: list[Status] = []
        for i in range(len(batch)):
            found = earlier.get(key_of[i]) if earlier and i in key_of else None
            status = self._status(batch, i, found)
            if status == "pending" and room is not None:
                if room <= 0:
                    self.counts.truncated_at = (name, batch.lines[i])
                    self.counts.unread += len(batch) - i
                    break
                room -= 1
            statuses.append(status)
        self._count(statuses)
        if self._records:
            self._recorder.add_rows(self._run_id, [
                self._row(batch, i, status, key_of.get(i), earlier)
                for i, status in enumerate(statuses)])
        if statuses:
            self.last_line = batch.lines[len(statuses) - 1]
        return self.counts.truncated_at is None

    def _warn_of_unnamed_accounts(self, lookup: ScanStore) -> None:
        """A warning per account label the ledger holds delivered notes under that this
        config neither names nor lists as a former name nor as another config's
        (``state.other_accounts``): a clinic renamed (or moved from api.account to
        api.accounts) would have every such note sent again."""
        api = self._config.api
        known = set(api.known_names()) | set(self._config.state.other_accounts)
        for label, count in sorted(lookup.sent_accounts(known).items()):
            where = ("api.accounts.<name>.formerly" if api.multi else "api.formerly")
            log.warning("the ledger holds %d sent notes under account %r, which this config "
                        "does not name: if that clinic is now named otherwise, add "
                        "formerly: [%r] to %s, or its notes are sent again (if another "
                        "config sends them through this state, list it in "
                        "state.other_accounts)", count, label, label, where)

    def _earlier_former(self, batch: CheckedBatch, key_of: dict[int, bytes],
                        earlier: dict[bytes, Earlier]) -> None:
        """Rows of an account with former names (``formerly``): a row is already sent if
        its key under any of them was delivered (or is in doubt, when its own is unknown)."""
        assert self._lookup is not None
        former = self._former
        alternatives: dict[bytes, int] = {}
        for i, key in key_of.items():
            names = former.get(batch.account(i, self._account), ())
            found = earlier.get(key)
            if not names or (found is not None and found.delivered):
                continue
            forms = [(batch.task_ids[i], batch.notes[i], True)]
            if i in batch.as_written:
                forms.append((*batch.as_written[i], False))
            for name in names:
                for task, note, nfc in forms:
                    alternatives[row_key(name, task, note, nfc=nfc)] = i
        if not alternatives:
            return
        found_old = self._lookup.earlier(self._run_id, list(alternatives))
        for old_key, candidate in found_old.items():
            key = key_of[alternatives[old_key]]
            if rules.rank(candidate) > rules.rank(earlier.get(key)):
                earlier[key] = candidate
        # Notes no row delivered under any name, that rows under a former name left unsent
        # or in doubt: those rows take this run's key, so they follow its send (or its
        # hold), the outcome events this config reads settle them, status counts each
        # note once, and no old redrive.csv offers it. Rows that delivered keep theirs.
        adopt = [(old_key, key_of[alternatives[old_key]])
                 for old_key, candidate in found_old.items()
                 if not candidate.delivered
                 and rules.rank(earlier.get(key_of[alternatives[old_key]])) <= 2]
        if adopt and self._records:
            adopted = self._recorder.adopt_keys(self._run_id, adopt)
            if adopted:
                log.info("%d rows under a former account name, not delivered, now have "
                         "this account's key", adopted)

    def _earlier_as_written(self, batch: CheckedBatch, key_of: dict[int, bytes],
                            earlier: dict[bytes, Earlier]) -> None:
        """Rows NFC changed: also look up the key a version before NFC gave them, so a note
        it sent is not sent again in its other form."""
        assert self._lookup is not None
        old = {i: row_key(batch.account(i, self._account), task, note, nfc=False)
               for i, (task, note) in batch.as_written.items() if i in key_of}
        found = self._lookup.earlier(self._run_id, list(old.values()))
        for i, key in old.items():
            if key in found and key_of[i] not in earlier:
                earlier[key_of[i]] = found[key]

    def _status(self, batch: CheckedBatch, i: int, found: Earlier | None) -> Status:
        """Row ``i``'s status in the ledger; ``found``: an earlier row with its key."""
        if i in batch.problems:
            return "rejected"
        if i in batch.duplicate_of:
            return "duplicate"
        if found is not None and found.delivered:
            return "already_sent"
        if (found is not None and found.maybe_delivered
                and self._config.submit.on_ambiguous == "hold"):
            return "held"
        return "pending"

    def _row(self, batch: CheckedBatch, i: int, status: Status, key: bytes | None,
             earlier: dict[bytes, Earlier]) -> NewRow:
        """Row ``i`` as the ledger records it: its status, why, and the earlier row it
        refers to (already sent, or held while that one's outcome is unknown)."""
        error: str | None = None
        ref_id: int | None = None
        found = earlier.get(key) if key is not None else None
        if status == "rejected":
            error = "; ".join(f"{p.code}: {p.message}" for p in batch.problems[i])
        elif status == "duplicate":
            first_file, first_line = batch.duplicate_of[i]
            where = "" if first_file == batch.file_no else f" of {self._inputs.name(first_file)}"
            error = f"duplicate of line {first_line}{where}"
        elif status == "already_sent" and found is not None:
            job = f" as job {found.job_id}" if found.job_id else ""
            error, ref_id = f"already sent in run {found.run_id}{job}", found.row_id
        elif status == "held" and found is not None:
            error = (f"an earlier attempt (run {found.run_id}) may have reached Cobalt; "
                     "held until its outcome is known")
            ref_id = found.row_id
        return NewRow(batch.file_no, batch.lines[i], batch.task_ids[i][:200],
                      None if status == "rejected" else key, status, error, ref_id,
                      batch.passthrough[i], account=batch.accounts[i] if batch.accounts else None)

    def _count(self, statuses: list[Status]) -> None:
        c = self.counts
        found = Counter(statuses)
        c.rows += len(statuses)
        c.to_send += found["pending"]
        c.rejected += found["rejected"]
        c.duplicates += found["duplicate"]
        c.already_sent += found["already_sent"]
        c.held += found["held"]


def pending_jobs(config: RunConfig, inputs: Inputs, reader: SendStore, run_id: str,
                 read_size: int = 256) -> Iterator[list[Job]]:
    """Pending rows of the run, with their notes read again from the input files.

    A row whose note no longer hashes to its ledger key (the file changed
    since the scan) becomes a Job with ``skip`` set: recorded, not sent.
    Reads ``read_size`` records at a time: this runs on the event loop while
    requests are in flight, so each step must be short (~2 ms).
    """
    account = config.api.account_id()
    pending = reader.rows_to_send(run_id)
    head = next(pending, None)
    validator = Validator(config.input, config.validation, accounts=config.api.accounts or ())
    out: list[Job] = []
    for file_no, path in enumerate(inputs.paths):
        if head is None:
            break
        with CsvFile(path, config.input, file_no=file_no) as f:
            for raw in f.batches(read_size):
                if head is None or head[1] > file_no:
                    break
                batch = validator.check(raw, f.header)
                for i in batch.sendable():
                    if head is None or (head[1], head[2]) != (file_no, batch.lines[i]):
                        continue
                    row_id, _, _, task_id, key = head
                    note = batch.notes[i]
                    row_account = batch.account(i, account)
                    same = row_key(row_account, batch.task_ids[i], note) == key
                    out.append(Job(row_id, task_id, note, account=row_account) if same else Job(
                        row_id, task_id, "", skip="the input file changed since it was read",
                        account=row_account))
                    head = next(pending, None)
                if out:
                    yield out
                    out = []
    while head is not None:
        out.append(Job(head[0], head[3], "", skip="row not found when the input was read again"))
        head = next(pending, None)
    if out:
        yield out


def head(batch: CheckedBatch, n: int) -> CheckedBatch:
    """The first ``n`` rows of ``batch`` (problems and duplicates of those rows only)."""
    return CheckedBatch(
        batch.file_no, batch.lines[:n], batch.task_ids[:n], batch.notes[:n],
        batch.passthrough[:n], batch.cells[:n],
        {i: p for i, p in batch.problems.items() if i < n},
        {i: d for i, d in batch.duplicate_of.items() if i < n},
        raw={i: r for i, r in batch.raw.items() if i < n}, accounts=batch.accounts[:n])

