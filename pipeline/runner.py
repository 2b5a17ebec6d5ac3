"""``tasknotes run`` and ``validate``: the stages of docs/architecture.md, in order, for one run.

    1. scan      (plan.py) read and validate every input file; every row goes
                 into the ledger (pending / rejected / duplicate / already_sent /
                 held) and rejected rows into rejects.csv, before anything is
                 sent; a dry run takes the same scan and records nothing
    2. send      read the files again and send the pending rows (the ledger
                 holds no note text, so the notes come from the files, each one
                 checked against its ledger key: a file changed in between is
                 caught, not sent)
    3. wait      sandbox only: until every accepted row has its outcome
    4. report    reconcile the run and write its report

Signals: the first SIGINT/SIGTERM stops new requests and lets in-flight ones
finish (submit.drain_timeout_s), then the report is written and the exit code
is 3; a second one exits at once (the ledger is consistent at every commit).
Only a run in the main thread handles signals (Python delivers them there, and
only there can a handler be set); the handlers it replaced are put back when it
ends. A run in any other thread (``pipeline.run`` from a worker, ``pipeline.aio``)
installs none.

A full disk under the ledger (StorageFull) during the scan or the send is a
stop too: nothing more is sent, rows not sent stay ``pending``, the run record
and the report are written if there is room for them, and the exit code is 3.

Every input file is recorded in the ledger before its first row is read. A scan
that stops (a full disk, a signal, an input error) records where (run info
``scan_stopped``): the report says which files' rest was not read, and the run
stays open (``tasknotes status``: ``not_read``) until a later run reads them.
When a run ends it also rewrites the reports of earlier runs holding notes it
sent, so no redrive.csv goes on offering them.

The front door is ``jobs.run``; exit codes come from exits.py. About 550 lines:
the stop paths (signal, full disk, refused input) each need their say in the
finish, and split across modules they would be harder to follow than here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
from tqdm import tqdm

from pipeline import exits, logs
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError, StateError, StorageFull
from pipeline.plan import (
    Discard,
    Inputs,
    RunOptions,
    Scan,
    ScanCounts,
    open_inputs,
    pending_jobs,
)
from pipeline.rejects import RejectsWriter
from pipeline.retry import Control
from pipeline.state import RunInfoChanges, RunState, SendStore, StateStore
from pipeline.state import store as state_store
from pipeline.submit import Job, SubmitStats, Submitter

if TYPE_CHECKING:
    from pipeline.reconciliation import RunResult
    from pipeline.report import Written

# The stages that only a sending run needs (HTTP client, emulator and sink, pandas for the
# report) are imported where they are used: `tasknotes validate` starts in a fifth the time.

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What ``Run.execute`` returns (``jobs.run`` turns it into a ``jobs.RunResult``)."""

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


# -- 2. send (1. scan is plan.py) ---------------------------------------------------------


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
    config: RunConfig, inputs: Inputs, ledger: SendStore, run_id: str, *, to_send: int,
    control: Control, progress: bool, base_url: str | None = None,
) -> SubmitStats:
    """Stage 2: send the run's pending rows (every change recorded in the ledger)."""
    from pipeline.client import CobaltClient  # noqa: PLC0415 - httpx: not for dry runs

    api = config.api if base_url is None else config.api.model_copy(update={"base_url": base_url})
    reader = ledger.reader()
    # No bar at all unless one is drawn: even a disabled tqdm starts its process-wide
    # "tqdm_monitor" thread, which would outlive the run in an API host.
    bar = (tqdm(total=to_send, unit="note", file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True, desc="sending")
           if progress and sys.stderr.isatty() else None)
    try:
        webhook_secrets = [s.decode() for s in config.webhooks.all_secrets()]
        async with contextlib.AsyncExitStack() as stack:
            # api.accounts: a client (a token, a pool) per account; the Submitter alone
            # bounds each account's requests in flight (a pool wait would count as sending)
            clients = {
                name: await stack.enter_async_context(CobaltClient(
                    api, max_connections=config.submit.concurrency,
                    more_secrets=webhook_secrets, account=name))
                for name in api.accounts or ()}
            if clients:
                client = next(iter(clients.values()))
            else:
                client = await stack.enter_async_context(CobaltClient(
                    api, max_connections=config.submit.concurrency,
                    more_secrets=webhook_secrets))
            submitter = Submitter(client, ledger, config.submit, control=control,
                                  progress=bar, accounts=api.accounts, clients=clients)
            jobs = pending_jobs(config, inputs, reader, run_id)
            async with contextlib.aclosing(_stepwise(jobs)) as batches:
                return await submitter.run(batches)
    finally:
        if bar is not None:
            bar.close()
        reader.close()


# -- the whole run -------------------------------------------------------------------------


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _host_handlers_kept() -> Iterator[None]:
    """Put back the SIGINT/SIGTERM handlers found on entry (a host's own, e.g. Airflow's
    SIGTERM handler): the event loop's signal receiver leaves the defaults behind."""
    saved = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: set from C, cannot be put back from Python
                signal.signal(signum, handler)


def handles_signals() -> bool:
    """Whether a run in this thread handles SIGINT/SIGTERM: only in the main thread."""
    return threading.current_thread() is threading.main_thread()


def _second_signal(signum: int) -> None:
    log.error("second %s: exiting now; the ledger is consistent", signal.Signals(signum).name)
    os._exit(exits.ABORTED)


async def _watch_signals(control: Control, early: list[int], *,
                         task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                         ) -> None:
    """The run's signal handling once its event loop runs. ``early``: the signals the
    run's first handler (``_early_signals``) caught before, acted on now, once this
    receiver is in place (so no signal falls between the two)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        task_status.started()
        for signum in early:
            control.stop(f"interrupted by {signal.Signals(signum).name}")
        async for signum in received:
            if control.stopped and control.reason and control.reason.startswith("interrupted"):
                _second_signal(signum)
            control.stop(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _early_signals() -> Iterator[list[int]]:
    """From the run's start (before the secrets are checked and the inputs opened) until
    its event loop's receiver replaces it: a handler that notes the first SIGINT/SIGTERM
    (the run then stops as soon as it can: exit code 3) and exits at a second one. Yields
    the signals noted. Main thread only."""
    caught: list[int] = []

    def note(signum: int, frame: object) -> None:
        if caught:
            _second_signal(signum)
        caught.append(signum)
        log.warning("%s received while the run starts: it will stop before sending",
                    signal.Signals(signum).name)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, note)
    yield caught


class Run:
    """One ``tasknotes run`` (or ``validate``): owns the ledger and the run record."""

    def __init__(self, config: RunConfig, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.control = Control()
        self.run_id = new_run_id()
        self.timings: dict[str, float] = {}
        self.scan_stopped: RunInfoChanges = {}
        self._early: list[int] = []  # signals caught before the event loop ran
        self._stop_lock = threading.Lock()
        self._stop_asked: str | None = None  # request_stop before the event loop ran
        # The run's event loop's non-blocking "call this soon" (asyncio's
        # call_soon_threadsafe, trio's run_sync_soon) while it runs.
        self._soon: Callable[..., object] | None = None

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop gracefully, as a first SIGINT/SIGTERM does (no new request;
        the report written; exit code 3 with ``reason`` as its stop_reason). Safe from
        any thread; a no-op once the run has ended. (``pipeline.aio`` on cancellation.)"""
        with self._stop_lock:  # never blocks: the caller may be an event loop itself
            self._stop_asked = self._stop_asked or reason
            if self._soon is not None:
                with contextlib.suppress(RuntimeError):  # the loop has just ended
                    self._soon(self.control.stop, reason)

    def execute(self) -> RunOutcome:
        """Run it: the RunOutcome, or the errors ``jobs.run`` documents. The run id is on
        every JSON log line of this context while it runs (and off again after)."""
        token = logs.set_run_id(self.run_id)
        try:
            with contextlib.ExitStack() as stack:
                if handles_signals() and not self.options.dry_run:
                    stack.enter_context(_host_handlers_kept())
                    self._early = stack.enter_context(_early_signals())
                return self._execute()
        finally:
            logs.reset_run_id(token)

    def _execute(self) -> RunOutcome:
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

    def _dry_run(self, inputs: Inputs) -> RunOutcome:
        """Scan only: earlier runs are read from the ledger (if there is one), nothing written."""
        ledger = state_store.existing_store(self.config)
        rejects = RejectsWriter(self._report_dir() / "rejects.csv", self.config.input,
                                inputs.headers)
        try:
            scan = Scan(self.config, self.options, inputs, self.run_id, lookup=ledger,
                         recorder=Discard(), rejects=rejects)
            counts = scan.run()
        finally:
            rejects.close()
            if ledger is not None:
                ledger.close()
        return RunOutcome(self.run_id, counts, None, exits.for_dry_run(counts.rejected),
                          rejects=rejects.path if rejects.rows else None)

    def _report_dir(self) -> Path:
        return self.config.report.dir / self.run_id

    async def _run(self, inputs: Inputs) -> RunOutcome:
        native = anyio.lowlevel.current_token().native_token
        with self._stop_lock:
            self._soon = (getattr(native, "call_soon_threadsafe", None)
                          or getattr(native, "run_sync_soon", None))
            if self._stop_asked is not None:
                self.control.stop(self._stop_asked)
        try:
            async with anyio.create_task_group() as tg:
                if handles_signals():
                    await tg.start(_watch_signals, self.control, self._early)
                outcome = await self._locked(inputs)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            with self._stop_lock:
                self._soon = None

    async def _locked(self, inputs: Inputs) -> RunOutcome:
        ledger = state_store.open_store(self.config)
        try:
            ledger.lock(holder=f"run {self.run_id}")
            recovered = ledger.recover()
            if recovered:
                log.warning("%d rows were in flight when an earlier run stopped: now ambiguous",
                            recovered)
            # What landed (or failed) since the last run decides what may be sent again.
            from pipeline.reconciliation import Reconciler  # noqa: PLC0415 - pandas: not to send

            Reconciler.of(ledger, self.config).refresh(self.config.api.account_id())
            return await self._stages(ledger, inputs)
        finally:
            ledger.close()

    async def _stages(self, ledger: StateStore, inputs: Inputs) -> RunOutcome:
        ledger.start_run(self.run_id, self.config.api.account_id(), self.config.fingerprint(),
                         self._info())
        rejects = RejectsWriter(self._report_dir() / "rejects.csv", self.config.input,
                                inputs.headers)
        scan = Scan(self.config, self.options, inputs, self.run_id, lookup=ledger,
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

    def _scan_stopped(self, ledger: StateStore, scan: Scan) -> RunInfoChanges:
        """Run info for a scan that stopped early (else nothing): where, and which files
        were not read to the end. The file it stopped in is fingerprinted whole, so
        its report can read its rows back (redrive.csv) while it stays unchanged."""
        stopped = scan.stopped()
        if stopped is None:
            return {}
        path = Path(stopped.path)
        try:
            with path.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            with contextlib.suppress(StorageFull):
                ledger.add_file(self.run_id, scan.file_no, str(path),
                                scan.header_names(scan.file_no), sha256=digest,
                                size=path.stat().st_size)
        except OSError as exc:
            log.warning("%s: not fingerprinted (%s)", path, exc.strerror or exc)
        where = (f"after line {stopped.after_line:,}" if stopped.after_line
                 else "before its first row")
        log.info("the input was not read to the end: reading %s stopped %s; the rest "
                    "was not read", path, where)
        return {"scan_stopped": stopped}

    async def _send(self, ledger: StateStore, inputs: Inputs, counts: ScanCounts
                    ) -> SubmitStats | None:
        if not counts.to_send or self.control.stopped:
            return None
        from pipeline.sandbox import sandboxed  # noqa: PLC0415 - uvicorn: sandbox only

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
        # Accounts stopped alone: the others ran to the end; the run still says so (exit 3),
        # and names them even when something else stopped it too.
        for reason in _account_stops(stats):
            self.control.stop(reason)
            if reason not in (self.control.reason or ""):
                self.control.reason = f"{self.control.reason}; {reason}"
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

    def _finish(self, ledger: StateStore, counts: ScanCounts, stats: SubmitStats | None,
                rejects: RejectsWriter) -> RunOutcome:
        reason = self.control.reason
        if self.control.storage_full is not None:
            reason = self._full_disk_reason(ledger, self.control.storage_full,
                                            scanning=stats is None)
        state: RunState = "aborted" if reason else "finished"
        throughput = (round(stats.requests / stats.seconds, 1)
                      if stats is not None and stats.seconds > 0 else None)
        info: RunInfoChanges = {
            "stop_reason": reason, "timings_s": self.timings, "throughput_per_s": throughput,
            "send": ({"requests": stats.requests, "retries": stats.retries,
                      "ledger_commits": stats.commits} if stats is not None else {}),
            "problems": dict(counts.problems.counts), "blank_rows": counts.blank,
            "input_records": tuple(f.as_record() for f in counts.files),
            "truncated_at": counts.truncated_at,
            **self.scan_stopped,
        }
        from pipeline.report import report_context, write_report  # noqa: PLC0415 - pandas

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
                                   process_exit_code=exits.ABORTED if reason else None)
        except StorageFull as exc:  # names the report file; the ledger has the truth
            log.warning("report not written: %s", exc)
            reason = reason or str(exc)
        code = exits.for_run(stopped=bool(reason),
                             report_code=None if written is None else written.exit_code)
        if recorded:
            with contextlib.suppress(StorageFull):  # summary.json's exit code, on rewrites
                ledger.update_run_info(self.run_id, {"exit_code": code})
                if written is not None:
                    ledger.report_written(
                        self.run_id, redrive_digest=written.redrive_digest,
                        context=report_context(self.config), stale_due=written.stale_due,
                        exit_code=written.exit_code)
            if written is not None:
                self._rewrite_followed(ledger)
        return RunOutcome(self.run_id, counts, written, code, reason,
                          rejects.path if rejects.rows else None)

    def _rewrite_followed(self, ledger: StateStore) -> None:
        """Rewrite the reports of earlier runs with notes this run sent: their rows now
        follow this run's send, so their redrive.csv must stop offering them (and their
        counts change); and of runs whose scan stopped, whose input this run may have
        read. Runs whose report is final are left alone; a full disk stops the rewrites
        (``tasknotes reconcile`` does them later)."""
        from pipeline.reconciliation import Reconciler  # noqa: PLC0415 - pandas: after sending
        from pipeline.report import report_context, rewrite_report  # noqa: PLC0415 - pandas

        stale = ledger.reports_to_rewrite(report_context(self.config), time.time())
        # and runs whose scan stopped: this run may have read the rest of their input
        wanted = {*ledger.runs_following(self.run_id),
                  *(r for r in stale if ledger.run(r).info.scan_stopped)}
        reconciler = Reconciler.of(ledger, self.config)
        for run_id in stale:
            if (run_id not in wanted or run_id == self.run_id
                    or self.config.another_configs(ledger.run(run_id).account)):
                continue
            try:
                written = rewrite_report(ledger, reconciler, run_id, self.config)
            except (StorageFull, StateError) as exc:
                log.warning("report of run %s not rewritten: %s; tasknotes reconcile "
                            "rewrites it", run_id, exc)
                return
            log.info("report of run %s rewritten: %s", run_id, written.directory)

    def _full_disk_reason(self, ledger: StateStore, exc: StorageFull, *, scanning: bool) -> str:
        """The full disk, and (read back from the ledger) what was sent before it."""
        if scanning:
            return f"{exc}; nothing was sent (the disk filled before sending began)"
        by_status = ledger.status_counts(self.run_id)
        sent = sum(by_status.get(s, 0) for s in ("accepted", "api_rejected", "ambiguous",
                                                 "sending"))
        return (f"{exc}; {sent:,} rows were sent before it, "
                f"{by_status.get('pending', 0):,} are left pending for the next run")

    def _result(self, ledger: StateStore, state: RunState, info: RunInfoChanges, *,
                refresh: bool) -> RunResult:
        """The run reconciled; with no room to write, the ledger as it stands, read only."""
        from pipeline.reconciliation import Reconciler, RunResult  # noqa: PLC0415 - pandas

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


def _account_stops(stats: SubmitStats) -> list[str]:
    """What stopped single accounts of api.accounts (SubmitStats ``refused`` and
    ``stopped``), one sentence each, naming the accounts and their config keys."""
    reasons = []
    if stats.refused:
        names = sorted(stats.refused)
        keys = ", ".join(f"api.accounts.{n}.access_token" for n in names)
        reasons.append(f"credentials refused by Cobalt for account{'s' * (len(names) > 1)} "
                       f"{', '.join(names)}; their unsent rows are send_failed; check {keys}")
    if stats.stopped:
        names = sorted(stats.stopped)
        reasons.append(f"account{'s' * (len(names) > 1)} {', '.join(names)}: too many rows "
                       "in a row did not go through; their unsent rows are send_failed; "
                       "submit.max_consecutive_failures")
    return reasons
