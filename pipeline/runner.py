"""``tasknotes run`` and ``validate``: the stages of docs/architecture.md, in order, for one run.

    1. scan      read and validate every input file; every row goes into the
                 ledger (pending / rejected / duplicate / already_sent / held)
                 and rejected rows into rejects.csv, before anything is sent
    2. send      read the files again and send the pending rows (the ledger
                 holds no note text, so the notes come from the files, each one
                 checked against its ledger key: a file changed in between is
                 caught, not sent)
    3. wait      sandbox only: until every accepted row has its outcome
    4. report    reconcile the run and write its report

Signals: the first SIGINT/SIGTERM stops new requests and lets in-flight ones
finish (submit.drain_timeout_s), then the report is written and the exit code
is 3; a second one exits at once (the ledger is consistent at every commit).

A full disk under the ledger (StorageFull) during the scan or the send is a
stop too: nothing more is sent, rows not sent stay ``pending``, the run record
and the report are written if there is room for them, and the exit code is 3.

Every input file is recorded in the ledger before its first row is read. A scan
that stops (a full disk, a signal, an input error) records where (run info
``scan_stopped``): the report says which files' rest was not read, and the run
stays open (``tasknotes status``: ``not_read``) until a later run reads them.
When a run ends it also rewrites the reports of earlier runs holding notes it
sent, so no redrive.csv goes on offering them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel
from tqdm import tqdm

from pipeline import logs
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError, StateError, StorageFull
from pipeline.rejects import RejectsWriter
from pipeline.retry import Control
from pipeline.source import CsvFile, Header, RawBatch, expand_inputs
from pipeline.state import Earlier, Ledger, NewRow, RunInfoChanges, Status, row_key
from pipeline.submit import Job, SubmitStats, Submitter
from pipeline.validate import CheckedBatch, ProblemTally, Validator

if TYPE_CHECKING:
    from pipeline.reconcile import RunResult
    from pipeline.report import Written

# The stages that only a sending run needs (HTTP client, emulator and sink, pandas for the
# report) are imported where they are used: `tasknotes validate` starts in a fifth the time.

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

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "records": self.records, "to_send": self.to_send,
                "rejected": self.rejected, "skipped": self.skipped, "blank": self.blank,
                "beyond_limit": self.beyond_limit, "accounted": self.accounted}


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the CLI reports at the end of a run."""

    run_id: str
    scan: ScanCounts
    report: Written | None
    exit_code: int
    stop_reason: str | None = None
    rejects: Path | None = None


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique: UTC time to the second, plus 4 random hex digits."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


@dataclass(slots=True)
class _Inputs:
    paths: list[Path]
    headers: list[Header]

    def name(self, file_no: int) -> str:
        return str(self.paths[file_no])


def open_inputs(config: RunConfig, options: RunOptions) -> _Inputs:
    """Every input file, its header checked, before a single row is read (exit 2 if not)."""
    paths = expand_inputs(options.inputs or (config.input.path,))
    headers = []
    for file_no, path in enumerate(paths):
        with CsvFile(path, config.input, file_no=file_no) as f:
            headers.append(f.header)
    return _Inputs(paths, headers)


# -- 1. scan -------------------------------------------------------------------------------


class RowRecorder(Protocol):
    """Where the scan writes the rows and files it read: the ledger, or nowhere (a dry run)."""

    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None: ...

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None: ...


class _Discard:
    def add_rows(self, run_id: str, rows: Iterable[NewRow]) -> None:
        return None

    def add_file(self, run_id: str, file_no: int, path: str, header: Sequence[str], *,
                 sha256: str | None = None, size: int | None = None) -> None:
        return None


class _Scan:
    """Reads and validates the inputs; decides, per valid row, whether it is to be sent."""

    def __init__(self, config: RunConfig, options: RunOptions, inputs: _Inputs, run_id: str, *,
                 lookup: Ledger | None, recorder: RowRecorder, rejects: RejectsWriter,
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
        self.validator = Validator(config.input, config.validation)
        self.counts = ScanCounts()
        self.completed = False  # every input read to its end (or to the --limit cut)
        self.file_no = 0  # the file being read
        self.last_line: int | None = None  # the last line of it recorded in the ledger

    def run(self) -> ScanCounts:
        """Read every input; the files are recorded (path, header) before a row is read,
        so a scan that stops (a full disk, a signal, an input error) still names them."""
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

    def stopped(self) -> dict[str, Any] | None:
        """Where reading stopped, if the scan did not complete: the file, its last line
        recorded, and every file whose rest was not read (run info ``scan_stopped``)."""
        if self.completed:
            return None
        paths = [str(p) for p in self._inputs.paths]
        return {"path": paths[self.file_no], "after_line": self.last_line,
                "unread_files": paths[self.file_no:]}

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
        if self._lookup is None and isinstance(self._recorder, _Discard):
            complete = self._count_only(batch, name)
        else:
            complete = self._classify_batch(batch, name)
        if not complete:
            batch = _head(batch, len(batch) - self.counts.unread)
        self._rejects.write(batch, name)
        self.counts.problems.add(batch)
        return complete

    def _classify_batch(self, batch: CheckedBatch, name: str) -> bool:
        sendable = batch.sendable()
        keys = [row_key(self._account, batch.task_ids[i], batch.notes[i]) for i in sendable]
        earlier = self._lookup.earlier(self._run_id, keys) if self._lookup is not None else {}
        key_of = dict(zip(sendable, keys, strict=True))
        if batch.as_written and self._lookup is not None:
            self._earlier_as_written(batch, key_of, earlier)
        rows: list[NewRow] = []
        for i in range(len(batch)):
            row = self._classify(batch, i, key_of.get(i), earlier)
            if row.status == "pending" and self._limit_reached():
                self.counts.truncated_at = (name, batch.lines[i])
                self.counts.unread += len(batch) - i
                break
            rows.append(row)
            self._count(row.status)
        self._recorder.add_rows(self._run_id, rows)
        if rows:
            self.last_line = rows[-1].line
        return self.counts.truncated_at is None

    def _earlier_as_written(self, batch: CheckedBatch, key_of: dict[int, bytes],
                            earlier: dict[bytes, Earlier]) -> None:
        """Rows NFC changed: also look up the key a version before NFC gave them, so a note
        it sent is not sent again in its other form."""
        assert self._lookup is not None
        old = {i: row_key(self._account, task, note, nfc=False)
               for i, (task, note) in batch.as_written.items() if i in key_of}
        found = self._lookup.earlier(self._run_id, list(old.values()))
        for i, key in old.items():
            if key in found and key_of[i] not in earlier:
                earlier[key_of[i]] = found[key]

    def _count_only(self, batch: CheckedBatch, name: str) -> bool:
        """A dry run with no ledger to consult: the counts, without a key or row object per row."""
        c = self.counts
        sendable = batch.sendable()
        rejected = len(batch.problems)
        room = (self._options.limit - c.to_send) if self._options.limit is not None else None
        if room is not None and len(sendable) > room:
            cut = sendable[room]  # the first row beyond --limit: reading stops before it
            c.truncated_at = (name, batch.lines[cut])
            sendable = sendable[:room]
            c.unread += len(batch) - cut
            rejected = sum(1 for i in batch.problems if i < cut)
            c.duplicates += sum(1 for i in batch.duplicate_of if i < cut
                                and i not in batch.problems)
            c.rows += cut
        else:
            c.duplicates += len(batch.duplicate_of) - sum(
                1 for i in batch.duplicate_of if i in batch.problems)
            c.rows += len(batch)
        c.to_send += len(sendable)
        c.rejected += rejected
        return c.truncated_at is None

    def _limit_reached(self) -> bool:
        return self._options.limit is not None and self.counts.to_send >= self._options.limit

    def _classify(self, batch: CheckedBatch, i: int, key: bytes | None,
                  earlier: dict[bytes, Earlier]) -> NewRow:
        status, error, ref_id = self._decide(batch, i, key, earlier)
        return NewRow(batch.file_no, batch.lines[i], batch.task_ids[i][:200],
                      None if status == "rejected" else key, status, error, ref_id,
                      batch.passthrough[i])

    def _decide(self, batch: CheckedBatch, i: int, key: bytes | None,
                earlier: dict[bytes, Earlier]) -> tuple[Status, str | None, int | None]:
        """The row's status in the ledger, why, and the earlier row it refers to."""
        if i in batch.problems:
            return "rejected", "; ".join(f"{p.code}: {p.message}" for p in batch.problems[i]), None
        if i in batch.duplicate_of:
            first_file, first_line = batch.duplicate_of[i]
            where = "" if first_file == batch.file_no else f" of {self._inputs.name(first_file)}"
            return "duplicate", f"duplicate of line {first_line}{where}", None
        found = earlier.get(key) if key is not None else None
        if found is not None and found.delivered:
            job = f" as job {found.job_id}" if found.job_id else ""
            return "already_sent", f"already sent in run {found.run_id}{job}", found.row_id
        if (found is not None and found.maybe_delivered
                and self._config.submit.on_ambiguous == "hold"):
            return "held", (f"an earlier attempt (run {found.run_id}) may have reached Cobalt; "
                            "held until its outcome is known"), found.row_id
        return "pending", None, None

    def _count(self, status: str) -> None:
        c = self.counts
        c.rows += 1
        if status == "pending":
            c.to_send += 1
        elif status == "rejected":
            c.rejected += 1
        elif status == "duplicate":
            c.duplicates += 1
        elif status == "already_sent":
            c.already_sent += 1
        elif status == "held":
            c.held += 1


# -- 2. send -------------------------------------------------------------------------------


def pending_jobs(config: RunConfig, inputs: _Inputs, reader: Ledger, run_id: str,
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
    validator = Validator(config.input, config.validation)
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
                    same = row_key(account, batch.task_ids[i], note) == key
                    out.append(Job(row_id, task_id, note) if same else Job(
                        row_id, task_id, "", skip="the input file changed since it was read"))
                    head = next(pending, None)
                if out:
                    yield out
                    out = []
    while head is not None:
        out.append(Job(head[0], head[3], "", skip="row not found when the input was read again"))
        head = next(pending, None)
    if out:
        yield out


async def _stepwise(jobs: Iterator[list[Job]]) -> AsyncGenerator[list[Job], None]:
    """The jobs, one short read at a time, on the event loop.

    Not in a worker thread: on one core, a thread parsing CSV holds the GIL for
    up to the 5 ms switch interval at a time, which every request in flight
    waits out (measured: 20 ms requests took 32 ms). Short steps cost less.
    """
    for batch in jobs:
        yield batch
        await anyio.lowlevel.checkpoint()


async def send_pending(
    config: RunConfig, inputs: _Inputs, ledger: Ledger, run_id: str, *, to_send: int,
    control: Control, progress: bool, base_url: str | None = None,
) -> SubmitStats:
    """Stage 2: send the run's pending rows (every change recorded in the ledger)."""
    from pipeline.client import CobaltClient  # noqa: PLC0415 - see the imports above

    api = config.api if base_url is None else config.api.model_copy(update={"base_url": base_url})
    reader = Ledger(ledger.path, readonly=True)
    bar = tqdm(total=to_send, unit="note", file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()), desc="sending")
    try:
        webhook_secrets = [s.decode() for s in config.webhooks.all_secrets()]
        async with CobaltClient(api, max_connections=config.submit.concurrency,
                                more_secrets=webhook_secrets) as client:
            submitter = Submitter(client, ledger, config.submit, control=control,
                                  progress=bar)
            jobs = pending_jobs(config, inputs, reader, run_id)
            async with contextlib.aclosing(_stepwise(jobs)) as batches:
                return await submitter.run(batches)
    finally:
        bar.close()
        reader.close()


# -- the whole run -------------------------------------------------------------------------


async def _watch_signals(control: Control) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for signum in received:
            if control.stopped and control.reason and control.reason.startswith("interrupted"):
                log.error("second %s: exiting now; the ledger is consistent",
                          signal.Signals(signum).name)
                os._exit(3)
            control.stop(f"interrupted by {signal.Signals(signum).name}")


class Run:
    """One ``tasknotes run`` (or ``validate``): owns the ledger and the run record."""

    def __init__(self, config: RunConfig, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.control = Control()
        self.run_id = new_run_id()
        logs.set_run_id(self.run_id)  # on every JSON log line from here on
        self.timings: dict[str, float] = {}
        self.scan_stopped: RunInfoChanges = {}

    def execute(self) -> RunOutcome:
        preflight(self.config)  # a missing secret stops us before the ledger is touched
        inputs = open_inputs(self.config, self.options)
        if self.options.dry_run:
            return self._dry_run(inputs)
        try:
            return anyio.run(self._run, inputs,
                             backend_options=self.config.submit.backend_options())
        except BaseExceptionGroup as group:  # the API raises the package's own errors
            inner = _pipeline_error(group)
            if inner is None:
                raise
            raise inner from None

    def _dry_run(self, inputs: _Inputs) -> RunOutcome:
        """Scan only: earlier runs are read from the ledger (if there is one), nothing written."""
        ledger = Ledger.existing(self.config.state.ledger)
        rejects = RejectsWriter(self._report_dir() / "rejects.csv", self.config.input,
                                inputs.headers)
        try:
            scan = _Scan(self.config, self.options, inputs, self.run_id, lookup=ledger,
                         recorder=_Discard(), rejects=rejects)
            counts = scan.run()
        finally:
            rejects.close()
            if ledger is not None:
                ledger.close()
        return RunOutcome(self.run_id, counts, None, 1 if counts.rejected else 0,
                          rejects=rejects.path if rejects.rows else None)

    def _report_dir(self) -> Path:
        return self.config.report.dir / self.run_id

    async def _run(self, inputs: _Inputs) -> RunOutcome:
        ledger = Ledger(self.config.state.ledger, synchronous=self.config.state.synchronous)
        try:
            ledger.lock()
            recovered = ledger.recover()
            if recovered:
                log.warning("%d rows were in flight when an earlier run stopped: now ambiguous",
                            recovered)
            # What landed (or failed) since the last run decides what may be sent again.
            from pipeline.reconcile import Reconciler  # noqa: PLC0415 - see the imports above

            Reconciler.of(ledger, self.config).refresh(self.config.api.account_id())
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, self.control)
                outcome = await self._stages(ledger, inputs)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            ledger.close()

    async def _stages(self, ledger: Ledger, inputs: _Inputs) -> RunOutcome:
        ledger.start_run(self.run_id, self.config.api.account_id(), self.config.fingerprint(),
                         self._info())
        rejects = RejectsWriter(self._report_dir() / "rejects.csv", self.config.input,
                                inputs.headers)
        scan = _Scan(self.config, self.options, inputs, self.run_id, lookup=ledger,
                     recorder=ledger, rejects=rejects, control=self.control)
        try:
            with self._timer("scan"):
                counts = await anyio.to_thread.run_sync(scan.run)
        except StorageFull as exc:  # the rows recorded so far stay pending; none was sent
            self.control.storage_full = exc
            self.control.stop(str(exc))
            counts = scan.counts
        except PipelineError as exc:  # e.g. a file's quoting is broken: nothing is sent
            # Nothing was sent and the rows came from an input we refuse: forget them, so
            # no count offers them as unsent notes; the process exits 2 and says so.
            ledger.refuse_run(self.run_id, {"stop_reason": f"input refused: {exc}",
                                            "exit_code": exc.exit_code,
                                            **self._scan_stopped(ledger, scan)})
            raise
        finally:
            rejects.close()
        self.scan_stopped = self._scan_stopped(ledger, scan)
        _log_scan(counts)
        stats = await self._send(ledger, inputs, counts)
        return self._finish(ledger, counts, stats, rejects)

    def _scan_stopped(self, ledger: Ledger, scan: _Scan) -> RunInfoChanges:
        """Run info for a scan that stopped early (else nothing): where, and which files
        were not read to the end. The file it stopped in is fingerprinted whole, so
        its report can read its rows back (redrive.csv) while it stays unchanged."""
        stopped = scan.stopped()
        if stopped is None:
            return {}
        path = Path(stopped["path"])
        try:
            with path.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            with contextlib.suppress(StorageFull):
                ledger.add_file(self.run_id, scan.file_no, str(path),
                                scan.header_names(scan.file_no), sha256=digest,
                                size=path.stat().st_size)
        except OSError as exc:
            log.warning("%s: not fingerprinted (%s)", path, exc.strerror or exc)
        where = (f"after line {stopped['after_line']:,}" if stopped["after_line"]
                 else "before its first row")
        log.info("the input was not read to the end: reading %s stopped %s; the rest "
                    "was not read", path, where)
        return {"scan_stopped": stopped}

    async def _send(self, ledger: Ledger, inputs: _Inputs, counts: ScanCounts
                    ) -> SubmitStats | None:
        if not counts.to_send or self.control.stopped:
            return None
        from pipeline.sandbox import sandboxed  # noqa: PLC0415 - see the imports above

        async with sandboxed(self.config, ledger, self.run_id) as sandbox:
            with self._timer("send"):
                stats = await send_pending(
                    self.config, inputs, ledger, self.run_id, to_send=counts.to_send,
                    control=self.control, progress=self.options.progress,
                    base_url=sandbox.base_url if sandbox else None,
                )
            if sandbox is not None and not self.control.stopped:
                with self._timer("wait"):
                    await sandbox.wait_for_outcomes(self.control)
        return stats

    @contextlib.contextmanager
    def _timer(self, stage: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[stage] = round(time.monotonic() - start, 3)

    def _info(self) -> RunInfoChanges:
        return {"argv": list(self.options.argv), "limit": self.options.limit,
                "force": self.options.force, "passthrough": list(self.config.input.passthrough)}

    def _finish(self, ledger: Ledger, counts: ScanCounts, stats: SubmitStats | None,
                rejects: RejectsWriter) -> RunOutcome:
        reason = self.control.reason
        if self.control.storage_full is not None:
            reason = self._full_disk_reason(ledger, self.control.storage_full,
                                            scanning=stats is None)
        state = "aborted" if reason else "finished"
        throughput = (round(stats.requests / stats.seconds, 1)
                      if stats is not None and stats.seconds > 0 else None)
        info: RunInfoChanges = {
            "stop_reason": reason, "timings_s": self.timings, "throughput_per_s": throughput,
            "send": ({"requests": stats.requests, "retries": stats.retries,
                      "ledger_commits": stats.commits} if stats is not None else {}),
            "problems": dict(counts.problems.counts), "blank_rows": counts.blank,
            "input_records": [f.as_dict() for f in counts.files],
            "truncated_at": list(counts.truncated_at) if counts.truncated_at else None,
            **self.scan_stopped,
        }
        from pipeline.report import write_report  # noqa: PLC0415 - see the imports above

        recorded = True
        try:
            ledger.finish_run(self.run_id, state, info)
        except StorageFull as exc:
            log.warning("run %s left 'running' in the ledger: %s", self.run_id, exc)
            recorded = False
        written: Written | None = None
        try:
            written = write_report(self._result(ledger, state, info, refresh=recorded),
                                   self.config.report, input_settings=self.config.input,
                                   process_exit_code=3 if reason else None)
        except StorageFull as exc:  # names the report file; the ledger has the truth
            log.warning("report not written: %s", exc)
            reason = reason or str(exc)
        code = 3 if reason or written is None else written.exit_code
        if recorded:
            with contextlib.suppress(StorageFull):  # summary.json's exit code, on rewrites
                ledger.update_run_info(self.run_id, {"exit_code": code})
                if written is not None:
                    ledger.report_written(self.run_id, redrive_digest=written.redrive_digest)
            if written is not None:
                self._rewrite_followed(ledger)
        return RunOutcome(self.run_id, counts, written, code, reason,
                          rejects.path if rejects.rows else None)

    def _rewrite_followed(self, ledger: Ledger) -> None:
        """Rewrite the reports of earlier runs with notes this run sent: their rows now
        follow this run's send, so their redrive.csv must stop offering them (and their
        counts change); and of runs whose scan stopped, whose input this run may have
        read. Runs whose report is final are left alone; a full disk stops the rewrites
        (``tasknotes reconcile`` does them later)."""
        from pipeline.reconcile import Reconciler  # noqa: PLC0415 - see the imports above
        from pipeline.report import write_report  # noqa: PLC0415

        stale = ledger.reports_to_rewrite()
        # and runs whose scan stopped: this run may have read the rest of their input
        wanted = {*ledger.runs_following(self.run_id),
                  *(r for r in stale if ledger.run(r).info.scan_stopped)}
        reconciler = Reconciler.of(ledger, self.config)
        for run_id in stale:
            if run_id not in wanted or run_id == self.run_id:
                continue
            try:
                written = write_report(reconciler.run(run_id), self.config.report,
                                       input_settings=self.config.input)
                ledger.report_written(run_id, redrive_digest=written.redrive_digest)
            except (StorageFull, StateError) as exc:
                log.warning("report of run %s not rewritten: %s; tasknotes reconcile "
                            "rewrites it", run_id, exc)
                return
            log.info("report of run %s rewritten: %s", run_id, written.directory)

    def _full_disk_reason(self, ledger: Ledger, exc: StorageFull, *, scanning: bool) -> str:
        """The full disk, and (read back from the ledger) what was sent before it."""
        if scanning:
            return f"{exc}; nothing was sent (the disk filled before sending began)"
        by_status = ledger.status_counts(self.run_id)
        sent = sum(by_status.get(s, 0) for s in ("accepted", "api_rejected", "ambiguous",
                                                 "sending"))
        return (f"{exc}; {sent:,} rows were sent before it, "
                f"{by_status.get('pending', 0):,} are left pending for the next run")

    def _result(self, ledger: Ledger, state: str, info: RunInfoChanges, *,
                refresh: bool) -> RunResult:
        """The run reconciled; with no room to write, the ledger as it stands, read only."""
        from pipeline.reconcile import Reconciler, RunResult  # noqa: PLC0415

        if refresh:
            with contextlib.suppress(StorageFull):
                return Reconciler.of(ledger, self.config).run(self.run_id)
        record = ledger.run(self.run_id)
        record = replace(record, state=state, info=record.info.merged(info))
        count, orphans = ledger.orphans()
        return RunResult(record, ledger.files(self.run_id), count, orphans,
                         ledger.event_tally(), ledger)


def preflight(config: RunConfig) -> None:
    """What ``run`` needs before it sends, checked by ``run``, ``run --dry-run`` and
    ``validate`` alike: the three API credentials set (ConfigError naming the key), and in
    a sandbox the webhook secret the emulator signs with. A ``${VAR}`` that does not
    resolve is caught earlier, by ``load_config(..., needs=("api",))``, naming the variable.
    """
    config.api.credentials()
    if config.sandbox.enabled and not config.webhooks.all_secrets():
        raise ConfigError("webhooks.secret: a sandbox run needs a webhook secret")


def _head(batch: CheckedBatch, n: int) -> CheckedBatch:
    """The first ``n`` rows of ``batch`` (problems and duplicates of those rows only)."""
    return CheckedBatch(
        batch.file_no, batch.lines[:n], batch.task_ids[:n], batch.notes[:n],
        batch.passthrough[:n], batch.cells[:n],
        {i: p for i, p in batch.problems.items() if i < n},
        {i: d for i, d in batch.duplicate_of.items() if i < n},
        raw={i: r for i, r in batch.raw.items() if i < n})


def _pipeline_error(group: BaseExceptionGroup[Any]) -> PipelineError | None:
    """The first PipelineError inside task-group wrappers (e.g. InputError from the scan)."""
    for inner in group.exceptions:
        if isinstance(inner, PipelineError):
            return inner
        if isinstance(inner, BaseExceptionGroup):
            found = _pipeline_error(inner)
            if found is not None:
                return found
    return None


def _log_scan(c: ScanCounts) -> None:
    log.info("%s: %d to send, %d rejected, %s, %d already sent, %d held",
             _n(c.rows, "row"), c.to_send, c.rejected, _n(c.duplicates, "duplicate"),
             c.already_sent, c.held)


def _n(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless the count is one: "1 duplicate", "2 rows"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def validate_only(config: RunConfig, inputs: Sequence[str]) -> RunOutcome:
    """``tasknotes validate``: the scan alone; nothing sent, nothing written to the ledger."""
    return Run(config, RunOptions(inputs=tuple(inputs), dry_run=True)).execute()

