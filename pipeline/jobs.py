"""One front door per command: ``run``, ``validate``, ``reconcile``, ``poll``, ``status``,
``prune``, ``export_events``, ``serve_sink`` (``tasknotes sink``) and ``migrate_state``.

Each takes a config (a path to the YAML file, or a ``RunConfig`` already loaded) and the
command's options, does the work, and returns a frozen result holding what happened and
the exit code (decided by exits.py). These are the Python API (``import pipeline``
re-exports them; the README's "Use from Python") and what cli.py calls after parsing
the arguments: one front door for both. None of them prints or configures logging
(they log through the ``pipeline`` loggers); errors are the package's own exception tree
(errors.py), never SystemExit. They block the calling thread; from any thread but one
running an event loop (there: ``pipeline.aio``).

Over 400 lines: one short front door per command, kept in one module so the Python API
(pipeline/__init__.py) and the CLI have one place to call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, TypeAlias

import sniffio

from pipeline import exits, ops
from pipeline.config import MAX_RETENTION_DAYS, RunConfig, load_config
from pipeline.errors import ConfigError, PipelineError, StateError
from pipeline.open_items import LedgerStatus
from pipeline.plan import RunOptions, ScanCounts

if TYPE_CHECKING:
    from pipeline.polling import PollStats, Wanted
    from pipeline.reconciliation import Reconciler
    from pipeline.report import Written
    from pipeline.retention import PruneResult
    from pipeline.runner import Run
    from pipeline.state import StateStore
    from pipeline.state.pg_migrate import Copied

# The modules only one command needs (HTTP client, pandas for reports) are imported by
# that command's function: `tasknotes validate` starts in a fifth of the time.

log = logging.getLogger(__name__)

StatusResult = LedgerStatus  # ``status``'s result: what is open over every run

ConfigSource: TypeAlias = "RunConfig | str | os.PathLike[str]"
"""A config: the path of its YAML file (read by ``load``), or a ``RunConfig`` as loaded."""

Command = Literal["run", "validate", "poll", "reconcile", "status", "prune", "sink",
                  "export-events"]


def load(config: ConfigSource, command: Command) -> RunConfig:
    """The config as ``command`` needs it: a ``RunConfig`` is used as given; a path is read
    with the ``${VAR}`` references that command needs resolved from the environment.

    ``run`` and ``validate``: the ``api`` and ``notify`` sections, and in a sandbox the
    ``webhooks`` section too (the emulator signs with that secret); ``poll``: ``api``;
    ``sink``: ``webhooks``; the others (``reconcile``, ``status``, ``prune``,
    ``export-events``): none (they send nothing). Raises ConfigError naming
    the key (a file not found or unreadable, bad YAML, an unknown key, a variable that
    is not set), or saying what was given instead of a path or a RunConfig (None...).
    """
    if isinstance(config, RunConfig):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config: the path of a YAML file or a RunConfig, not "
                          f"{type(config).__name__}")
    path = Path(config)
    if command in ("run", "validate"):
        loaded = load_config(path, needs=("api", "notify"))
        if loaded.sandbox.enabled:
            loaded = load_config(path, needs=("api", "webhooks", "notify"))
        return loaded
    needs = {"poll": ("api",), "sink": ("webhooks",)}.get(command, ())
    return load_config(path, needs=needs)


def _blocking(name: str) -> None:
    """Refuse to block a running event loop: the front doors wait for files, the ledger and
    HTTP, and ``run`` runs an event loop of its own (RuntimeError, naming the async form)."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        # A plain callback of a running asyncio loop (loop.call_soon) has no current
        # task, so sniffio does not see the loop: ask asyncio itself.
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        library = "asyncio"
    raise RuntimeError(f"pipeline.{name}() blocks, and this thread runs an event loop "
                       f"({library}): use `await pipeline.aio.{name}(...)` instead")


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one ``run`` (or ``run --dry-run``, or ``validate``) did.

    ``counts``: rows per final status (reconcile.FINAL_STATUSES) as its report says;
    empty when no report was written (a dry run, or no room to write it).
    ``report_dir``: ``report.dir/<run_id>``, where the report and rejects.csv go.
    ``scan``: what the scan found, row by row; ``report``: the report written, if
    one was; ``rejects``: rejects.csv when some row was rejected.
    """

    exit_code: int
    run_id: str
    report_dir: Path
    counts: Mapping[str, int]
    stop_reason: str | None
    dry_run: bool
    scan: ScanCounts
    report: Written | None = None
    rejects: Path | None = None


@dataclass(frozen=True, slots=True)
class ReconciledRun:
    """One run that ``reconcile`` met: its report rewritten, or (``report`` None) left
    alone because the run is in progress in process ``holder_pid``."""

    run_id: str
    report: Written | None
    holder_pid: int | None = None


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """The runs reconciled, in order (empty: the ledger has no runs), and the worst of
    their exit codes; ``stale_after_s`` is the config's ``report.stale_after``."""

    exit_code: int
    runs: tuple[ReconciledRun, ...]
    stale_after_s: float
    # runs left alone: nothing their report shows changed since it was written, and it was
    # written while rows were open; their exit codes (as those reports gave) count too
    unchanged: tuple[str, ...] = ()
    # every run settled and no report out of date: the latest run, whose report (left as
    # it is) gave the exit code; None otherwise
    settled: str | None = None


@dataclass(frozen=True, slots=True)
class PollResult:
    """What ``poll`` did: nothing in a sandbox (``sandbox``; exit 0, no reconcile); else
    the fetch (``stats``, None when nothing was waiting for an outcome) followed by a
    reconcile of every run whose report can change (``reconciled``, whose code it takes)."""

    exit_code: int
    sandbox: bool = False
    stats: PollStats | None = None
    reconciled: ReconcileResult | None = None


def run(config: ConfigSource, *, inputs: Sequence[str | os.PathLike[str]] = (),
        dry_run: bool = False, limit: int | None = None, force: bool = False,
        progress: bool = False, argv: Sequence[str] = ()) -> RunResult:
    """``tasknotes run``: scan, send, wait (sandbox), settle and report one run.

    ``config``: a path or a ``RunConfig`` (``load``); ``inputs``: CSV paths or globs
    (default: the config's ``input.path``); ``dry_run``: the scan alone, nothing sent nor
    recorded; ``limit``: send at most this many rows (>= 1; None: all); ``force``: send
    rows the ledger says were already sent; ``progress``: a progress bar on stderr, only
    when stderr is a terminal; ``argv``: kept in the run record as the command line
    (nothing else is: never the host process's ``sys.argv``).

    Relative paths in the config are relative to the current directory. Signals: run
    from the main thread, from the moment its config is loaded (before the secrets are
    checked and the inputs opened) until it ends, the first SIGINT/SIGTERM stops the
    run gracefully (exit code 3; nothing more is sent) and a second one exits the
    process at once; the host's own handlers are put back when the run ends. From any
    other thread no signal handler is installed. (A dry run and ``validate`` install
    none: they send nothing.)

    Raises ConfigError (a credential not set, a config file that cannot be used),
    InputError (an input unusable: nothing sent), StateError (the ledger unusable or
    locked by another run) and RunAborted where the run cannot even record that it
    stopped; a stop it can record (signal, credentials refused, disk full) is
    ``stop_reason`` with exit code 3. ValueError for ``limit`` < 1; RuntimeError when
    called from a thread that runs an event loop (use ``pipeline.aio.run``).
    """
    return _run(config, inputs=inputs, dry_run=dry_run, limit=limit, force=force,
                progress=progress, argv=argv)


def _run(config: ConfigSource, *, inputs: Sequence[str | os.PathLike[str]] = (),
         dry_run: bool = False, limit: int | None = None, force: bool = False,
         progress: bool = False, argv: Sequence[str] = (),
         started: Callable[[Run], None] | None = None) -> RunResult:
    """``run``; ``started`` is called with the Run before it executes (``pipeline.aio``
    keeps it to ask it to stop, from another thread, when its caller is cancelled)."""
    from pipeline import logs
    from pipeline.runner import Run

    _blocking("run")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (None: no limit), not {limit}")
    config = load(config, "run")
    if isinstance(inputs, str | os.PathLike):  # one path, not a sequence of its letters
        inputs = (inputs,)
    options = RunOptions(inputs=tuple(os.fspath(i) for i in inputs), dry_run=dry_run,
                         limit=limit, progress=progress, force=force, argv=tuple(argv))
    if options.force:
        log.warning("--force: rows already sent in earlier runs will be sent again")
    runner = Run(config, options)
    if started is not None:
        started(runner)
    token = logs.set_run_id(runner.run_id)  # on its lines, and the metrics' and notify's
    try:
        outcome = runner.execute()
        report = outcome.report
        if not options.dry_run:
            ops.run_ended(config, run_id=outcome.run_id, exit_code=outcome.exit_code,
                          counts=report.counts if report is not None else None,
                          report_dir=report.directory if report is not None else None,
                          stop_reason=outcome.stop_reason)
    finally:
        logs.reset_run_id(token)  # the caller's later lines are not this run's
    return RunResult(
        exit_code=outcome.exit_code, run_id=outcome.run_id,
        report_dir=config.report.dir / outcome.run_id,
        counts=dict(report.counts) if report is not None else {},
        stop_reason=outcome.stop_reason, dry_run=options.dry_run, scan=outcome.scan,
        report=report, rejects=outcome.rejects)


def validate(config: ConfigSource, inputs: Sequence[str | os.PathLike[str]] = ()
             ) -> RunResult:
    """``tasknotes validate``: the scan alone (as ``run --dry-run``); nothing sent and
    nothing written to the ledger (only rejects.csv, under ``RunResult.report_dir``).
    Exit code 0, or 1 when some row would be rejected. Raises ConfigError and InputError
    as ``run`` does (the secrets ``run`` needs are checked too)."""
    _blocking("validate")
    return run(load(config, "validate"), inputs=inputs, dry_run=True)


def reconcile(config: ConfigSource, run_id: str | None = None) -> ReconcileResult:
    """``tasknotes reconcile``: re-join ledger and sink file and rewrite the reports of
    ``run_id``, or (None) of every run whose report may be wrong now: something it shows
    changed since it was written (``Ledger.reports_to_rewrite``). A run with open rows and
    nothing new is left alone (its files untouched) and listed in ``unchanged``, the exit
    code its report gave counted.

    Raises ConfigError (the config), PipelineError when there is no ledger yet,
    StateError for an unknown run id; RuntimeError as ``run`` does.
    """
    from pipeline.reconciliation import Reconciler
    from pipeline.report import report_context

    _blocking("reconcile")
    config = load(config, "reconcile")
    ledger = _open_ledger(config)
    reconciler = Reconciler.of(ledger, config)
    unchanged: list[tuple[str, int | None]] = []
    settled: tuple[str, int] | None = None
    try:
        if run_id:
            label = ledger.run(run_id).account
            if config.another_configs(label):
                raise StateError(f"run {run_id} was sent under account {label}, another "
                                 "config's (state.other_accounts): its report (and its "
                                 "note text) is written by that config's reconcile")
            runs = [run_id]
        else:
            # Learn the outcomes first, then choose: every run whose report may be wrong
            # now, whoever refreshed the ledger since it was written (a run, status, poll).
            latest = ledger.latest_run()
            if latest is not None:
                reconciler.refresh(ledger.run(latest).account)
            context, now = report_context(config), time.time()
            # another config's runs (state.other_accounts) are its own to report
            runs = [r for r in ledger.reports_to_rewrite(context, now)
                    if not config.another_configs(ledger.run(r).account)]
            unchanged = [(r, code) for r, code in ledger.unchanged_reports(context, now)
                         if not config.another_configs(ledger.run(r).account)]
            if (not runs and not unchanged and latest is not None  # all settled
                    and not config.another_configs(ledger.run(latest).account)):
                kept = _kept_report(config, ledger.report_exit_code(latest), latest)
                if kept is None:  # its report is missing: written again
                    runs = [latest]
                else:  # nothing any report shows changed: every file stays as it is
                    settled = latest, kept
        if settled is not None:
            result = ReconcileResult(settled[1], (), config.report.stale_after,
                                     settled=settled[0])
        else:
            result = _reconcile_runs(config, ledger, runs, reconciler)
        if unchanged:
            codes = [code for _, code in unchanged if code is not None]
            result = replace(result, exit_code=exits.worst([result.exit_code, *codes]),
                             unchanged=tuple(r for r, _ in unchanged))
    finally:
        ledger.close()
    ops.reconciled(config)  # report.metrics_file, if set
    return result


def _kept_report(config: RunConfig, code: int | None, run_id: str) -> int | None:
    """``code``, the exit code ``run_id``'s report gave, if that report was recorded as
    written and its summary.json is still there; else None (it is to be written)."""
    if code is None or not (config.report.dir / run_id / "summary.json").is_file():
        return None
    return code


def write_off(config: ConfigSource, run_id: str) -> tuple[int, ReconcileResult]:
    """``tasknotes status --write-off RUN_ID``: close ``run_id``'s unsent rows without
    sending them (recorded in the ledger with the time; status.write_off), then rewrite
    that run's report. Returns (rows written off, the reconcile of that run).

    Raises StateError for an empty or unknown run id, a run in progress, or no ledger;
    ConfigError and RuntimeError as ``reconcile`` does.
    """
    from pipeline.open_items import write_off as close_unsent
    from pipeline.reconciliation import Reconciler

    _blocking("write_off")
    config = load(config, "reconcile")
    if not run_id.strip():  # no run has such an id: name the mistake, not "unknown run"
        raise StateError("--write-off: the run id is empty (give the RUN_ID to write off)")
    closed = close_unsent(config, run_id)
    ledger = _open_ledger(config)
    try:
        result = _reconcile_runs(config, ledger, [run_id], Reconciler.of(ledger, config))
    finally:
        ledger.close()
    ops.reconciled(config)
    return closed, result


def poll(config: ConfigSource, run_id: str | None = None) -> PollResult:
    """``tasknotes poll``: fetch from Cobalt the outcome events of unresolved jobs and
    ambiguous rows (of ``run_id``, or of every run) into the sink file, then reconcile
    as ``reconcile(config)`` does. In a sandbox there is nothing to poll (the emulator
    lived only while its run ran).

    With ``api.accounts`` each account is polled with its own token for its own rows;
    one whose poll stops (credentials refused, Cobalt kept failing) is named in
    ``stats.stopped``, the others are polled and everything reconciled, and the exit
    code is then 3 (``exits.for_run``).

    Raises what ``reconcile`` raises, ConfigError when a credential is not set, and
    RunAborted when Cobalt refuses the credentials or keeps failing (one account).
    """
    from pipeline.reconciliation import Reconciler

    _blocking("poll")
    config = load(config, "poll")
    if config.sandbox.enabled:
        if run_id:  # nothing to poll, but a run id that names no run is still an error
            ledger = _open_ledger(config)
            try:
                ledger.run(run_id)
            finally:
                ledger.close()
        return PollResult(exits.OK, sandbox=True)
    ledger = _open_ledger(config)
    stats = None
    try:
        runs = [run_id] if run_id else ledger.unresolved_runs()
        Reconciler.of(ledger, config).refresh(config.api.account_id())
        wanted: set[str] = set()
        for each in runs:
            ledger.run(each)
            wanted |= ledger.job_ids(each, unresolved=True)
        ambiguous, sent_since = ledger.ambiguous_keys(runs)
        if wanted or ambiguous:
            work = _poll_work(config, ledger, runs, wanted=wanted, ambiguous=ambiguous,
                              sent_since=sent_since)
            stats = _poll_events(config, work)
    finally:
        ledger.close()
    # What the polled events settle can change any run (a note's evidence follows it):
    # reconcile as `tasknotes reconcile CONFIG` does, choosing the runs the same way.
    reconciled = reconcile(config)
    code = exits.for_run(stopped=bool(stats and stats.stopped), report_code=reconciled.exit_code)
    return PollResult(code, stats=stats, reconciled=reconciled)


def status(config: ConfigSource, *, config_path: str | None = None) -> StatusResult:
    """``tasknotes status``: what is open over every run (status.ledger_status; its
    ``exit_code``: 0 nothing open, 1 something open; ``to_dict()``: the documented
    ``status --json`` shape). ``config_path`` is only written into the ``settle``
    commands (default: ``config`` when it is a path, else ``CONFIG``). Raises
    ConfigError (the config), StateError if the ledger cannot be read; RuntimeError as
    ``run`` does."""
    from pipeline.open_items import ledger_status

    _blocking("status")
    loaded = load(config, "status")  # ConfigError for a config of the wrong type, too
    if config_path is None:
        config_path = "CONFIG" if isinstance(config, RunConfig) else os.fspath(config)
    found = ledger_status(loaded, config_path=config_path)
    ops.status_read(loaded, found)  # report.metrics_file, if set
    return found


def _poll_work(config: RunConfig, ledger: StateStore, runs: Sequence[str], *, wanted: set[str],
               ambiguous: frozenset[bytes], sent_since: str | None
               ) -> dict[str | None, Wanted]:
    """What to poll for: ``{None: everything}`` with one account; with api.accounts, each
    account's own unresolved jobs and ambiguous notes (its token sees only its events)."""
    from pipeline.polling import Wanted

    def since(job_ids: set[str]) -> str | None:
        return min((t for t in (ledger.earliest_submission(job_ids), sent_since) if t),
                   default=None)

    if config.api.accounts is None:
        return {None: Wanted(wanted, ambiguous, since(wanted))}
    key_accounts = ledger.key_accounts() if ambiguous else {}
    work: dict[str | None, Wanted] = {}
    for account in config.api.accounts:
        jobs = set().union(*(ledger.job_ids(r, unresolved=True, account=account)
                             for r in runs))
        keys = frozenset(k for k in ambiguous if key_accounts.get(k) == account)
        if jobs or keys:
            work[account] = Wanted(jobs, keys, since(jobs))
    polled = len(wanted) + len(ambiguous) - sum(len(w.job_ids) + len(w.keys)
                                                for w in work.values())
    if polled:  # rows of a run from before api.accounts, or of an account since removed
        log.warning("%d unresolved rows name no account of api.accounts: not polled (no "
                    "token of theirs is configured)", polled)
    return work


def _poll_events(config: RunConfig, work: Mapping[str | None, Wanted]) -> PollStats:
    """Fetch the outcome events of the jobs and ambiguous notes of ``work`` into the sink:
    ``work[None]`` with the one account's token, else each account's with its own."""
    import anyio

    from pipeline.client import CobaltClient
    from pipeline.polling import Poller, poll_accounts
    from pipeline.state.store import open_event_store

    sink = open_event_store(config, polled=True)  # polled events go where the sink's go

    async def fetch() -> PollStats:
        webhook_secrets = [s.decode() for s in config.webhooks.all_secrets()]
        if None in work:
            one = work[None]
            async with CobaltClient(config.api, max_connections=2,
                                    more_secrets=webhook_secrets) as client:
                return await Poller(config, client, sink).run(one.job_ids, one.since, one.keys)
        async with contextlib.AsyncExitStack() as stack:
            clients = {account: await stack.enter_async_context(CobaltClient(
                config.api, max_connections=2, more_secrets=webhook_secrets, account=account))
                for account in work if account is not None}
            return await poll_accounts(
                config, clients, sink, {a: w for a, w in work.items() if a is not None})

    try:
        return anyio.run(fetch, backend_options=config.submit.backend_options())
    finally:
        sink.close()


def _open_ledger(config: RunConfig) -> StateStore:
    from pipeline.state.store import has_store, open_store

    if not has_store(config):
        raise PipelineError(f"no ledger at {config.state.ledger}: nothing has been run yet")
    return open_store(config)


def _reconcile_runs(config: RunConfig, ledger: StateStore, runs: Sequence[str],
                    reconciler: Reconciler) -> ReconcileResult:
    from pipeline.report import rewrite_report

    live = set(ledger.runs_in_progress())
    done: list[ReconciledRun] = []
    for run_id in runs:
        if run_id in live:  # its unsent rows are not failures: it writes its report at the end
            done.append(ReconciledRun(run_id, None, ledger.lock_holder()))
            continue
        done.append(ReconciledRun(run_id, rewrite_report(ledger, reconciler, run_id, config)))
    code = exits.worst(r.report.exit_code for r in done if r.report is not None)
    return ReconcileResult(code, tuple(done), config.report.stale_after)


@dataclass(frozen=True, slots=True)
class MigrateOutcome:
    """What ``migrate_state`` copied: ``ledger``, what the ledger's copy added; ``sink``,
    what the sink file's added (None: no sink file given). ``exit_code``: 0 (a copy that
    cannot be made raises instead)."""

    exit_code: int
    ledger: Copied
    sink: Copied | None


def migrate_state(config: RunConfig, ledger: Path, sink: Path | None = None
                  ) -> MigrateOutcome:
    """``tasknotes migrate-state``: copy the SQLite ledger at ``ledger`` (and the events of
    the sink file ``sink``, if given) into the database of ``state.url``; idempotent
    (state/pg_migrate.py). Returns what each copy added.

    Raises PipelineError when state.url is not set, StateError when the ledger, the
    file or the database cannot be used (nothing is copied then).
    """
    from pipeline.state.pg_migrate import copy_ledger, copy_sink, read_sink_events

    if config.state.url is None:
        raise PipelineError("state.url: not set; migrate-state copies into the database "
                            "it names")
    url = config.state.url.get_secret_value()
    events = None if sink is None else read_sink_events(sink)  # a wrong file: nothing copied
    copied = copy_ledger(url, ledger)
    if sink is None or events is None:
        return MigrateOutcome(exits.OK, copied, None)
    from pipeline.reconciliation import mirrored_through
    from pipeline.state import Ledger

    source = Ledger.existing(ledger)  # copy_ledger read it: it is there, and a ledger
    assert source is not None
    try:
        read = mirrored_through(source, sink)
    finally:
        source.close()
    return MigrateOutcome(exits.OK, copied, copy_sink(url, events, mirrored_through=read))


@dataclass(frozen=True, slots=True)
class PruneOutcome:
    """What ``prune`` did: ``older_than_days`` (from the argument or state.retention_days)
    and the prune's own counts (``pruned``: prune.PruneResult; with ``dry_run``, what it
    would remove) over the stored events ``events`` ("sink file PATH", or "events in
    PostgreSQL host:port/db" with state.url) and the ledger ``ledger`` (its path, or the
    database; never a password). ``exit_code``: 0 (a prune that cannot run raises
    instead)."""

    exit_code: int
    older_than_days: float
    pruned: PruneResult
    events: str
    ledger: str


def prune(config: ConfigSource, older_than_days: float | None = None, *,
          dry_run: bool = False) -> PruneOutcome:
    """``tasknotes prune``: remove note text older than ``older_than_days`` days (default:
    ``state.retention_days``) from the stored events (the sink file, or PostgreSQL with
    state.url) and the runs' input copies (retention.py).

    Raises ConfigError when neither gives a number of days; StateError when a file or
    the database cannot be used.
    """
    from pipeline.retention import prune as prune_files
    from pipeline.state.store import state_location

    _blocking("prune")
    loaded = load(config, "prune")
    days = older_than_days if older_than_days is not None else loaded.state.retention_days
    if days is None:
        raise ConfigError("state.retention_days: not set, and no --older-than DAYS given: "
                          "nothing says what is old enough to prune")
    if not 0 <= days <= MAX_RETENTION_DAYS:
        raise ConfigError(f"older_than_days: must be 0 to {MAX_RETENTION_DAYS:,} days "
                          f"(100 years), not {days!r}")
    events = (f"events in {state_location(loaded)}" if loaded.state.url is not None
              else f"sink file {loaded.webhooks.sink}")
    done = prune_files(loaded, days, dry_run=dry_run)
    return PruneOutcome(exits.for_rows(bool(done.failed)), days, done, events,
                        state_location(loaded))


@dataclass(frozen=True, slots=True)
class Exported:
    """What ``export_events`` wrote: ``events`` (JSON Lines) to ``path`` (None: the
    stream it was given). ``exit_code``: 0."""

    exit_code: int
    events: int
    path: Path | None


def export_events(config: ConfigSource, out: Path | BinaryIO) -> Exported:
    """``tasknotes export-events``: the events stored in the database of ``state.url`` as
    JSON Lines (state/pg_events.py), written to the binary stream ``out``, or to the file
    at the path ``out`` whole or not at all (a temporary file beside it, fsync, one
    rename). Raises ConfigError when state.url is not set (the events are then in the
    sink file already), StateError when the database cannot be read.
    """
    from pipeline.state.pg_events import export_jsonl

    loaded = load(config, "export-events")
    if loaded.state.url is None:
        raise ConfigError(f"state.url: not set; without it the events are in "
                          f"{loaded.webhooks.sink} already (JSON Lines)")
    url = loaded.state.url.get_secret_value()
    if not isinstance(out, Path):
        n = export_jsonl(url, out)
        out.flush()
        log.info("export-events: %d events from the database", n)
        return Exported(exits.OK, n, None)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    except OSError as exc:
        raise StateError(f"--out {out}: cannot be written: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            n = export_jsonl(url, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out)
    except OSError as exc:  # a directory at ``out``, a full disk: the copy is removed
        Path(tmp).unlink(missing_ok=True)
        raise StateError(f"--out {out}: cannot be written: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("export-events: %d events from the database", n)
    return Exported(exits.OK, n, out)


@dataclass(frozen=True, slots=True)
class SinkServed:
    """How ``serve_sink`` ended: it served until a signal stopped it. ``where``: the sink
    file or the database it stored into; ``events_at_start``: the events stored there when
    it started. ``exit_code``: 0."""

    exit_code: int
    where: str
    events_at_start: int


def serve_sink(config: ConfigSource, *, host: str = "127.0.0.1", port: int = 8787
               ) -> SinkServed:
    """``tasknotes sink``: receive Cobalt's webhooks on ``host``:``port`` (sink.py) into
    the sink file, or the database of ``state.url``, until SIGINT/SIGTERM. Blocks.

    Raises ConfigError when no webhook secret is set, CannotListen when ``host``:``port``
    cannot be listened on (before anything is created), StateError when the store
    cannot be opened.
    """
    from pipeline.servers import bind, serve_foreground
    from pipeline.sink import EventStore, WebhookReceiver
    from pipeline.state.store import open_event_store

    loaded = load(config, "sink")
    secrets = loaded.webhooks.all_secrets()
    if not secrets:
        raise ConfigError("webhooks.secret: the sink needs at least one webhook secret")
    sock = bind(host, port)  # before anything is created or said: one line if not
    try:
        sink = open_event_store(loaded)
        try:
            store: EventStore = sink
            receiver = WebhookReceiver(store, secrets, path=loaded.webhooks.path,
                                       max_body_bytes=loaded.webhooks.max_body_bytes)
            where, count = store.destination, store.count()
            log.info("sink: POST %s -> %s (%d events stored)", loaded.webhooks.path,
                     where, count)
            serve_foreground(receiver.app(), host=host, port=port, sock=sock,
                             **receiver.serve_options())
        finally:
            sink.close()
    finally:
        sock.close()
    return SinkServed(exits.OK, where, count)
